"""index.factory auto, tuning to a recall target, re-ranking, and adding and removing rows."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import IndexParams
from components.index import build_index, load_index, save_index, with_rows, without_skus
from components.index.catalogue_map import CatalogueMap
from components.index.indexing import index_embeddings
from components.index.policy import ivf_lists, measure_recall, plan_index, tune_search


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def near_ties():
    """4,000 vectors: families of 20 SKUs at cosine about 0.85, two images per SKU."""
    rng = np.random.default_rng(0)
    families = unit(rng.standard_normal((100, 32)))
    skus = unit(np.repeat(families, 20, axis=0) + 0.4 * unit(rng.standard_normal((2000, 32))))
    vectors = unit(np.repeat(skus, 2, axis=0) + 0.2 * unit(rng.standard_normal((4000, 32))))
    names = [f"sku-{i // 2}" for i in range(4000)]
    return vectors, CatalogueMap.from_lists(names, [f"img/{i}.jpg" for i in range(4000)])


def test_list_counts_follow_four_root_n_then_autofaiss_bands_from_ten_million():
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(9_999_999) == 16_384
    assert ivf_lists(10_000_000) == 65_536 and ivf_lists(299_999_999) == 65_536 and ivf_lists(300_000_000) == 2**17
    assert ivf_lists(10_000) == 256  # 4·√N (512) would leave k-means under 39 rows a list


def test_a_graph_quantized_index_trains_by_two_level_k_means_and_finds_what_exact_search_finds(near_ties):
    import faiss

    vectors, items = near_ties
    catalogue = build_index(vectors, items, factory="IVF64_HNSW32,SQ8", use_gpu="never", rerank_factor=4, seed=1)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(catalogue.index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.ntotal == 64
    lists = faiss.extract_index_ivf(catalogue.index).invlists
    sizes = np.array([lists.list_size(i) for i in range(64)])
    assert sizes.sum() == len(vectors) and sizes.max() < 4 * len(vectors) / 64  # rows spread over the lists
    reached = tune_search(catalogue, 0.95, 300)
    assert reached["recall_at_10"] >= 0.95 and reached["nprobe"] < 64


def test_auto_keeps_exact_search_for_small_catalogues_and_compresses_to_fit_the_budget():
    params = IndexParams()
    assert plan_index(10_000, 256, params).factory == "Flat"
    # A million: uncompressed lists would take 1 GiB of the 1.5 GiB budget's 75%; SQ8 codes fit.
    million = plan_index(1_000_000, 256, params)
    assert million.factory == f"IVF{ivf_lists(1_000_000)},SQ8" == "IVF4096,SQ8" and million.rerank_factor == 4
    below = plan_index(999_999, 256, params)
    assert below.factory == "IVF4096,Flat" and below.rerank_factor == 1
    ten_million = plan_index(10_000_000, 256, params)
    assert ten_million.factory == "IVF65536_HNSW32,PQ64" and ten_million.rerank_factor == 4
    assert ten_million.resident_bytes <= 0.75 * params.memory_budget_mb * 2**20
    # Re-ranking reads its rows through the mapping where they fit the budget beside the index
    # (1M: 0.5 GiB of float16 rows), with pread where they do not (10M: 4.8 GiB).
    assert (million.rerank_reads, ten_million.rerank_reads, below.rerank_reads) == ("mapped", "pread", "mapped")
    # A larger budget buys larger codes; one too small for any code is refused with what to do.
    assert plan_index(10_000_000, 256, IndexParams(memory_budget_mb=8192)).factory == "IVF65536_HNSW32,SQ8"
    with pytest.raises(ValueError, match="memory_budget_mb"):
        plan_index(10_000_000, 256, IndexParams(memory_budget_mb=64))


def test_tuning_picks_the_least_nprobe_that_reaches_the_target(near_ties):
    vectors, items = near_ties
    catalogue = build_index(vectors, items, factory="IVF64,Flat", use_gpu="never", nprobe=1)
    result = tune_search(catalogue, 0.95, sample_size=300, query_cosine=0.7)
    chosen = result["nprobe"]
    assert result["recall_at_10"] >= 0.95 and catalogue.meta["nprobe"] == chosen
    assert catalogue.meta["recall_at_10"] == result["recall_at_10"] and catalogue.meta["recall_target"] == 0.95
    # One list fewer falls short: the least work that reaches the target.
    if chosen > 1:
        catalogue.meta["nprobe"] = chosen - 1
        catalogue.index.nprobe = chosen - 1
        assert measure_recall(catalogue, 300, 0.7)["recall_at_10"] < 0.95
    # The setting and recall travel with the index.
    catalogue.items = items
    reloaded = _round_trip(catalogue)
    assert reloaded.index.nprobe == catalogue.index.nprobe and reloaded.meta["recall_at_10"] == result["recall_at_10"]


def _round_trip(catalogue, folder=None):
    import tempfile

    folder = folder or tempfile.mkdtemp()
    save_index(catalogue, folder)
    return load_index(folder)


def test_reranking_with_the_exact_vectors_recovers_what_compressed_codes_lose(near_ties):
    vectors, items = near_ties
    # 4-bit codes: coarse enough to lose near-ties, and quick to train.
    reranked = build_index(vectors, items, factory="IVF16,PQ4x4", use_gpu="never", nprobe=16, rerank_factor=8)
    reranked.meta["rerank_factor"] = 1
    plain = measure_recall(reranked, 300, 0.7)["recall_at_10"]
    reranked.meta["rerank_factor"] = 8
    better = measure_recall(reranked, 300, 0.7)["recall_at_10"]
    assert better > plain + 0.2 and better >= 0.9
    # Re-ranked scores are exact cosines (of the float16 vectors), best first.
    hits = reranked.search(vectors[:1], 5)[0]
    assert hits[0][0] == items.sku(0) and abs(hits[0][1] - 1.0) < 1e-3
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)


def test_auto_index_of_a_catalogue_records_its_choice_and_recall(near_ties):
    vectors, items = near_ties
    catalogue = index_embeddings(vectors, items, IndexParams(exact_max_vectors=1000, tune_sample=300, use_gpu="never"))
    # 4·√N lists would be 256; 4,000 rows train at most 64 lists (39 rows each), a power of two.
    assert catalogue.meta["factory"] == "IVF64,Flat" and "exact search" not in catalogue.meta["factory_reason"]
    assert catalogue.meta["recall_at_10"] >= IndexParams().target_recall
    exact = index_embeddings(vectors, items, IndexParams(use_gpu="never"))
    assert exact.meta["factory"] == "Flat" and exact.meta["recall_at_10"] == 1.0


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "HNSW16"])
def test_rows_added_and_removed_keep_every_other_row_as_it_was(near_ties, factory, tmp_path):
    vectors, items = near_ties
    built = build_index(vectors, items, factory=factory, use_gpu="never", nprobe=16)
    before = _round_trip(built, tmp_path / "v1")
    writable = load_index(tmp_path / "v1", writable=True)
    added = with_rows(writable, vectors[:2] * 0 + unit(np.ones((2, 32))), ["new", "new"], ["n/0.jpg", "n/1.jpg"])
    assert len(added) == 4002 and added.search(unit(np.ones((1, 32))), 1)[0][0][0] == "new"
    assert np.array_equal(np.asarray(added.vectors[:4000]), np.asarray(before.vectors))
    with pytest.raises(ValueError, match="indexed already"):
        with_rows(added, vectors[:1], ["x"], ["img/3.jpg"])
    removed, count = without_skus(added, ["sku-0", "new"])
    assert count == 4 and len(removed) == 3998
    assert list(removed.items.rows()) == list(before.items.rows())[2:]
    # Row numbers stay those of the map: every kept row still finds its own SKU first.
    for row in (0, 1000, 3997):
        assert removed.search(np.asarray(removed.vectors[row], np.float32), 1)[0][0][0] == removed.items.sku(row)
    with pytest.raises(ValueError, match="not in the index: sku-0"):
        without_skus(removed, ["sku-0"])


def test_refused_changes_and_settings_say_why(near_ties):
    vectors, items = near_ties
    built = build_index(vectors[:4], CatalogueMap.from_lists(["a", "a", "b", "b"], list("wxyz")), use_gpu="never")
    with pytest.raises(ValueError, match="remove every row"):
        without_skus(built, ["a", "b"])
    with pytest.raises(ValueError, match="expected \\(n, 32\\) embeddings"):
        with_rows(built, np.zeros((1, 8), np.float32), ["c"], ["v"])
    with pytest.raises(ValueError, match="index.backend milvus needs index.milvus_uri"):
        IndexParams(backend="milvus")
