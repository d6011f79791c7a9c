"""Which FAISS index a catalogue gets, and how hard its searches look: chosen, then tuned and measured.

:func:`plan_index` follows autofaiss's rules (``get_optimal_index_keys_v2`` and
``get_optimal_nb_clusters`` in ``autofaiss/external/optimize.py``, after FAISS's wiki "Guidelines
to choose an index"), with three changes measured on near-tie catalogues (docs/decisions.md):

- exact search (``Flat``) up to ``index.exact_max_vectors`` (autofaiss: below 1,000 vectors);
- no graph index over the whole catalogue, autofaiss's first choice when memory allows: at a
  million near-tie vectors HNSW32 agreed with exact search on half the queries;
- ``SQ8`` codes between uncompressed IVF lists and PQ, and compressed codes re-ranked with the
  exact vectors.

IVF takes 2^round(log2(4·√N)) lists below ten million vectors (autofaiss's rule below a million;
it jumps to 16,384 at a million, where 4,096 lists met the targets) and autofaiss's 65,536 from ten
million (16,384 lists needed ``nprobe`` 1329 on 10M near-tie vectors), with an HNSW coarse quantizer
from 8,192 lists, and the largest codes that fit the memory budget. :func:`tune_search` then picks
the least ``nprobe`` / ``ef_search`` that reaches ``index.target_recall`` of SKUs against exact
search, as autofaiss's binary search does under a speed budget, and keeps the recall it measured.
Its queries are held-out catalogue vectors turned away from themselves to
``index.tune_query_cosine``: a photo is farther from its catalogue image than catalogue images are
from each other, and a catalogue vector queried as it is finds its own neighbourhood in the first
list it probes (recall 1.0 at ``nprobe`` 1 on a million near-tie vectors, where photo-like queries
reached 0.90).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from components.config import IndexParams
from components.index.catalogue_index import ROWS_PER_CHUNK, CatalogueIndex, ivf_layer, set_search_params

LOGGER = logging.getLogger(__name__)

# Share of the budget the index's own bytes may plan for; the rest is the serving process,
# the pages re-ranking reads and the inverted lists' slack.
BUDGET_SHARE = 0.75
ID_BYTES = 8  # an IVF list stores each row's int64 id beside its code
MAP_BYTES = 4  # the SKU map's int32 code per row; paths stay on disk until a row is shown
HNSW_QUANTIZER_FROM = 8192  # lists; below, a flat coarse quantizer is as fast
RECALL_KS = (1, 10)
TUNED_TOP_K = 10  # tuning aims at recall@10 of SKUs


@dataclass(frozen=True)
class IndexPlan:
    """An index type for a catalogue, with what it is expected to hold in memory and why."""

    factory: str
    rerank_factor: int
    resident_bytes: int
    reason: str
    rerank_reads: str = "mapped"  # how re-ranking reads exact rows: see rerank_reads()


def rerank_reads(n_vectors: int, dim: int, index_bytes: int, params: IndexParams) -> str:
    """``mapped`` where the index and every float16 row of ``vectors.npy`` fit the memory budget
    together, ``pread`` where they do not.

    Through the mapping a re-ranked row maps 64 KiB of its neighbours into the process (the
    kernel's fault-around), so the mapped rows grow towards the whole file; ``pread`` reads just
    the rows, about 4 µs each against 1 µs (160 rows a query), and RSS stays at the index.
    """
    return "mapped" if index_bytes + n_vectors * dim * 2 <= params.memory_budget_mb * 2**20 else "pread"


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: the power of two nearest 4·√N below ten million vectors
    (FAISS's rule), autofaiss's 65,536 from ten million and 2^17 from 300 million, and fewer
    where k-means would have under 39 rows per list (small catalogues)."""
    if n_vectors >= 300_000_000:
        rule = 2**17
    elif n_vectors >= 10_000_000:
        rule = 65_536
    else:
        rule = int(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n_vectors)))))
    return min(rule, 2 ** int(math.log2(max(1, n_vectors // 39))))


def plan_index(n_vectors: int, dim: int, params: IndexParams) -> IndexPlan:
    """The index ``index.factory: auto`` builds for ``n_vectors`` embeddings of ``dim``.

    Raises:
        ValueError: no index type fits ``index.memory_budget_mb``.
    """
    budget = params.memory_budget_mb * 2**20
    map_bytes = n_vectors * MAP_BYTES
    if n_vectors <= params.exact_max_vectors:
        size = n_vectors * 4 * dim + map_bytes
        return IndexPlan("Flat", 1, size, f"{n_vectors:,} vectors: exact search up to {params.exact_max_vectors:,}")
    nlist = ivf_lists(n_vectors)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    fixed = nlist * dim * 4 + (nlist * 32 * 2 * 4 if nlist >= HNSW_QUANTIZER_FROM else 0)
    for codes, code_bytes, rerank in _codes(dim, n_vectors, params.rerank_factor):
        size = n_vectors * (code_bytes + ID_BYTES) + map_bytes + fixed
        if size <= BUDGET_SHARE * budget:
            return IndexPlan(
                f"{coarse},{codes}",
                rerank,
                size,
                f"{n_vectors:,} vectors of {dim}: {codes} codes are the largest whose {size / 2**20:,.0f} MiB fit "
                f"{BUDGET_SHARE:.0%} of the {params.memory_budget_mb:,} MiB budget",
                rerank_reads(n_vectors, dim, size, params) if rerank > 1 else "mapped",
            )
    raise ValueError(
        f"no index of {n_vectors:,} vectors of {dim} fits index.memory_budget_mb={params.memory_budget_mb}; "
        "raise the budget or serve the catalogue from Milvus (index.backend)"
    )


def _codes(dim: int, n_vectors: int, rerank_factor: int):
    """(factory codes, bytes per vector, re-rank factor), largest first."""
    if n_vectors < 1_000_000:  # autofaiss keeps uncompressed IVF lists below a million vectors
        yield "Flat", 4 * dim, 1
    yield "SQ8", dim, rerank_factor
    for m in (dim // 2, dim // 4, dim // 8, dim // 16):
        if m >= 4 and dim % m == 0:
            yield f"PQ{m}", m, rerank_factor


def photo_like_queries(catalogue: CatalogueIndex, sample_size: int, cosine: float, seed: int = 0) -> np.ndarray:
    """Held-out catalogue vectors, each turned in a random direction to ``cosine`` with itself."""
    n = len(catalogue)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(sample_size, n), replace=False))
    held_out = np.asarray(catalogue.vectors[rows], dtype=np.float32)
    held_out /= np.linalg.norm(held_out, axis=1, keepdims=True)
    away = rng.standard_normal(held_out.shape).astype(np.float32)
    away -= np.sum(away * held_out, axis=1, keepdims=True) * held_out  # orthogonal to its vector
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    return np.ascontiguousarray(cosine * held_out + math.sqrt(1 - cosine**2) * away)


@dataclass
class _GroundTruth:
    queries: np.ndarray
    top_skus: list[list[int]]  # exact top SKU codes per query


def _exact(catalogue: CatalogueIndex, queries: np.ndarray, want: int) -> _GroundTruth:
    from faiss import METRIC_INNER_PRODUCT
    from faiss.contrib.exhaustive_search import knn_ground_truth

    vectors = catalogue.vectors
    blocks = (
        np.ascontiguousarray(vectors[start : start + ROWS_PER_CHUNK], dtype=np.float32)
        for start in range(0, len(vectors), ROWS_PER_CHUNK)
    )
    _, neighbours = knn_ground_truth(queries, blocks, want, metric_type=METRIC_INNER_PRODUCT)
    return _GroundTruth(queries, _top_sku_codes(catalogue, neighbours, TUNED_TOP_K))


def _top_sku_codes(catalogue: CatalogueIndex, neighbours: np.ndarray, top_k: int) -> list[list[int]]:
    codes = catalogue.items.sku_codes
    answers = []
    for found in neighbours:
        skus: list[int] = []
        for row in found:
            if row < 0:
                continue
            code = int(codes[row])
            if code not in skus:
                skus.append(code)
                if len(skus) == top_k:
                    break
        answers.append(skus)
    return answers


def _recall(catalogue: CatalogueIndex, truth: _GroundTruth, want: int) -> dict[str, float]:
    _, found = catalogue.search_rows(truth.queries, want)
    approximate = _top_sku_codes(catalogue, found, TUNED_TOP_K)
    recall = {}
    for k in RECALL_KS:
        shares = [len(set(a[:k]) & set(e[:k])) / len(e[:k]) for a, e in zip(approximate, truth.top_skus) if e]
        recall[f"recall_at_{k}"] = round(float(np.mean(shares)), 4) if shares else 1.0
    return recall


def measure_recall(
    catalogue: CatalogueIndex, sample_size: int = 1000, query_cosine: float = 0.7, seed: int = 0
) -> dict[str, float]:
    """Recall@1 and @10 of SKUs against exact search, over photo-like queries (:func:`photo_like_queries`)."""
    if catalogue.vectors is None:
        raise ValueError("the index keeps no exact vectors to measure recall against; rebuild it")
    want = 4 * TUNED_TOP_K  # what CatalogueIndex.search asks for, for ten SKUs
    truth = _exact(catalogue, photo_like_queries(catalogue, sample_size, query_cosine, seed), want)
    return {**_recall(catalogue, truth, want), "recall_sample": len(truth.queries)}


def tune_search(
    catalogue: CatalogueIndex, target_recall: float, sample_size: int = 1000, query_cosine: float = 0.7, seed: int = 0
) -> dict:
    """Set the least ``nprobe`` (IVF) or ``ef_search`` (HNSW) whose recall@10 reaches ``target_recall``.

    Visiting more never lowers recall, so the search doubles the setting until the target is met
    and then bisects back; the least work is the lowest latency. Where even a full visit falls
    short, the widest setting is kept and a warning logged. The chosen setting and the recall it
    measured go into ``catalogue.meta``.

    Returns:
        ``recall_at_1``, ``recall_at_10``, ``recall_sample``, ``recall_target`` and the setting.
    """
    if catalogue.vectors is None:
        raise ValueError("the index keeps no exact vectors to tune against; rebuild it")
    want = 4 * TUNED_TOP_K
    truth = _exact(catalogue, photo_like_queries(catalogue, sample_size, query_cosine, seed), want)
    ivf = ivf_layer(catalogue.index)
    if ivf is not None:
        setting, highest = "nprobe", int(ivf.nlist)
    elif "HNSW" in catalogue.meta.get("factory", ""):
        setting, highest = "ef_search", 4096
    else:  # Flat and other exhaustive codes: nothing to tune
        recall = _recall(catalogue, truth, want)
        catalogue.meta.update(recall, recall_sample=len(truth.queries))
        return {**recall, "recall_sample": len(truth.queries)}

    measured: dict[int, dict[str, float]] = {}

    def reaches(value: int) -> bool:
        _apply(catalogue, setting, value)
        measured[value] = _recall(catalogue, truth, want)
        return measured[value]["recall_at_10"] >= target_recall

    low, value = 0, 1
    while value < highest and not reaches(value):
        low, value = value, min(2 * value, highest)
    if value == highest and not reaches(value):
        LOGGER.warning(
            "recall@10 %.3f short of the target %.3f even at %s=%d",
            measured[value]["recall_at_10"],
            target_recall,
            setting,
            value,
        )
    else:
        while value - low > 1:  # the least passing value lies in (low, value]
            middle = (low + value) // 2
            low, value = (low, middle) if reaches(middle) else (middle, value)
    _apply(catalogue, setting, value)
    catalogue.meta.update(measured[value], recall_sample=len(truth.queries), recall_target=target_recall)
    LOGGER.info("%s=%d: recall@1 %.3f, recall@10 %.3f", setting, value, *measured[value].values())
    return {**measured[value], "recall_sample": len(truth.queries), "recall_target": target_recall, setting: value}


def _apply(catalogue: CatalogueIndex, setting: str, value: int) -> None:
    catalogue.meta[setting] = int(value)
    set_search_params(catalogue.index, catalogue.meta.get("nprobe"), catalogue.meta.get("ef_search"))
