"""The Milvus catalogue index on a real Milvus Lite file: same answers as FAISS Flat, verified open, add, remove."""

from __future__ import annotations

import numpy as np
import pytest

from components.index import IndexMismatchError, build_index
from components.index.catalogue_map import CatalogueMap
from components.index.milvus import open_milvus_index, publish_to_milvus

# components.index.milvus imports pymilvus only when used; without it (or Milvus Lite) there is nothing to test.
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

DIM, N_SKUS, IMAGES_PER_SKU, TOP_K = 32, 60, 5, 5
# Ids a filter expression must not misread: quotes of both kinds, backslashes, one that reads like an injection.
ODD_SKUS = ['sku "quoted"', "sku 'single'", "back\\slash", 'x" or sku_id != "y', "ünï €"]
META = {"model_name": "clip-test", "model_version": "7", "checksum": "c0ffee", "index_version": "v1"}


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def faiss_answers(vectors, sku_ids, paths, queries) -> list[list[tuple[str, float]]]:
    reference = build_index(vectors, sku_ids, paths, factory="Flat", use_gpu="never", meta={"model_version": "7"})
    return reference.search(queries, top_k=TOP_K)


def assert_same_answers(got, expected) -> None:
    assert len(got) == len(expected)
    for got_row, expected_row in zip(got, expected):
        assert [sku for sku, _ in got_row] == [sku for sku, _ in expected_row]
        np.testing.assert_allclose([s for _, s in got_row], [s for _, s in expected_row], atol=1e-4)


@pytest.fixture
def catalogue():
    """60 SKUs (some with awkward ids) with 5 images each, clustered around a per-SKU centre; 20 queries."""
    rng = np.random.default_rng(0)
    names = ODD_SKUS + [f"sku-{s:02d}" for s in range(N_SKUS - len(ODD_SKUS))]
    centres = unit_rows(rng, N_SKUS)
    rows = centres.repeat(IMAGES_PER_SKU, axis=0) + 0.3 * rng.normal(size=(N_SKUS * IMAGES_PER_SKU, DIM))
    vectors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    sku_ids = [name for name in names for _ in range(IMAGES_PER_SKU)]
    paths = [f"/cat/{i:04d}.jpg" for i in range(len(sku_ids))]
    noisy = centres[rng.integers(0, N_SKUS, 20)] + 0.3 * rng.normal(size=(20, DIM))
    queries = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    return vectors, sku_ids, paths, queries


@pytest.fixture
def published(tmp_path, catalogue):
    vectors, sku_ids, paths, _ = catalogue
    uri = str(tmp_path / "milvus" / "catalogue.db")
    index = publish_to_milvus(
        uri, "catalogue", vectors, CatalogueMap.from_lists(sku_ids, paths), dict(META), index_type="FLAT"
    )
    yield uri, index
    index.close()


def test_search_matches_faiss_flat(published, catalogue):
    vectors, sku_ids, paths, queries = catalogue
    _, index = published
    assert len(index) == len(vectors) and index.dim == DIM
    got = index.search(queries, top_k=TOP_K)
    assert all(len({sku for sku, _ in row}) == TOP_K for row in got)  # distinct SKUs
    assert_same_answers(got, faiss_answers(vectors, sku_ids, paths, queries))


def test_open_verifies_checksum_model_version_and_rows(published, catalogue):
    uri, index = published
    with pytest.raises(IndexMismatchError, match="checksum"):
        open_milvus_index(uri, "catalogue", expected_checksum="not-it")
    with pytest.raises(IndexMismatchError, match="model version"):
        open_milvus_index(uri, "catalogue", expected_checksum="c0ffee", expected_model_version="8")
    with pytest.raises(IndexMismatchError, match="no collection"):
        open_milvus_index(uri, "elsewhere")
    with open_milvus_index(uri, "catalogue", expected_checksum="c0ffee", expected_model_version="7") as opened:
        assert opened.meta["index_version"] == "v1" and opened.meta["ntotal"] == len(catalogue[0])
        assert_same_answers(opened.search(catalogue[3]), index.search(catalogue[3]))
    # A row written behind the index's back: the count no longer agrees with the stored meta.
    index.client.insert(
        "catalogue", [{"row_id": 10_000, "sku_id": "stray", "image_path": "x", "embedding": [0.0] * DIM}]
    )
    with pytest.raises(IndexMismatchError, match="rows"):
        open_milvus_index(uri, "catalogue")


def test_add_makes_new_rows_findable(published, catalogue):
    uri, index = published
    rng = np.random.default_rng(1)
    new_vectors = unit_rows(rng, 7)
    new_skus = ["new-a", "new-a", "new-b", "new-b", "new-c", "new-c", ODD_SKUS[0]]  # last: a known SKU's new image
    new_paths = [f"/new/{i}.jpg" for i in range(7)]
    before = len(index)
    index.add(new_vectors, new_skus, new_paths, {"checksum": "beef", "index_version": "v2"})
    assert len(index) == before + 7
    answers = index.search(new_vectors)
    assert [row[0][0] for row in answers] == new_skus
    assert all(abs(row[0][1] - 1.0) < 1e-4 for row in answers)

    with pytest.raises(IndexMismatchError):
        open_milvus_index(uri, "catalogue", expected_checksum="c0ffee")  # the old version is gone
    with open_milvus_index(uri, "catalogue", expected_checksum="beef", expected_model_version="7") as reopened:
        assert reopened.meta["index_version"] == "v2" and reopened.meta["parent_index_version"] == "v1"
        assert reopened.meta["ntotal"] == before + 7 and len(reopened) == before + 7
        vectors, sku_ids, paths, queries = catalogue
        expected = faiss_answers(np.vstack([vectors, new_vectors]), sku_ids + new_skus, paths + new_paths, queries)
        assert_same_answers(reopened.search(queries), expected)


def test_remove_deletes_only_those_skus(published, catalogue):
    uri, index = published
    vectors, sku_ids, paths, queries = catalogue
    removed = [ODD_SKUS[0], ODD_SKUS[3], "sku-07", "never-indexed"]
    kept_query = vectors[sku_ids.index("sku-20")]
    wide_before = index.search(kept_query, top_k=TOP_K + len(removed))[0]
    before = len(index)

    deleted = index.remove(removed, {"checksum": "dead", "index_version": "v3"})
    assert deleted == 3 * IMAGES_PER_SKU
    assert len(index) == before - deleted
    # The kept SKU's answers are the old ones without the removed SKUs.
    assert_same_answers(index.search(kept_query), [[hit for hit in wide_before if hit[0] not in removed][:TOP_K]])
    keep = [sku not in removed for sku in sku_ids]
    expected = faiss_answers(
        vectors[keep],
        [s for s, k in zip(sku_ids, keep) if k],
        [p for p, k in zip(paths, keep) if k],
        queries,
    )
    got = index.search(np.vstack([queries, vectors]), top_k=TOP_K)
    assert not {sku for row in got for sku, _ in row} & set(removed)
    assert_same_answers(got[: len(queries)], expected)

    with open_milvus_index(uri, "catalogue", expected_checksum="dead") as reopened:
        assert reopened.meta["ntotal"] == before - deleted and reopened.meta["parent_index_version"] == "v1"
    # New keys follow the old ones: rows added after a removal never reuse a deleted row's key.
    index.add(vectors[:1], ["again"], ["/again.jpg"], {"checksum": "f00d"})
    assert index.meta["next_row"] == len(vectors) + 1 and len(index) == before - deleted + 1


def test_publish_replaces_a_collection(published, catalogue):
    uri, index = published
    vectors, sku_ids, paths, _ = catalogue
    half = len(vectors) // 2
    items = CatalogueMap.from_lists(sku_ids[:half], paths[:half])
    meta = {**META, "checksum": None, "model_version": "8"}
    with publish_to_milvus(uri, "catalogue", vectors[:half], items, meta, index_type="FLAT") as again:
        assert len(again) == half and again.meta["checksum"]  # computed from the rows when not given
        with open_milvus_index(uri, "catalogue", again.meta["checksum"], expected_model_version="8") as opened:
            assert len(opened) == half


def test_index_backend_milvus_publishes_each_version_and_the_service_opens_it_verified(tmp_path, catalogue):
    from components.config import IndexParams
    from components.index import load_index
    from components.index.indexing import index_embeddings, open_catalogue, save_version

    vectors, sku_ids, paths, queries = catalogue
    params = IndexParams(backend="milvus", milvus_uri=str(tmp_path / "m" / "catalogue.db"), milvus_index_type="FLAT")
    meta = {"model_name": "clip-test", "model_version": "7", "index_version": 1}
    built = index_embeddings(vectors, CatalogueMap.from_lists(sku_ids, paths), params, meta)
    checksum = save_version(built, tmp_path / "index", params)
    # The folder names its collection under its checksum; the service searches Milvus, as FAISS would.
    assert load_index(tmp_path / "index").meta["milvus_collection"] == "skumatch_clip_test_v7_i1"
    served = open_catalogue(tmp_path / "index", checksum, "7")
    try:
        assert served.meta["checksum"] == checksum and served.items.sku_count == N_SKUS
        # Published from the version's float16 vectors: the answers of FAISS over the same values.
        stored = vectors.astype(np.float16).astype(np.float32)
        assert_same_answers(served.search(queries, TOP_K), faiss_answers(stored, sku_ids, paths, queries))
        np.testing.assert_allclose(served.stored_vector(3), vectors[3], atol=1e-3)
    finally:
        served.close()
    with pytest.raises(IndexMismatchError, match="model version"):
        open_catalogue(tmp_path / "index", checksum, "8")
    # A collection published over with other rows carries another checksum: the folder's is refused.
    publish_to_milvus(
        params.milvus_uri,
        "skumatch_clip_test_v7_i1",
        vectors[:10],
        CatalogueMap.from_lists(sku_ids[:10], paths[:10]),
        {**meta, "checksum": "other"},
        index_type="FLAT",
    ).close()
    with pytest.raises(IndexMismatchError, match="checksum other"):
        open_catalogue(tmp_path / "index", checksum, "7")
