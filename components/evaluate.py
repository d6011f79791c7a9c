"""Retrieval metrics for both protocols, and the promotion gate.

Protocols (DESIGN.md):

- ``nn``: gallery = labelled training photos, queries = a held-out split; the prediction is
  the label of the nearest neighbours (the seed posts' RP2K protocol).
- ``catalogue``: gallery = the catalogue images only, queries = the same natural photos;
  the real product-matching setting.

Top-k is counted over distinct SKUs: gallery hits are ranked by similarity and a SKU's rank is
that of its best image, so k neighbours of one SKU never crowd out the others.

Everything is read from k-nearest-neighbour searches (``KnnFn``, FAISS by default) and from
scoring chosen SKUs' images, never from a queries x gallery matrix, so memory stays flat in the
gallery size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import EvaluateParams
from components.data import select
from components.leaks import find_leaks

LOGGER = logging.getLogger(__name__)

# (queries, gallery, k) -> (scores, rows): each query's k nearest gallery rows by inner product,
# best first. Injected, as pytorch-metric-learning's knn_func is, so tests swap FAISS for brute force.
KnnFn = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]

QUERY_CHUNK = 1024  # queries ranked at a time: bounds the (queries, neighbours) blocks
GATHER_FLOATS = 1 << 24  # gallery floats gathered at a time when scoring SKUs' images (64 MiB)


def faiss_knn(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest gallery rows by inner product: FAISS's exact search, with no index
    built (a float32 gallery is not copied)."""
    import faiss

    return faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(gallery, dtype=np.float32),
        min(k, len(gallery)),
        faiss.METRIC_INNER_PRODUCT,
    )


def brute_force_knn(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same by a dense matrix product and a stable sort (the reference FAISS is checked against)."""
    similarity = queries.astype(np.float32) @ gallery.astype(np.float32).T
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, : min(k, len(gallery))]
    return np.take_along_axis(similarity, rows, axis=1), rows


@dataclass(frozen=True)
class SkuGroups:
    """Gallery rows grouped by SKU in O(rows): a code per row, and each SKU's rows side by side."""

    skus: np.ndarray  # the distinct SKU ids, sorted; a SKU's code is its position here
    codes: np.ndarray  # the code of each gallery row
    order: np.ndarray  # gallery rows ordered by code
    starts: np.ndarray  # SKU c's rows are order[starts[c] : starts[c + 1]]

    @classmethod
    def of(cls, gallery_skus: np.ndarray) -> SkuGroups:
        skus, codes = np.unique(np.asarray(gallery_skus).astype(str), return_inverse=True)
        order = np.argsort(codes, kind="stable")
        return cls(skus, codes, order, np.searchsorted(codes[order], np.arange(len(skus) + 1)))

    @property
    def sizes(self) -> np.ndarray:
        """Gallery images per SKU code."""
        return np.diff(self.starts)

    def best_scores(self, queries: np.ndarray, gallery: np.ndarray, query_rows: np.ndarray, codes: np.ndarray):
        """For each pair (``queries[query_rows[i]]``, SKU ``codes[i]``), the score of that SKU's best image."""
        sizes = self.sizes[codes]
        scores = np.empty(len(codes), dtype=np.float32)
        per_step = max(1, GATHER_FLOATS // gallery.shape[1])  # gallery rows gathered at a time
        gathered = np.cumsum(sizes)
        start = 0
        while start < len(codes):
            done = gathered[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(gathered, done + per_step, side="right")))
            step_sizes = sizes[start:stop]
            firsts = np.cumsum(step_sizes) - step_sizes
            positions = np.repeat(self.starts[codes[start:stop]] - firsts, step_sizes) + np.arange(step_sizes.sum())
            dots = np.einsum(
                "nd,nd->n", gallery[self.order[positions]], queries[np.repeat(query_rows[start:stop], step_sizes)]
            )
            scores[start:stop] = np.maximum.reduceat(dots, firsts)
            start = stop
        return scores


@dataclass(frozen=True)
class SkuRanking:
    """Where each query's true SKU ranks among the distinct SKUs of its nearest gallery images."""

    rank: np.ndarray  # 0 = first; ties count against the model; past max_k only a lower bound
    true_score: np.ndarray  # the score of the true SKU's best image
    top_code: np.ndarray  # the first SKU (its code in SkuGroups) and its score
    top_score: np.ndarray
    average_precision: np.ndarray  # AP@neighbours over gallery images; the SKU's images are relevant


def rank_true_skus(
    queries: np.ndarray,
    query_codes: np.ndarray,
    gallery: np.ndarray,
    groups: SkuGroups,
    max_k: int,
    neighbours: int,
    knn_fn: KnnFn = faiss_knn,
) -> SkuRanking:
    """Rank every query's true SKU from its ``neighbours`` nearest gallery images, never a dense matrix.

    A SKU ranks by its best image. Where the neighbours hold neither the true SKU nor ``max_k``
    other SKUs (many images of few SKUs), that query's search widens until one holds.
    """
    n, depth = len(gallery), min(neighbours, len(gallery))
    rank = np.zeros(len(queries), dtype=np.int64)
    true_score, top_score, ap = (np.zeros(len(queries), dtype=np.float32) for _ in range(3))
    top_code = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        block, codes = queries[start : start + QUERY_CHUNK], query_codes[start : start + QUERY_CHUNK]
        where = slice(start, start + len(block))
        scores, rows = knn_fn(block, gallery, depth)
        neighbour_codes = groups.codes[rows]
        top_code[where], top_score[where] = neighbour_codes[:, 0], scores[:, 0]
        ap[where] = _average_precision(neighbour_codes, codes, groups.sizes[codes])
        rank[where], true_score[where], settled = _ranks_among(scores, neighbour_codes, codes, max_k, depth == n)
        k = depth
        while not settled.all():
            k = min(n, k * 4)
            todo = np.flatnonzero(~settled)
            wider, wider_rows = knn_fn(block[todo], gallery, k)
            ranks, found, settled[todo] = _ranks_among(wider, groups.codes[wider_rows], codes[todo], max_k, k == n)
            rank[start + todo], true_score[start + todo] = ranks, found
        unseen = np.flatnonzero(np.isnan(true_score[where]))  # ranked past max_k without its SKU in sight
        if unseen.size:
            true_score[start + unseen] = groups.best_scores(block, gallery, unseen, codes[unseen])
    return SkuRanking(rank, true_score, top_code, top_score, ap)


def _ranks_among(scores: np.ndarray, codes: np.ndarray, true_codes: np.ndarray, max_k: int, complete: bool):
    """(rank, true score or NaN, settled) of each query from its neighbours' scores and SKU codes."""
    first = _first_occurrences(codes)
    is_true = codes == true_codes[:, None]
    found = is_true.any(axis=1)
    true_score = np.where(found, scores[np.arange(len(scores)), is_true.argmax(axis=1)], np.nan)
    others = first & ~is_true
    with np.errstate(invalid="ignore"):
        ahead = (others & (scores >= true_score[:, None])).sum(axis=1)
    # Without the true SKU in sight, every other SKU seen scores at least as high: a lower bound.
    rank = np.where(found, ahead, others.sum(axis=1))
    return rank, true_score, found | complete | (rank >= max_k)


def _first_occurrences(codes: np.ndarray) -> np.ndarray:
    """Per row, True where a code appears for the first time (its SKU's best image)."""
    order = np.argsort(codes, axis=1, kind="stable")
    ordered = np.take_along_axis(codes, order, axis=1)
    first_ordered = np.ones(codes.shape, dtype=bool)
    first_ordered[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty_like(first_ordered)
    np.put_along_axis(first, order, first_ordered, axis=1)
    return first


def _average_precision(codes: np.ndarray, true_codes: np.ndarray, relevant_count: np.ndarray) -> np.ndarray:
    """AP@k of each query over its k neighbours (k = ``codes.shape[1]``); the full AP when k covers the gallery."""
    relevant = codes == true_codes[:, None]
    precision_at_hits = np.where(relevant, np.cumsum(relevant, axis=1) / np.arange(1, codes.shape[1] + 1), 0.0)
    return precision_at_hits.sum(axis=1) / np.minimum(relevant_count, codes.shape[1])


def delta_similarity(
    queries: np.ndarray,
    query_codes: np.ndarray,
    true_score: np.ndarray,
    gallery: np.ndarray,
    groups: SkuGroups,
    other_skus: int,
    seed: int = 0,
) -> float:
    """Mean over queries of the true SKU's score minus the mean score of random other SKUs.

    Every other SKU is scored where there are at most ``other_skus`` of them; beyond, that many
    drawn uniformly per query (with replacement), so the cost does not grow with the catalogue.
    """
    n_skus = len(groups.skus)
    if n_skus < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    others_mean = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), QUERY_CHUNK):
        codes = query_codes[start : start + QUERY_CHUNK]
        if n_skus - 1 <= other_skus:
            every = np.broadcast_to(np.arange(n_skus), (len(codes), n_skus))
            others = every[every != codes[:, None]].reshape(len(codes), n_skus - 1)
        else:  # uniform over the other SKUs: draw from n_skus - 1 codes, step over the true one
            others = rng.integers(0, n_skus - 1, size=(len(codes), other_skus))
            others += others >= codes[:, None]
        query_rows = np.repeat(np.arange(len(codes)), others.shape[1])
        best = groups.best_scores(queries[start : start + QUERY_CHUNK], gallery, query_rows, others.ravel())
        others_mean[start : start + len(codes)] = best.reshape(others.shape).mean(axis=1)
    return float(np.mean(true_score - others_mean))


def retrieval_metrics(
    query_embeddings: np.ndarray,
    query_skus: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_skus: np.ndarray,
    ks: tuple[int, ...] | list[int] = (1, 3, 5),
    knn_fn: KnnFn = faiss_knn,
    neighbours: int = 1000,
    other_skus: int = 100,
) -> dict[str, float]:
    """Top-k over distinct SKUs, mean delta similarity and mAP@neighbours of one query set on one gallery.

    Queries whose SKU has no gallery image cannot be matched and are left out (counted in
    ``queries_without_gallery_sku``).

    Returns:
        ``top{k}`` for each k, ``delta_similarity``, ``map``, ``queries``,
        ``queries_without_gallery_sku``.
    """
    metrics, _ = retrieval_metrics_by_sku(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, ks, knn_fn, neighbours, other_skus
    )
    return metrics


def retrieval_metrics_by_sku(
    query_embeddings: np.ndarray,
    query_skus: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_skus: np.ndarray,
    ks: tuple[int, ...] | list[int] = (1, 3, 5),
    knn_fn: KnnFn = faiss_knn,
    neighbours: int = 1000,
    other_skus: int = 100,
) -> tuple[dict[str, float], pd.DataFrame]:
    """:func:`retrieval_metrics`, and per query SKU its matchable queries and their top-1.

    Memory stays flat in the gallery size: everything comes from k-nearest-neighbour searches
    (``knn_fn``) and from scoring chosen SKUs' images, never a queries x gallery matrix.

    Returns:
        ``(metrics, by_sku)``; ``by_sku`` has columns ``sku_id``, ``queries``, ``top1``.
    """
    query_skus = np.asarray(query_skus).astype(str)
    groups = SkuGroups.of(gallery_skus)
    matchable = np.isin(query_skus, groups.skus)
    result: dict[str, float] = {"queries": int(matchable.sum()), "queries_without_gallery_sku": int((~matchable).sum())}
    if not matchable.any():
        raise ValueError("no query SKU appears in the gallery; nothing can be evaluated")
    queries = np.ascontiguousarray(query_embeddings[matchable], dtype=np.float32)
    query_skus = query_skus[matchable]
    gallery = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)  # no copy when already float32
    codes = np.searchsorted(groups.skus, query_skus)
    ranking = rank_true_skus(queries, codes, gallery, groups, max(ks), neighbours, knn_fn)
    for k in ks:
        result[f"top{k}"] = float((ranking.rank < k).mean())
    by_sku = (
        pd.DataFrame({"sku_id": query_skus, "hit": ranking.rank < 1})
        .groupby("sku_id", sort=True)["hit"]
        .agg(queries="size", top1="mean")
        .reset_index()
    )
    result["delta_similarity"] = delta_similarity(queries, codes, ranking.true_score, gallery, groups, other_skus)
    result["map"] = float(np.mean(ranking.average_precision))
    return result, by_sku


@dataclass(frozen=True)
class ProtocolSets:
    """Which manifest rows are gallery and queries for each protocol, and which queries leak."""

    queries: pd.DataFrame
    galleries: dict[str, pd.DataFrame]
    leaks: dict[str, pd.DataFrame] = field(default_factory=dict)


def protocol_sets(
    manifest: pd.DataFrame, query_split: str, train_split: str = "train", leak_max_distance: int | None = None
) -> ProtocolSets:
    """Select queries (the ``query_split`` photos) and the gallery of each protocol.

    Args:
        leak_max_distance: queries within this many dHash bits of a gallery image (or with the
            same bytes) are leaks, reported and left out of that protocol's metrics; None skips
            the check.

    Raises:
        DatasetError: a split that is not in the manifest.
    """
    queries = select(manifest, split=query_split, role="query")
    galleries = {
        "nn": select(manifest, split=train_split, role="query"),
        "catalogue": select(manifest, role="catalogue"),
    }
    leaks = {}
    if leak_max_distance is not None:
        for protocol, gallery in galleries.items():
            leaks[protocol] = find_leaks(gallery, queries, leak_max_distance)
            if len(leaks[protocol]):
                LOGGER.warning(
                    "%s protocol: %d queries have an exact or near-duplicate image in the gallery; "
                    "they are left out of its metrics",
                    protocol,
                    leaks[protocol]["query_path"].nunique(),
                )
    return ProtocolSets(queries, galleries, leaks)


@dataclass(frozen=True)
class Evaluation:
    """Both protocols' metrics, and each protocol's top-1 per query SKU."""

    metrics: dict[str, dict[str, float]]
    # Columns protocol, sku_id, queries, top1: what a challenger report compares SKU by SKU.
    by_sku: pd.DataFrame
    # Whether the embeddings were read from an EmbeddingCache rather than computed.
    from_cache: bool = False


def evaluate_embeddings(
    embeddings: dict[str, np.ndarray],
    sets: ProtocolSets,
    params: EvaluateParams,
    knn_fn: KnnFn = faiss_knn,
    query_embeddings: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of both protocols from embeddings keyed by image path (``params``: ks, neighbours, other SKUs).

    ``query_embeddings``, when given, holds the queries' embeddings (embedded as queries, see
    :func:`components.model.embed_batch`); ``embeddings`` then needs only the gallery images.
    """
    return evaluate_embeddings_by_sku(embeddings, sets, params, knn_fn, query_embeddings).metrics


def evaluate_embeddings_by_sku(
    embeddings: dict[str, np.ndarray],
    sets: ProtocolSets,
    params: EvaluateParams,
    knn_fn: KnnFn = faiss_knn,
    query_embeddings: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """:func:`evaluate_embeddings`, with each protocol's top-1 per query SKU."""
    query_embeddings = embeddings if query_embeddings is None else query_embeddings

    def stack(rows: pd.DataFrame, source: dict[str, np.ndarray] = embeddings) -> np.ndarray:
        return np.stack([source[p] for p in rows["image_path"]])

    metrics, by_sku = {}, []
    for protocol, gallery in sets.galleries.items():
        if gallery.empty:
            LOGGER.warning("protocol %s has an empty gallery; skipped", protocol)
            continue
        # A query whose photo is also in the gallery would be matched by its own copy: drop it.
        leaked = set(sets.leaks[protocol]["query_path"]) if protocol in sets.leaks else set()
        queries = sets.queries[~sets.queries["image_path"].isin(leaked)]
        query_vectors, gallery_vectors = stack(queries, query_embeddings), stack(gallery)
        metrics[protocol], skus = retrieval_metrics_by_sku(
            query_vectors,
            queries["sku_id"].to_numpy(),
            gallery_vectors,
            gallery["sku_id"].to_numpy(),
            params.ks,
            knn_fn,
            params.neighbours,
            params.delta_other_skus,
        )
        by_sku.append(skus.assign(protocol=protocol))
        metrics[protocol]["leaked_queries"] = len(leaked)
        if protocol == "catalogue" and gallery["sku_id"].nunique() >= 2:
            metrics["open_set"] = open_set_metrics(
                query_vectors,
                queries["sku_id"].to_numpy(),
                gallery_vectors,
                gallery["sku_id"].to_numpy(),
                knn_fn=knn_fn,
            )
    columns = ["protocol", "sku_id", "queries", "top1"]
    return Evaluation(
        metrics, pd.concat(by_sku, ignore_index=True)[columns] if by_sku else pd.DataFrame(columns=columns)
    )


def evaluate_encoder(
    encoder,
    preprocess,
    manifest: pd.DataFrame,
    query_split: str,
    train_split: str,
    params: EvaluateParams,
    device=None,
    knn_fn: KnnFn = faiss_knn,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Embed the images both protocols need (each once) and compute their metrics.

    Returns:
        ``{"nn": {...}, "catalogue": {...}}`` as from :func:`retrieval_metrics`.
    """
    return evaluate_encoder_by_sku(
        encoder, preprocess, manifest, query_split, train_split, params, device, knn_fn, progress
    ).metrics


def evaluate_encoder_by_sku(
    encoder,
    preprocess,
    manifest: pd.DataFrame,
    query_split: str,
    train_split: str,
    params: EvaluateParams,
    device=None,
    knn_fn: KnnFn = faiss_knn,
    progress: bool = False,
) -> Evaluation:
    """:func:`evaluate_encoder`, with each protocol's top-1 per query SKU."""
    return evaluate_model(
        lambda: (encoder, preprocess), manifest, query_split, train_split, params, None, device, knn_fn, progress
    )


def evaluate_model(
    load_model: Callable[[], tuple],
    manifest: pd.DataFrame,
    query_split: str,
    train_split: str,
    params: EvaluateParams,
    cache: EmbeddingCache | None = None,
    device=None,
    knn_fn: KnnFn = faiss_knn,
    progress: bool = False,
) -> Evaluation:
    """:func:`evaluate_encoder_by_sku` of the model ``load_model()`` returns as ``(encoder, preprocess)``,
    reading its embeddings from ``cache`` where it holds them; the model is loaded only when it does not."""
    sets = protocol_sets(manifest, query_split, train_split, params.leak_max_distance)
    gallery_paths, query_paths = protocol_paths(sets)
    cached = cache.load(gallery_paths, query_paths) if cache is not None else None
    if cached is not None:
        LOGGER.info("evaluation embeddings read from %s, not recomputed", cache.folder)
        gallery, queries = cached
    else:
        encoder, preprocess = load_model()
        gallery, queries = embed_protocol_sets(encoder, preprocess, sets, params.batch_size, device, progress)
        if cache is not None:
            cache.save(gallery_paths, gallery, query_paths, queries)
    evaluation = evaluate_embeddings_by_sku(gallery, sets, params, knn_fn, query_embeddings=queries)
    return replace(evaluation, from_cache=cached is not None)


def protocol_paths(sets: ProtocolSets) -> tuple[list[str], list[str]]:
    """``(gallery, queries)`` image paths both protocols need, each once, sorted."""
    gallery_paths = sorted(set().union(*(g["image_path"] for g in sets.galleries.values())))
    return gallery_paths, sorted(set(sets.queries["image_path"]))


class EmbeddingCache:
    """One model's evaluation embeddings on one data version, on disk: a champion compared again on
    the same data is not embedded again.

    Keyed by the model's MLflow run (its weights and preprocessing) and the data version; a hit
    also needs the very same gallery and query paths, so a changed manifest is never served stale.
    """

    def __init__(self, root: str | Path, model_run: str, data_version: str) -> None:
        key = hashlib.sha256(f"{model_run}\n{data_version}".encode()).hexdigest()[:32]
        self.folder = Path(root).expanduser() / key

    def load(self, gallery_paths: list[str], query_paths: list[str]):
        """``(gallery, queries)`` embeddings keyed by path, or None when the cache lacks these paths."""
        try:
            paths = json.loads((self.folder / "paths.json").read_text())
            gallery = np.load(self.folder / "gallery.npy")
            queries = np.load(self.folder / "queries.npy")
        except (OSError, ValueError):
            return None
        if paths != {"gallery": gallery_paths, "queries": query_paths}:
            return None
        if len(gallery) != len(gallery_paths) or len(queries) != len(query_paths):
            return None
        return dict(zip(gallery_paths, gallery)), dict(zip(query_paths, queries))

    def save(self, gallery_paths: list[str], gallery: dict, query_paths: list[str], queries: dict) -> None:
        """Store the embeddings, written to a side folder first so a reader never sees half of them."""
        partial = self.folder.with_name(f"{self.folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.save(partial / "gallery.npy", np.stack([gallery[p] for p in gallery_paths]))
        np.save(partial / "queries.npy", np.stack([queries[p] for p in query_paths]))
        (partial / "paths.json").write_text(json.dumps({"gallery": gallery_paths, "queries": query_paths}))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(partial, self.folder)


def embed_protocol_sets(
    encoder, preprocess, sets: ProtocolSets, batch_size: int, device=None, progress: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(gallery, queries)`` embeddings keyed by path: every gallery image once, the queries as queries."""
    from components.model import embed_images

    gallery_paths, query_paths = protocol_paths(sets)
    gallery = embed_images(encoder, preprocess, gallery_paths, batch_size, device=device, progress=progress)
    queries = embed_images(
        encoder, preprocess, query_paths, batch_size, device=device, progress=progress, as_queries=True
    )
    return dict(zip(gallery_paths, gallery)), dict(zip(query_paths, queries))


def calibrate_rejection(
    query_embeddings: np.ndarray,
    query_skus,
    gallery_embeddings: np.ndarray,
    gallery_skus,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    knn_fn: KnnFn = faiss_knn,
) -> dict[str, float]:
    """Find the similarity below which "no confident match" is the right answer.

    A random ``holdout_fraction`` of the gallery's SKUs is taken out of the gallery; queries of
    those SKUs now have no true match and should be rejected, the others should be accepted. The
    threshold on the top-1 SKU score that best separates them (highest F1 of the rejection) is
    returned with the rejection's precision and recall at that threshold.

    Returns:
        ``threshold``, ``precision``, ``recall``, ``f1``, ``unknown_queries``, ``known_queries``.
    """
    top_score, unknown = _holdout_scores(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, seed, knn_fn
    )
    return {
        **rejection_at(top_score, unknown, _best_threshold(top_score, unknown)),
        "unknown_queries": int(unknown.sum()),
        "known_queries": int((~unknown).sum()),
    }


def open_set_metrics(
    query_embeddings: np.ndarray,
    query_skus,
    gallery_embeddings: np.ndarray,
    gallery_skus,
    holdout_fraction: float = 0.25,
    knn_fn: KnnFn = faiss_knn,
) -> dict[str, float]:
    """Calibrate the rejection threshold on one draw of held-out SKUs, report it on another.

    Reporting on SKUs the threshold was not chosen with keeps the precision/recall honest.
    """
    calibration = calibrate_rejection(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, 0, knn_fn
    )
    top_score, unknown = _holdout_scores(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, 1, knn_fn
    )
    report = rejection_at(top_score, unknown, calibration["threshold"])
    return {
        "threshold": calibration["threshold"],
        "calibration_f1": calibration["f1"],
        "precision": report["precision"],
        "recall": report["recall"],
        "f1": report["f1"],
    }


def _holdout_scores(
    query_embeddings,
    query_skus,
    gallery_embeddings,
    gallery_skus,
    holdout_fraction: float,
    seed: int,
    knn_fn: KnnFn,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 SKU scores against the gallery minus a random set of SKUs, and which queries lost theirs."""
    query_skus = np.asarray(query_skus).astype(str)
    groups = SkuGroups.of(gallery_skus)
    if len(groups.skus) < 2:
        raise ValueError("calibration needs at least two SKUs in the gallery")
    rng = np.random.default_rng(seed)
    held_out = rng.choice(
        groups.skus,
        size=min(len(groups.skus) - 1, max(1, int(round(len(groups.skus) * holdout_fraction)))),
        replace=False,
    )
    kept_rows = ~np.isin(groups.skus, held_out)[groups.codes]
    queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    return _best_score_among(queries, gallery, kept_rows, knn_fn), np.isin(query_skus, held_out)


def _best_score_among(queries: np.ndarray, gallery: np.ndarray, allowed_rows: np.ndarray, knn_fn: KnnFn) -> np.ndarray:
    """Each query's best score over the allowed gallery rows, from nearest-neighbour searches that
    widen until an allowed row is among them (the gallery is not copied)."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    todo, k = np.arange(len(queries)), min(16, len(gallery))
    while todo.size:
        scores, rows = knn_fn(queries[todo], gallery, k)
        allowed = allowed_rows[rows]
        seen = allowed.any(axis=1)
        best[todo[seen]] = scores[seen, allowed[seen].argmax(axis=1)]
        if k == len(gallery):
            break
        todo, k = todo[~seen], min(len(gallery), k * 4)
    return best


def _best_threshold(top_score: np.ndarray, unknown: np.ndarray) -> float:
    candidates = np.unique(top_score)
    f1 = [rejection_at(top_score, unknown, t)["f1"] for t in candidates]
    best = int(np.argmax(f1))
    # Halfway to the next lower score: same decisions here, and a margin on both sides for
    # queries the threshold was not chosen on.
    return float((candidates[best] + candidates[best - 1]) / 2) if best > 0 else float(candidates[best])


def rejection_at(top_score: np.ndarray, unknown: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision and recall of rejecting every query whose top-1 score is below ``threshold``."""
    rejected = top_score < threshold
    true_rejections = float((rejected & unknown).sum())
    precision = true_rejections / rejected.sum() if rejected.any() else 1.0
    recall = true_rejections / unknown.sum() if unknown.any() else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def flatten_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"catalogue": {"top1": x}}`` -> ``{"catalogue.top1": x}`` for trackers and tags."""
    return {
        f"{protocol}.{name}": float(value) for protocol, values in metrics.items() for name, value in values.items()
    }


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write metrics as JSON (the DVC ``metrics`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def open_set_threshold(metrics: dict) -> float | None:
    """The calibrated open-set threshold (``reject_below``) in evaluation metrics, if they hold one."""
    value = metrics.get("open_set", {}).get("threshold")
    return None if value is None else float(value)


@dataclass
class GateDecision:
    """Whether a challenger may be promoted, and why (with numbers)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = self.reasons if not self.passed else self.checks
        return f"gate {verdict}: " + "; ".join(lines)


class GateFailedError(RuntimeError):
    """A challenger refused by the gate; ``.decision`` holds the numbers."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__(decision.summary())
        self.decision = decision


def gate(
    challenger: dict[str, dict[str, float]], champion: dict[str, dict[str, float]] | None, params: EvaluateParams
) -> GateDecision:
    """Apply the thresholds and the no-worse-than-champion rule to the gate protocol.

    Args:
        challenger: the new model's metrics (both protocols).
        champion: ``@champion``'s metrics on the same evaluation data, or None if there is none.
        params: thresholds, tolerance and which protocol to read.
    """
    protocol = params.gate_protocol
    if protocol not in challenger:
        return GateDecision(False, [f"no {protocol!r} metrics to gate on (empty gallery?)"])
    numbers = challenger[protocol]
    decision = GateDecision(True)
    for metric, minimum in (("top1", params.min_top1), ("top3", params.min_top3)):
        value = numbers.get(metric, 0.0)
        line = f"{protocol} {metric} {value:.4f} {'>=' if value >= minimum else '<'} threshold {minimum:.4f}"
        (decision.checks if value >= minimum else decision.reasons).append(line)
    if champion is not None and protocol in champion:
        for metric in ("top1", "top3"):
            value, best = numbers.get(metric, 0.0), champion[protocol].get(metric, 0.0)
            # A small epsilon so "exactly the tolerance worse" is not refused by float rounding.
            ok = value >= best - params.champion_tolerance - 1e-9
            line = (
                f"{protocol} {metric} {value:.4f} vs champion {best:.4f} "
                f"(tolerance {params.champion_tolerance:.4f}): {'not worse' if ok else 'worse'}"
            )
            (decision.checks if ok else decision.reasons).append(line)
    decision.passed = not decision.reasons
    return decision
