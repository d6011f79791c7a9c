"""The whole retrain flow on a small subset of the real Grocery Store photos (read in place)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.retrain import retrain

GROCERY_ROOT = Path(
    os.environ.get(
        "SKUMATCH_GROCERY_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "grocery-store"
    )
).resolve()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (GROCERY_ROOT / "classes.csv").exists(),
        reason=f"Grocery Store dataset not found at {GROCERY_ROOT} (set SKUMATCH_GROCERY_ROOT)",
    ),
]


def test_retrain_on_grocery_subset_beats_zero_shot(tmp_path, monkeypatch, prefect_api):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.root={GROCERY_ROOT}",
        "data.max_images_per_sku=2",
        "model.backbone=efficientnet-lite0",
        # Two thirds of the native side: half the pixels to train and embed on 2 cores.
        "model.image_size=160",
        f"registry.tracking_uri={uri}",
        # Six head-only epochs, then one that fine-tunes the backbone: both stages on real photos.
        "train.schedule.epochs=7",
        "train.schedule.frozen_epochs=6",
        "evaluate.min_top1=0.3",
        "evaluate.min_top3=0.5",
        # Fewer catalogue views than the default recipe keep this test near a minute and a half on 2 cores.
        "train.augment.cached_views=2",
        "train.augment.catalogue_views=4",
        # The run plots are tested on the synthetic set (tests/flows); here they would embed 296 queries again.
        "evaluate.plots=false",
        # One view per query instead of six (zooms x mirror): the test is the flow on real photos, not TTA.
        "model.query_zooms=[1.0]",
        "model.flip_tta=false",
    ]
    summary = retrain(params_path="params.yaml", overrides=overrides)

    client = MlflowClient(uri, uri)
    champion = client.get_model_version_by_alias("skumatch-encoder", "champion")
    assert str(champion.version) == summary["version"]
    assert champion.tags["index_checksum"] == summary["index_checksum"]
    assert champion.tags["data_version"] == summary["data_version"]
    history = MlflowClient(uri, uri).get_metric_history(champion.run_id, "train.frozen_backbone")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0] * 6 + [0.0]
    metrics = summary["metrics"]
    # 81 SKUs: chance is ~1.2% top-1; pretrained features plus a short head fine-tune do far better.
    assert metrics["catalogue"]["top1"] >= 0.3 and metrics["catalogue"]["top3"] >= 0.5
    assert metrics["nn"]["top3"] >= 0.5
    assert metrics["catalogue"]["queries"] > 100
