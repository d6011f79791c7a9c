"""Plots people look at after a run: training curves, a 2-D map of embeddings, worst confusions.

Pure functions that return matplotlib figures (headless ``Agg`` backend); the flow stores them
with the MLflow run.
"""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # no screen on training hosts
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LOGGER = logging.getLogger(__name__)


def training_curves(history: list[dict[str, float]]) -> Figure:
    """Loss and validation top-1/top-3 of both protocols, per epoch."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [record["epoch"] + 1 for record in history]
    loss_axis.plot(epochs, [record["train.loss"] for record in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="loss")
    for key in ("val.catalogue.top1", "val.catalogue.top3", "val.nn.top1", "val.nn.top3"):
        points = [(record["epoch"] + 1, record[key]) for record in history if key in record]
        if points:
            accuracy_axis.plot(*zip(*points), marker="o", label=key.removeprefix("val."))
    accuracy_axis.set(title="validation (top-k over distinct SKUs)", xlabel="epoch", ylim=(0, 1))
    accuracy_axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def embedding_map(
    embeddings: np.ndarray, sku_ids: list[str], is_catalogue: np.ndarray, max_skus: int = 20, seed: int = 0
) -> Figure:
    """A t-SNE map of shelf photos (dots) and catalogue images (stars), coloured by SKU.

    Only ``max_skus`` SKUs are drawn so colours stay distinguishable.
    """
    from sklearn.manifold import TSNE

    sku_ids = np.asarray(sku_ids)
    is_catalogue = np.asarray(is_catalogue, dtype=bool)
    chosen = np.random.default_rng(seed).permutation(np.unique(sku_ids))[:max_skus]
    keep = np.isin(sku_ids, chosen)
    points = TSNE(
        n_components=2, perplexity=min(30.0, max(2.0, keep.sum() / 4)), init="pca", random_state=seed
    ).fit_transform(embeddings[keep])
    colours = plt.get_cmap("tab20")
    figure, axis = plt.subplots(figsize=(9, 8))
    for index, sku in enumerate(chosen):
        mine = sku_ids[keep] == sku
        photos, catalogue = mine & ~is_catalogue[keep], mine & is_catalogue[keep]
        axis.scatter(points[photos, 0], points[photos, 1], s=12, color=colours(index % 20), alpha=0.7)
        axis.scatter(
            points[catalogue, 0],
            points[catalogue, 1],
            s=220,
            marker="*",
            color=colours(index % 20),
            edgecolors="black",
            label=sku,
        )
    axis.set(title="t-SNE of embeddings: shelf photos (dots), catalogue images (stars)", xticks=[], yticks=[])
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return figure


def worst_confusions(
    query_paths: list[str],
    true_skus: list[str],
    predicted_skus: list[str],
    margins: np.ndarray,
    catalogue_image: dict[str, str],
    count: int = 8,
) -> Figure:
    """A sheet of the worst wrong top-1 answers: query, the wrong SKU's and the true SKU's catalogue image.

    Args:
        margins: how much more similar the wrong SKU was than the true one (worst first).
        catalogue_image: one catalogue image path per SKU.
    """
    from components.data import load_rgb

    wrong = [i for i in np.argsort(-np.asarray(margins)) if predicted_skus[i] != true_skus[i]][:count]
    figure, axes = plt.subplots(max(1, len(wrong)), 3, figsize=(9, 3 * max(1, len(wrong))), squeeze=False)
    for row, index in enumerate(wrong):
        panels = [
            (query_paths[index], f"query ({true_skus[index]})"),
            (catalogue_image.get(predicted_skus[index]), f"wrong top-1: {predicted_skus[index]}"),
            (catalogue_image.get(true_skus[index]), f"true: {true_skus[index]}"),
        ]
        for column, (path, title) in enumerate(panels):
            axis = axes[row][column]
            if path:
                axis.imshow(load_rgb(path))
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    if not wrong:
        axes[0][0].set_title("no wrong top-1 answers")
        for axis in axes[0]:
            axis.axis("off")
    figure.tight_layout()
    return figure


def run_figures(
    encoder,
    preprocess,
    manifest,
    query_split: str,
    train_split: str,
    history: list[dict[str, float]],
    batch_size: int = 16,
) -> dict[str, Figure]:
    """Every figure of a run, keyed by file name: curves, the embedding map and the worst confusions.

    The map and the confusions use the ``catalogue`` protocol: ``query_split`` photos against the
    catalogue images.
    """
    from components.evaluate import SkuGroups, protocol_sets, rank_true_skus
    from components.model import embed_images

    sets = protocol_sets(manifest, query_split, train_split)
    queries, catalogue = sets.queries, sets.galleries["catalogue"]
    query_vectors = embed_images(encoder, preprocess, list(queries["image_path"]), batch_size, as_queries=True)
    catalogue_vectors = embed_images(encoder, preprocess, list(catalogue["image_path"]), batch_size)
    vectors = np.concatenate([query_vectors, catalogue_vectors])
    groups = SkuGroups.of(catalogue["sku_id"].to_numpy())
    true_skus = queries["sku_id"].to_numpy().astype(str)
    known = np.isin(true_skus, groups.skus)  # a photo of a SKU the catalogue lacks has no true score
    ranking = rank_true_skus(
        query_vectors,
        np.searchsorted(groups.skus, true_skus).clip(max=len(groups.skus) - 1),
        catalogue_vectors,
        groups,
        max_k=1,
        neighbours=1,
    )
    predicted = groups.skus[ranking.top_code]
    true_scores = np.where(known, ranking.true_score, -1.0)
    figures = {
        "training_curves.png": training_curves(history),
        "embedding_map.png": embedding_map(
            vectors,
            list(true_skus) + list(catalogue["sku_id"]),
            np.r_[np.zeros(len(queries), bool), np.ones(len(catalogue), bool)],
        ),
        "worst_confusions.png": worst_confusions(
            list(queries["image_path"]),
            list(true_skus),
            list(predicted),
            ranking.top_score - true_scores,
            dict(zip(catalogue["sku_id"], catalogue["image_path"])),
        ),
    }
    return figures
