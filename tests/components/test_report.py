"""Figures of a run: curves, embedding map, worst confusions."""

from __future__ import annotations

import numpy as np

from components.config import load_params
from components.data import load_manifest
from components.model import build_encoder
from components.report import embedding_map, run_figures, training_curves, worst_confusions


def test_training_curves_draw_loss_and_both_protocols():
    history = [
        {
            "epoch": e,
            "train.loss": 3.0 - e,
            "val.catalogue.top1": 0.2 * e,
            "val.catalogue.top3": 0.3 * e,
            "val.nn.top1": 0.25 * e,
            "val.nn.top3": 0.3 * e,
        }
        for e in range(3)
    ]
    figure = training_curves(history)
    loss_axis, accuracy_axis = figure.axes
    assert list(loss_axis.lines[0].get_ydata()) == [3.0, 2.0, 1.0]
    assert [line.get_label() for line in accuracy_axis.lines] == [
        "catalogue.top1",
        "catalogue.top3",
        "nn.top1",
        "nn.top3",
    ]


def test_embedding_map_marks_catalogue_images():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((40, 8)).astype(np.float32)
    skus = [f"s{i % 4}" for i in range(40)]
    is_catalogue = np.array([i < 4 for i in range(40)])
    figure = embedding_map(embeddings, skus, is_catalogue)
    axis = figure.axes[0]
    assert len(axis.get_legend().get_texts()) == 4  # one star per SKU in the legend


def test_worst_confusions_show_only_wrong_answers(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset)
    catalogue = dict(
        zip(manifest[manifest.role == "catalogue"].sku_id, manifest[manifest.role == "catalogue"].image_path)
    )
    queries = manifest[manifest.split == "val"].head(3)
    skus = list(queries.sku_id)
    predicted = [skus[0], skus[0], skus[2]] if skus[1] != skus[0] else [skus[0], "other", skus[2]]
    figure = worst_confusions(list(queries.image_path), skus, predicted, np.array([0.1, 0.5, 0.9]), catalogue)
    assert len(figure.axes) == 3  # one wrong answer: one row of query, wrong SKU, true SKU
    assert figure.axes[1].get_title().startswith("wrong top-1")


def test_run_figures_from_a_model(tiny_model_overrides, synthetic_dataset):
    params = load_params(None, tiny_model_overrides)
    encoder, preprocess = build_encoder(params.model)
    history = [{"epoch": 0, "train.loss": 1.0, "val.catalogue.top1": 0.5}]
    figures = run_figures(encoder, preprocess, load_manifest(synthetic_dataset), "val", "train", history)
    assert sorted(figures) == ["embedding_map.png", "training_curves.png", "worst_confusions.png"]
