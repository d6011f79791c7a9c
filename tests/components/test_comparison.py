"""The challenger-against-champion report, on hand-made evaluations and on real embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.comparison import challenger_report, sku_changes
from components.config import EvaluateParams
from components.data import load_manifest
from components.evaluate import Evaluation, evaluate_embeddings, evaluate_embeddings_by_sku, protocol_sets

VERDICT = "gate PASSED: catalogue top1 0.6000 >= threshold 0.3000"


def evaluation(top1_by_sku: dict[str, float], queries: int = 4, nn_top1: float = 0.5) -> Evaluation:
    """An evaluation with the given catalogue top-1 per SKU, and its pooled metrics."""
    skus = sorted(top1_by_sku)
    by_sku = pd.DataFrame(
        {
            "protocol": "catalogue",
            "sku_id": skus,
            "queries": queries,
            "top1": [top1_by_sku[sku] for sku in skus],
        }
    )
    metrics = {
        "catalogue": {"top1": float(np.mean(list(top1_by_sku.values()))), "top3": 1.0},
        "nn": {"top1": nn_top1, "top3": 1.0},
    }
    return Evaluation(metrics, by_sku)


def test_the_report_shows_both_models_with_changes_and_the_skus_that_moved_most():
    champion = evaluation({"a": 0.5, "b": 0.5, "c": 0.75, "d": 1.0, "e": 0.25}, nn_top1=0.6)
    challenger = evaluation({"a": 1.0, "b": 0.25, "c": 0.75, "d": 0.5, "e": 0.5}, nn_top1=0.5)

    report = challenger_report(challenger, champion, "3", VERDICT, "catalogue", listed=1)
    markdown = report.markdown
    assert markdown.startswith(f"# Challenger against champion v3\n\n{VERDICT}\n")
    assert "| metric | challenger | champion v3 | change |" in markdown
    assert "| catalogue.top1 | 0.6000 | 0.6000 | +0.0000 |" in markdown
    assert "| nn.top1 | 0.5000 | 0.6000 | -0.1000 |" in markdown
    gained = markdown.split("## SKUs that gained most (catalogue top-1)")[1].split("##")[0]
    lost = markdown.split("## SKUs that lost most (catalogue top-1)")[1]
    # One of each, the largest move: a gained 0.5, d lost 0.5 (b lost less).
    assert "| a | 4 | 1.000 | 0.500 | +0.500 |" in gained and "| e |" not in gained
    assert "| d | 4 | 0.500 | 1.000 | -0.500 |" in lost and "| b |" not in lost
    assert "5 SKUs compared: 2 gained, 2 lost, 1 unchanged." in markdown
    # The plot: one bar per compared SKU, the change, largest gain first.
    (axis,) = report.figure.axes
    assert [round(bar.get_height(), 3) for bar in axis.patches] == [0.5, 0.25, 0.0, -0.25, -0.5]
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["a", "e", "c", "b", "d"]


def test_skus_only_one_model_was_scored_on_are_left_out_of_the_changes():
    champion = evaluation({"a": 1.0, "gone": 1.0})
    challenger = evaluation({"a": 0.5, "new": 1.0})
    changes = sku_changes(challenger, champion, "catalogue")
    assert changes["sku_id"].tolist() == ["a"] and changes["change"].tolist() == [-0.5]


def test_without_a_champion_the_report_shows_the_challenger_alone():
    challenger = evaluation({"a": 1.0, "b": 0.5})
    report = challenger_report(challenger, None, None, VERDICT, "catalogue")
    assert report.markdown.startswith(f"# Challenger against no champion\n\n{VERDICT}\n")
    assert "| metric | challenger |\n|---|---|\n" in report.markdown
    assert "| catalogue.top1 | 0.7500 |" in report.markdown
    assert "No `@champion` to compare with" in report.markdown and "gained" not in report.markdown
    (axis,) = report.figure.axes
    assert [bar.get_height() for bar in axis.patches] == [1.0, 0.5]


def test_a_champion_no_better_or_worse_anywhere_moves_no_sku():
    same = evaluation({"a": 1.0, "b": 0.5})
    markdown = challenger_report(same, same, "1", VERDICT, "catalogue").markdown
    assert markdown.count("None.") == 2 and "2 SKUs compared: 0 gained, 0 lost, 2 unchanged." in markdown


def test_per_sku_top1_adds_up_to_the_protocols_top1(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset)
    rng = np.random.default_rng(0)
    embeddings = {path: rng.normal(size=8).astype(np.float32) for path in manifest["image_path"]}
    sets = protocol_sets(manifest, "val", "train")
    params = EvaluateParams(ks=[1, 3])
    result = evaluate_embeddings_by_sku(embeddings, sets, params)
    assert result.metrics == evaluate_embeddings(embeddings, sets, params)
    for protocol in ("catalogue", "nn"):
        table = result.by_sku[result.by_sku["protocol"] == protocol]
        assert table["queries"].sum() == result.metrics[protocol]["queries"]
        pooled = (table["top1"] * table["queries"]).sum() / table["queries"].sum()
        assert pooled == pytest.approx(result.metrics[protocol]["top1"])
    assert set(result.by_sku.columns) == {"protocol", "sku_id", "queries", "top1"}
