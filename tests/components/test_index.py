"""The FAISS catalogue index: round trip, distinct-SKU search, verification on load, factories."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from components.index.catalogue_index import (
    INDEX_FILE,
    ITEMS_FILE,
    META_FILE,
    VECTORS_FILE,
    CatalogueIndex,
    IndexMismatchError,
    build_index,
    load_index,
    save_index,
)
from components.index.catalogue_map import LEGACY_ITEMS_FILE, CatalogueMap

DIM = 16


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def catalogue():
    """12 SKUs with 5 catalogue images each, clustered around a per-SKU centre."""
    rng = np.random.default_rng(0)
    centres = unit_rows(rng, 12)
    sku_ids, paths, rows = [], [], []
    for s, centre in enumerate(centres):
        for i in range(5):
            row = centre + 0.15 * rng.normal(size=DIM)
            rows.append(row / np.linalg.norm(row))
            sku_ids.append(f"sku-{s:02d}")
            paths.append(f"/catalogue/sku-{s:02d}/{i}.jpg")
    embeddings = np.array(rows, dtype=np.float32)
    queries = centres + 0.1 * rng.normal(size=centres.shape)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return embeddings, sku_ids, paths, queries


def brute_force_top_skus(embeddings, sku_ids, query, top_k):
    """Reference: best image per SKU by a plain matrix product, SKUs sorted by that score."""
    scores = embeddings @ query
    best: dict[str, float] = {}
    for sku, score in zip(sku_ids, scores):
        best[sku] = max(best.get(sku, -np.inf), float(score))
    return sorted(best.items(), key=lambda item: -item[1])[:top_k]


@pytest.fixture
def saved(tmp_path, catalogue):
    embeddings, sku_ids, paths, _ = catalogue
    index = build_index(
        embeddings,
        sku_ids,
        paths,
        "Flat",
        use_gpu="never",
        meta={"model_name": "skumatch-encoder", "model_version": "3"},
    )
    folder = tmp_path / "index"
    checksum = save_index(index, folder)
    return folder, checksum, index


def test_build_records_facts(catalogue):
    embeddings, sku_ids, paths, _ = catalogue
    index = build_index(embeddings, sku_ids, paths, use_gpu="never", meta={"model_version": "7"})
    assert isinstance(index, CatalogueIndex)
    assert index.dim == DIM
    assert index.meta == {
        "factory": "Flat",
        "nprobe": 16,
        "ef_search": 128,
        "rerank_factor": 1,
        "dim": DIM,
        "ntotal": 60,
        "model_version": "7",
    }
    # The exact vectors are kept as float16, for re-ranking, recall and changes.
    assert index.vectors.dtype == np.float16 and np.allclose(index.vectors, embeddings, atol=1e-3)
    assert index.items.sku_ids() == sku_ids and [path for _, path in index.items.rows()] == paths


def test_search_returns_distinct_skus_best_first(catalogue):
    embeddings, sku_ids, paths, queries = catalogue
    index = build_index(embeddings, sku_ids, paths, use_gpu="never")
    results = index.search(queries, top_k=5)
    assert len(results) == len(queries)
    for q, (query, result) in enumerate(zip(queries, results)):
        skus = [sku for sku, _ in result]
        scores = [score for _, score in result]
        assert len(result) == 5
        assert len(set(skus)) == 5  # five images of one SKU never take several places
        assert scores == sorted(scores, reverse=True)
        assert skus[0] == f"sku-{q:02d}"
        # Same SKUs and scores as the brute-force reference.
        expected = brute_force_top_skus(embeddings, sku_ids, query, 5)
        assert skus == [sku for sku, _ in expected]
        np.testing.assert_allclose(scores, [score for _, score in expected], atol=1e-5)


def test_search_widens_until_enough_distinct_skus():
    # 40 images of one SKU sit closest to the query; the 2nd and 3rd SKUs lie beyond the first
    # top_k * 4 neighbours, so search must widen its request.
    rng = np.random.default_rng(1)
    query = np.zeros(DIM, dtype=np.float32)
    query[0] = 1.0
    near = np.tile(query, (40, 1)) + 0.01 * rng.normal(size=(40, DIM))
    others = np.zeros((2, DIM))
    others[0, :2] = [0.5, 0.8]
    others[1, :2] = [0.2, 0.9]
    rows = np.vstack([near, others])
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    skus = ["many"] * 40 + ["second", "third"]
    index = build_index(rows, skus, [f"{i}.jpg" for i in range(42)], use_gpu="never")
    result = index.search(query, top_k=3)[0]
    assert [sku for sku, _ in result] == ["many", "second", "third"]
    # Fewer SKUs than asked: all of them, no padding.
    assert [sku for sku, _ in index.search(query, top_k=10)[0]] == ["many", "second", "third"]


def test_round_trip_gives_the_same_search_results(saved, catalogue):
    folder, checksum, built = saved
    queries = catalogue[3]
    assert sorted(p.name for p in folder.iterdir()) == sorted([INDEX_FILE, ITEMS_FILE, VECTORS_FILE, META_FILE])
    loaded = load_index(folder, expected_checksum=checksum, expected_model_version="3")
    assert list(loaded.items.rows()) == list(built.items.rows())
    assert loaded.meta["checksum"] == checksum
    assert loaded.meta["model_version"] == "3"
    assert loaded.search(queries, 4) == built.search(queries, 4)


def test_checksum_is_sha256_of_the_data_files(saved):
    folder, checksum, _ = saved
    assert len(checksum) == 64 and int(checksum, 16) >= 0
    assert json.loads((folder / META_FILE).read_text())["checksum"] == checksum
    # Saving the same index again gives the same checksum.
    _, _, built = saved
    assert save_index(built, folder.parent / "again") == checksum


def test_streamed_checksum_is_the_sha256_of_the_whole_files_and_the_meta(saved, monkeypatch):
    import hashlib

    import components.index.catalogue_index as index_lib

    folder, checksum, _ = saved
    meta = json.loads((folder / META_FILE).read_text())
    whole = hashlib.sha256(b"".join((folder / name).read_bytes() for name in (INDEX_FILE, ITEMS_FILE, VECTORS_FILE)))
    whole.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    assert checksum == whole.hexdigest()
    # Read in chunks smaller than the files: the same digest, so indexes saved before still verify.
    monkeypatch.setattr(index_lib, "CHECKSUM_CHUNK", 7)
    assert load_index(folder, expected_checksum=checksum).meta["checksum"] == checksum


@pytest.mark.parametrize("factory", ["Flat", "IVF4,SQ8", "HNSW16"])
def test_a_loaded_index_maps_its_file_and_searches_as_built(catalogue, tmp_path, factory):
    from pathlib import Path

    embeddings, sku_ids, paths, queries = catalogue
    built = build_index(embeddings, sku_ids, paths, factory, "never", {"model_version": "1"})
    save_index(built, tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert loaded.search(queries, 4) == built.search(queries, 4)
    # Memory-mapped (workers share its pages): the file is among this process's mappings.
    mapped = Path("/proc/self/maps").read_text()
    assert str((tmp_path / "index" / INDEX_FILE).resolve()) in mapped


def test_a_loaded_index_re_ranks_with_rows_read_by_pread_not_through_the_mapping(catalogue, tmp_path):
    embeddings, sku_ids, paths, queries = catalogue
    mapped = build_index(embeddings, sku_ids, paths, "IVF4,SQ4", "never", {"model_version": "1"}, rerank_factor=4)
    save_index(mapped, tmp_path / "mapped")
    assert load_index(tmp_path / "mapped").row_reader is None  # rows that fit the budget: read through the mapping
    meta = {"model_version": "1", "rerank_reads": "pread"}  # policy.rerank_reads: rows beyond the budget
    built = build_index(embeddings, sku_ids, paths, "IVF4,SQ4", "never", meta, rerank_factor=4)
    save_index(built, tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    stored = np.load(tmp_path / "index" / VECTORS_FILE)
    rows = np.array([[5, 0], [59, 5]])
    assert np.array_equal(loaded.row_reader.take(rows), stored[rows].astype(np.float32))
    with pytest.raises(IndexError, match="outside"):
        loaded.row_reader.take(np.array([60]))

    class Unmapped:  # re-ranking must not fault pages of the mapping in (fault-around maps 16 a row)
        shape, dtype = stored.shape, stored.dtype

        def __getitem__(self, rows):
            raise AssertionError("re-ranking read the vectors through their mapping")

    loaded.vectors = Unmapped()
    assert loaded.search(queries, 4) == built.search(queries, 4)
    assert np.array_equal(loaded.stored_vector(7), stored[7].astype(np.float32))
    os.truncate(tmp_path / "index" / VECTORS_FILE, os.path.getsize(tmp_path / "index" / VECTORS_FILE) - 1)
    with pytest.raises(OSError, match="truncated"):
        loaded.row_reader.take(np.array([0, 59]))


def test_model_version_compares_as_string(saved):
    folder, _, _ = saved
    assert load_index(folder, expected_model_version=3).meta["model_version"] == "3"


def test_flipped_byte_in_index_is_corrupt(saved):
    folder, checksum, _ = saved
    data = bytearray((folder / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(IndexMismatchError, match="corrupt"):
        load_index(folder)
    with pytest.raises(IndexMismatchError, match="corrupt"):
        load_index(folder, expected_checksum=checksum)


def test_edited_items_are_corrupt(saved):
    folder, _, _ = saved
    rows = list(CatalogueMap.read(folder).rows())
    rows[0], rows[-1] = rows[-1], rows[0]
    CatalogueMap.from_lists([sku for sku, _ in rows], [path for _, path in rows]).write(folder / ITEMS_FILE)
    with pytest.raises(IndexMismatchError, match="corrupt"):
        load_index(folder)


def test_the_map_is_columnar_and_memory_mapped(saved):
    from pathlib import Path

    folder, _, built = saved
    items = CatalogueMap.read(folder)
    assert (len(items), items.sku_count) == (60, 12)
    assert items.sku(7) == built.items.sku(7) == "sku-01" and items.image_path(7) == "/catalogue/sku-01/2.jpg"
    assert items.sku_codes.dtype == np.int32 and not items.sku_codes.flags.owndata  # a view of the mapped file
    assert str((folder / ITEMS_FILE).resolve()) in Path("/proc/self/maps").read_text()


def test_an_index_saved_with_the_older_json_map_still_loads_and_verifies(saved):
    import hashlib

    folder, _, built = saved
    rows = list(built.items.rows())
    (folder / ITEMS_FILE).unlink()
    (folder / VECTORS_FILE).unlink()  # kept since; older folders have none
    (folder / LEGACY_ITEMS_FILE).write_text(
        json.dumps({"sku_ids": [sku for sku, _ in rows], "image_paths": [path for _, path in rows]})
    )
    # The checksum as saves before the columnar map computed it: over index.faiss and items.json.
    meta = json.loads((folder / META_FILE).read_text())
    digest = hashlib.sha256((folder / INDEX_FILE).read_bytes() + (folder / LEGACY_ITEMS_FILE).read_bytes())
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    meta["checksum"] = digest.hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))
    loaded = load_index(folder, expected_checksum=meta["checksum"])
    assert list(loaded.items.rows()) == rows
    # Saved again, it is columnar, and the old file is gone.
    save_index(loaded, folder)
    assert (folder / ITEMS_FILE).exists() and not (folder / LEGACY_ITEMS_FILE).exists()
    assert list(load_index(folder).items.rows()) == rows


def test_expected_checksum_mismatch_is_refused(saved):
    folder, checksum, _ = saved
    other = "0" * 64
    with pytest.raises(IndexMismatchError) as info:
        load_index(folder, expected_checksum=other)
    assert checksum in str(info.value) and other in str(info.value)


def test_expected_model_version_mismatch_is_refused(saved):
    folder, checksum, _ = saved
    with pytest.raises(IndexMismatchError, match=r"model version 3.*served version 4"):
        load_index(folder, expected_checksum=checksum, expected_model_version="4")


def test_index_without_model_version_is_refused_when_one_is_expected(tmp_path, catalogue):
    embeddings, sku_ids, paths, _ = catalogue
    folder = tmp_path / "index"
    save_index(build_index(embeddings, sku_ids, paths, use_gpu="never"), folder)
    assert load_index(folder).meta.get("model_version") is None
    with pytest.raises(IndexMismatchError):
        load_index(folder, expected_model_version="1")


@pytest.mark.parametrize("missing", [INDEX_FILE, ITEMS_FILE, META_FILE])
def test_missing_file_is_refused(saved, missing):
    folder, _, _ = saved
    (folder / missing).unlink()
    with pytest.raises(IndexMismatchError, match=f"lacks {missing}"):
        load_index(folder)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(IndexMismatchError):
        load_index(tmp_path / "nowhere")


def test_wrong_query_dimension_is_a_value_error(catalogue):
    embeddings, sku_ids, paths, _ = catalogue
    index = build_index(embeddings, sku_ids, paths, use_gpu="never")
    with pytest.raises(ValueError, match="dimension 8"):
        index.search(np.ones((2, 8), dtype=np.float32))


def test_single_query_vector_is_accepted(catalogue):
    embeddings, sku_ids, paths, queries = catalogue
    index = build_index(embeddings, sku_ids, paths, use_gpu="never")
    assert index.search(queries[2].astype(np.float64), top_k=1) == index.search(queries[2:3], top_k=1)


def test_build_refuses_bad_input(catalogue):
    embeddings, sku_ids, paths, _ = catalogue
    with pytest.raises(ValueError, match="same length"):
        build_index(embeddings, sku_ids[:-1], paths, use_gpu="never")
    with pytest.raises(ValueError, match="non-empty"):
        build_index(np.zeros((0, DIM), dtype=np.float32), [], [], use_gpu="never")


@pytest.mark.parametrize("factory", ["HNSW32", "IVF2,Flat"])
def test_other_factories_work(tmp_path, factory):
    rng = np.random.default_rng(2)
    n_skus, per_sku = 40, 5  # 200 vectors: enough to train 2 IVF centroids without warnings
    embeddings = unit_rows(rng, n_skus * per_sku)
    sku_ids = [f"sku-{i // per_sku}" for i in range(n_skus * per_sku)]
    paths = [f"{i}.jpg" for i in range(n_skus * per_sku)]
    index = build_index(embeddings, sku_ids, paths, factory, use_gpu="never", meta={"model_version": "1"})
    assert index.meta["factory"] == factory and index.meta["ntotal"] == n_skus * per_sku

    # A catalogue vector used as a query finds its own SKU first, with cosine ~1.
    probes = embeddings[:: per_sku * 4]
    for probe_row, result in zip(range(0, n_skus * per_sku, per_sku * 4), index.search(probes, top_k=3)):
        assert result[0][0] == sku_ids[probe_row]
        assert result[0][1] == pytest.approx(1.0, abs=1e-4)
        assert len({sku for sku, _ in result}) == len(result) == 3
        assert [s for _, s in result] == sorted([s for _, s in result], reverse=True)

    checksum = save_index(index, tmp_path / factory)
    loaded = load_index(tmp_path / factory, expected_checksum=checksum, expected_model_version="1")
    assert loaded.search(probes, top_k=3) == index.search(probes, top_k=3)


def test_edited_model_version_in_meta_is_caught(saved):
    folder, _, _ = saved
    meta = json.loads((folder / "index.json").read_text())
    meta["model_version"] = "4"
    (folder / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="corrupt"):
        load_index(folder)


def test_ivf_index_searches_with_nprobe(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    skus = [f"sku{i}" for i in range(2000)]
    exact = build_index(vectors, skus, skus, "Flat", use_gpu="never")
    ivf = build_index(vectors, skus, skus, "IVF16,Flat", use_gpu="never", nprobe=16)
    save_index(ivf, tmp_path / "ivf")
    reloaded = load_index(tmp_path / "ivf")
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    expected = [hits[0][0] for hits in exact.search(queries, 1)]
    # nprobe = nlist visits every list: the IVF answer equals the exact one, also after reloading.
    assert [hits[0][0] for hits in reloaded.search(queries, 1)] == expected


def test_hnsw_index_searches_with_ef_search_also_after_reloading(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 3000)
    skus = [f"sku{i}" for i in range(3000)]
    queries = unit_rows(rng, 200)
    exact = [hits[0][0] for hits in build_index(vectors, skus, skus, "Flat", use_gpu="never").search(queries, 1)]

    def recall(catalogue: CatalogueIndex) -> float:
        return float(np.mean([hits[0][0] == e for hits, e in zip(catalogue.search(queries, 1), exact)]))

    def ef_search(catalogue: CatalogueIndex) -> int:
        return faiss.downcast_index(catalogue.index).hnsw.efSearch

    wide = build_index(vectors, skus, skus, "HNSW32", use_gpu="never", ef_search=256)
    save_index(wide, tmp_path / "wide")
    reloaded = load_index(tmp_path / "wide")
    assert ef_search(wide) == ef_search(reloaded) == 256 and reloaded.meta["ef_search"] == 256
    narrow = build_index(vectors, skus, skus, "HNSW32", use_gpu="never", ef_search=2)
    # Exploring more candidates finds the exact neighbour more often (the setting is applied).
    assert recall(reloaded) >= 0.95 and recall(reloaded) > recall(narrow)

    # An index saved before the setting existed (no ef_search in its meta) keeps what FAISS saved.
    plain = faiss.index_factory(DIM, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    plain.add(vectors)
    save_index(
        CatalogueIndex(plain, CatalogueMap.from_lists(skus, skus), {"factory": "HNSW32", "nprobe": 16}),
        tmp_path / "legacy",
    )
    assert ef_search(load_index(tmp_path / "legacy")) == faiss.IndexHNSWFlat(DIM, 32).hnsw.efSearch
