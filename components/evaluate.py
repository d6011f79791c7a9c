"""Retrieval metrics for both protocols, and the promotion gate.

Protocols (DESIGN.md):

- ``nn``: gallery = labelled training photos, queries = a held-out split; the prediction is
  the label of the nearest neighbours (the seed posts' RP2K protocol).
- ``catalogue``: gallery = the catalogue images only, queries = the same natural photos;
  the real product-matching setting.

Top-k is counted over distinct SKUs: gallery hits are ranked by similarity and a SKU's rank is
that of its best image, so k neighbours of one SKU never crowd out the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import EvaluateParams
from components.data import select
from components.leaks import find_leaks

LOGGER = logging.getLogger(__name__)

# (queries, gallery) -> similarity matrix; injected so tests can swap FAISS for brute force.
SimilarityFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def faiss_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Inner products of every query with every gallery row, by an exact FAISS search."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), gallery.shape[0])
    similarity = np.empty_like(scores)
    np.put_along_axis(similarity, ids, scores, axis=1)
    return similarity


def brute_force_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Inner products by a plain matrix product (the reference FAISS is checked against)."""
    return queries.astype(np.float32) @ gallery.astype(np.float32).T


def sku_scores(similarity: np.ndarray, gallery_skus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate image similarities into SKU similarities (the best image of each SKU).

    Returns:
        ``(skus, scores)``: the distinct gallery SKUs and a ``(n_queries, n_skus)`` matrix.
    """
    skus, inverse = np.unique(gallery_skus, return_inverse=True)
    scores = np.full((similarity.shape[0], len(skus)), -np.inf, dtype=np.float32)
    for column, sku_index in enumerate(inverse):
        np.maximum(scores[:, sku_index], similarity[:, column], out=scores[:, sku_index])
    return skus, scores


def retrieval_metrics(
    query_embeddings: np.ndarray,
    query_skus: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_skus: np.ndarray,
    ks: tuple[int, ...] | list[int] = (1, 3, 5),
    similarity_fn: SimilarityFn = faiss_similarity,
) -> dict[str, float]:
    """Top-k over distinct SKUs, mean delta similarity and mAP of one query set on one gallery.

    Queries whose SKU has no gallery image cannot be matched and are left out (counted in
    ``queries_without_gallery_sku``).

    Returns:
        ``top{k}`` for each k, ``delta_similarity``, ``map``, ``queries``,
        ``queries_without_gallery_sku``.
    """
    metrics, _ = retrieval_metrics_by_sku(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, ks, similarity_fn
    )
    return metrics


def retrieval_metrics_by_sku(
    query_embeddings: np.ndarray,
    query_skus: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_skus: np.ndarray,
    ks: tuple[int, ...] | list[int] = (1, 3, 5),
    similarity_fn: SimilarityFn = faiss_similarity,
) -> tuple[dict[str, float], pd.DataFrame]:
    """:func:`retrieval_metrics`, and per query SKU its matchable queries and their top-1.

    Returns:
        ``(metrics, by_sku)``; ``by_sku`` has columns ``sku_id``, ``queries``, ``top1``.
    """
    query_skus = np.asarray(query_skus).astype(str)
    gallery_skus = np.asarray(gallery_skus).astype(str)
    matchable = np.isin(query_skus, gallery_skus)
    result: dict[str, float] = {"queries": int(matchable.sum()), "queries_without_gallery_sku": int((~matchable).sum())}
    if not matchable.any():
        raise ValueError("no query SKU appears in the gallery; nothing can be evaluated")
    query_embeddings, query_skus = query_embeddings[matchable], query_skus[matchable]
    similarity = similarity_fn(query_embeddings, gallery_embeddings)

    skus, scores = sku_scores(similarity, gallery_skus)
    true_column = np.searchsorted(skus, query_skus)
    true_score = scores[np.arange(len(query_skus)), true_column]
    # Rank of the true SKU among distinct SKUs (0 = first); ties count against the model.
    rank = (scores > true_score[:, None]).sum(axis=1) + ((scores == true_score[:, None]).sum(axis=1) - 1)
    for k in ks:
        result[f"top{k}"] = float((rank < k).mean())
    by_sku = (
        pd.DataFrame({"sku_id": query_skus, "hit": rank < 1})
        .groupby("sku_id", sort=True)["hit"]
        .agg(queries="size", top1="mean")
        .reset_index()
    )

    # Delta similarity: similarity to the true SKU minus the mean similarity to all others.
    others = scores.copy()
    others[np.arange(len(query_skus)), true_column] = np.nan
    result["delta_similarity"] = float(np.mean(true_score - np.nanmean(others, axis=1))) if len(skus) > 1 else 0.0

    # mAP over gallery images: every image of the query's SKU is relevant.
    order = np.argsort(-similarity, axis=1, kind="stable")
    relevant = gallery_skus[order] == query_skus[:, None]
    hits = np.cumsum(relevant, axis=1)
    precision_at_hit = np.where(relevant, hits / np.arange(1, relevant.shape[1] + 1), 0.0)
    result["map"] = float(np.mean(precision_at_hit.sum(axis=1) / relevant.sum(axis=1)))
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


def evaluate_embeddings(
    embeddings: dict[str, np.ndarray],
    sets: ProtocolSets,
    ks: list[int],
    similarity_fn: SimilarityFn = faiss_similarity,
    query_embeddings: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of both protocols from embeddings keyed by image path.

    ``query_embeddings``, when given, holds the queries' embeddings (embedded as queries, see
    :func:`components.model.embed_batch`); ``embeddings`` then needs only the gallery images.
    """
    return evaluate_embeddings_by_sku(embeddings, sets, ks, similarity_fn, query_embeddings).metrics


def evaluate_embeddings_by_sku(
    embeddings: dict[str, np.ndarray],
    sets: ProtocolSets,
    ks: list[int],
    similarity_fn: SimilarityFn = faiss_similarity,
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
        query_vectors = stack(queries, query_embeddings)
        metrics[protocol], skus = retrieval_metrics_by_sku(
            query_vectors, queries["sku_id"].to_numpy(), stack(gallery), gallery["sku_id"].to_numpy(), ks, similarity_fn
        )
        by_sku.append(skus.assign(protocol=protocol))
        metrics[protocol]["leaked_queries"] = len(leaked)
        if protocol == "catalogue" and gallery["sku_id"].nunique() >= 2:
            metrics["open_set"] = open_set_metrics(
                query_vectors,
                queries["sku_id"].to_numpy(),
                stack(gallery),
                gallery["sku_id"].to_numpy(),
                similarity_fn=similarity_fn,
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
    similarity_fn: SimilarityFn = faiss_similarity,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Embed the images both protocols need (each once) and compute their metrics.

    Returns:
        ``{"nn": {...}, "catalogue": {...}}`` as from :func:`retrieval_metrics`.
    """
    return evaluate_encoder_by_sku(
        encoder, preprocess, manifest, query_split, train_split, params, device, similarity_fn, progress
    ).metrics


def evaluate_encoder_by_sku(
    encoder,
    preprocess,
    manifest: pd.DataFrame,
    query_split: str,
    train_split: str,
    params: EvaluateParams,
    device=None,
    similarity_fn: SimilarityFn = faiss_similarity,
    progress: bool = False,
) -> Evaluation:
    """:func:`evaluate_encoder`, with each protocol's top-1 per query SKU."""
    sets = protocol_sets(manifest, query_split, train_split, params.leak_max_distance)
    gallery, queries = embed_protocol_sets(encoder, preprocess, sets, params.batch_size, device, progress)
    return evaluate_embeddings_by_sku(gallery, sets, params.ks, similarity_fn, query_embeddings=queries)


def embed_protocol_sets(
    encoder, preprocess, sets: ProtocolSets, batch_size: int, device=None, progress: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(gallery, queries)`` embeddings keyed by path: every gallery image once, the queries as queries."""
    from components.model import embed_images

    gallery_paths = sorted(set().union(*(g["image_path"] for g in sets.galleries.values())))
    query_paths = sorted(set(sets.queries["image_path"]))
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
    similarity_fn: SimilarityFn = faiss_similarity,
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
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, seed, similarity_fn
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
    similarity_fn: SimilarityFn = faiss_similarity,
) -> dict[str, float]:
    """Calibrate the rejection threshold on one draw of held-out SKUs, report it on another.

    Reporting on SKUs the threshold was not chosen with keeps the precision/recall honest.
    """
    calibration = calibrate_rejection(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, 0, similarity_fn
    )
    top_score, unknown = _holdout_scores(
        query_embeddings, query_skus, gallery_embeddings, gallery_skus, holdout_fraction, 1, similarity_fn
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
    similarity_fn: SimilarityFn,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 SKU scores against the gallery minus a random set of SKUs, and which queries lost theirs."""
    query_skus = np.asarray(query_skus).astype(str)
    gallery_skus = np.asarray(gallery_skus).astype(str)
    skus = np.unique(gallery_skus)
    if len(skus) < 2:
        raise ValueError("calibration needs at least two SKUs in the gallery")
    rng = np.random.default_rng(seed)
    held_out = rng.choice(
        skus, size=min(len(skus) - 1, max(1, int(round(len(skus) * holdout_fraction)))), replace=False
    )
    kept = ~np.isin(gallery_skus, held_out)
    _, scores = sku_scores(similarity_fn(query_embeddings, gallery_embeddings[kept]), gallery_skus[kept])
    return scores.max(axis=1), np.isin(query_skus, held_out)


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
