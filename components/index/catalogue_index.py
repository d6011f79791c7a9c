"""The FAISS catalogue index: build, save with a checksum, load with verification, search.

Embeddings are L2-normalised, so inner product is cosine similarity. As FAISS ``contrib/``
does, the GPU is used only when ``faiss.get_num_gpus()`` reports one, and indexes are always
saved as CPU indexes so a CPU host can load them.

An index folder holds ``index.faiss``, ``items.arrow`` (row -> SKU and image path,
:mod:`components.index.catalogue_map`), ``vectors.npy`` (the exact embeddings as float16, read
memory-mapped: re-ranking, recall measurement, adding and removing products) and ``index.json``
(the model name and version it was built from, the factory, the search settings, the measured
recall and the SHA-256 checksum of the data files). Which factory and settings a catalogue gets
is :mod:`components.index.policy`'s choice.
:func:`load_index` refuses a folder whose checksum or model version does not match what the
caller expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.index.catalogue_map import ITEMS_FILE, LEGACY_ITEMS_FILE, CatalogueMap, items_file
from components.index.row_reader import RowReader

LOGGER = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
# The ONNX graph that embedded the vectors (embedding.runtime onnx or onnx-int8): queries must use it too.
EMBEDDER_FILE = "embedder.onnx"
CHECKSUM_CHUNK = 8 << 20  # bytes hashed at a time
ROWS_PER_CHUNK = 100_000  # rows converted to float32 and added at a time: a 10M catalogue streams
TRAIN_ROWS_PER_LIST = 39  # FAISS's k-means warns below 39 training points per centroid
MIN_TRAIN_ROWS = 65_536  # enough for PQ and SQ codebooks on small IVF indexes
CODEBOOK_TRAIN_ROWS = 262_144  # PQ codebooks of 256 centroids train on 65,536 points; SQ on all given
RERANK_QUERY_CHUNK = 256  # queries re-ranked at a time: bounds the gathered candidate block


class IndexMismatchError(RuntimeError):
    """An index that is corrupt, or that was not built from the expected model version."""


@dataclass
class CatalogueIndex:
    """A FAISS index with the SKU and image path of each row (:class:`CatalogueMap`).

    ``vectors`` are the rows' exact embeddings (float16, memory-mapped once loaded); an index
    with ``rerank_factor`` in its meta re-scores that many times the neighbours it needs with
    them, so compressed codes do not decide near-ties alone. Indexes saved before vectors were
    kept have none and search on their codes.
    """

    index: object
    items: CatalogueMap
    meta: dict
    vectors: np.ndarray | None = None
    row_reader: RowReader | None = field(default=None, repr=False, compare=False)
    # The ONNX graph that made the vectors (None: torch); saved beside them, its SHA-256 in the meta.
    embedder_graph: Path | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_k`` distinct SKUs for each query, best first, with cosine scores.

        A SKU's score is that of its best catalogue image; several images of one SKU never
        take more than one of the ``top_k`` places.
        """
        queries = self._queries(queries)
        n_items = len(self.items)
        # Ask for more neighbours than SKUs wanted, widening until top_k distinct SKUs appear.
        want = min(n_items, max(top_k * 4, top_k))
        while True:
            scores, rows = self.search_rows(queries, want)
            results = [_distinct_skus(score_row, id_row, self.items, top_k) for score_row, id_row in zip(scores, rows)]
            if want >= n_items or all(len(r) >= top_k for r in results):
                return results
            want = min(n_items, want * 4)

    def search_rows(self, queries: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``want`` nearest rows per query and their cosine scores, as ``faiss.Index.search``
        returns them (``-1`` rows pad a short answer); re-ranked with the exact vectors when the
        index's meta asks for it."""
        queries = self._queries(queries)
        factor = int(self.meta.get("rerank_factor") or 1)
        if factor <= 1 or self.vectors is None:
            return self.index.search(queries, want)
        _, candidates = self.index.search(queries, min(len(self), want * factor))
        return _rerank(queries, candidates, self._exact_rows, want)

    def stored_vector(self, row: int) -> np.ndarray | None:
        """Row ``row``'s embedding as stored (``None`` where neither the vectors nor the index keep it)."""
        if self.vectors is not None:
            return self._exact_rows(np.array([row]))[0]
        try:
            return self.index.reconstruct(int(row))
        except RuntimeError:  # IVF without a direct map, PQ...: the codes cannot give it back
            return None

    def _exact_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of ``rows`` as float32: with ``pread`` where the meta's ``rerank_reads``
        says so (:mod:`components.index.row_reader`), through the mapping (or memory) otherwise."""
        if self.row_reader is not None:
            return self.row_reader.take(rows)
        return np.asarray(self.vectors[rows], dtype=np.float32)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.dim}")
        return queries


def _rerank(queries: np.ndarray, candidates: np.ndarray, exact_rows, want: int):
    """Exact cosine of each candidate row (``exact_rows(rows)`` gives their vectors), best ``want``
    first (``-1`` candidates stay last)."""
    scores = np.full((len(queries), want), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), want), -1, dtype=np.int64)
    for start in range(0, len(queries), RERANK_QUERY_CHUNK):
        block = candidates[start : start + RERANK_QUERY_CHUNK]
        gathered = exact_rows(np.maximum(block, 0))  # (queries, candidates, d)
        exact = np.einsum("qcd,qd->qc", gathered, queries[start : start + RERANK_QUERY_CHUNK])
        exact[block < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :want]
        taken = min(want, block.shape[1])
        scores[start : start + len(block), :taken] = np.take_along_axis(exact, order, axis=1)
        rows[start : start + len(block), :taken] = np.where(
            np.isfinite(scores[start : start + len(block), :taken]), np.take_along_axis(block, order, axis=1), -1
        )
    return scores, rows


def _distinct_skus(scores, rows, items: CatalogueMap, top_k: int) -> list[tuple[str, float]]:
    seen: dict[int, float] = {}  # by SKU code: names are decoded for the answer only
    for score, row in zip(scores, rows):
        if row < 0:  # FAISS pads with -1 when fewer neighbours exist
            continue
        code = int(items.sku_codes[row])
        if code not in seen:
            seen[code] = float(score)
            if len(seen) == top_k:
                break
    return [(items.sku_names[code].as_py(), score) for code, score in seen.items()]


def _use_gpu(policy: str) -> bool:
    import faiss

    return policy == "auto" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def set_search_params(index, nprobe: int | None, ef_search: int | None) -> None:
    """How much of the index a search visits: IVF lists (``nprobe``; FAISS's default of 1 misses
    most neighbours) or HNSW candidates (``ef_search``; FAISS's default of 16 misses many).
    ``None`` leaves FAISS's default, as for indexes saved before the setting existed."""
    import faiss

    ivf = ivf_layer(index)
    if nprobe and ivf is not None:
        ivf.nprobe = int(nprobe)
        coarse = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
        if coarse is not None:  # an HNSW coarse quantizer must look wider than the lists it returns
            coarse.efSearch = max(2 * int(nprobe), 64)
    graph = getattr(faiss.downcast_index(index), "hnsw", None)
    if ef_search and graph is not None:
        graph.efSearch = int(ef_search)


def ivf_layer(index):
    """The IVF layer of an index (``None`` for Flat, HNSW, PQ...)."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def build_index(
    embeddings: np.ndarray,
    sku_ids: list[str] | CatalogueMap,
    image_paths: list[str] | None = None,
    factory: str = "Flat",
    use_gpu: str = "auto",
    meta: dict | None = None,
    nprobe: int = 16,
    ef_search: int = 128,
    rerank_factor: int = 1,
    seed: int = 0,
) -> CatalogueIndex:
    """Build an inner-product index over catalogue embeddings, streaming them in chunks.

    Args:
        embeddings: ``(n, d)`` L2-normalised rows; a float16 ``np.memmap`` streams from disk.
        sku_ids: each row's SKU, or a whole :class:`CatalogueMap` (then ``image_paths`` is unused).
        factory: a ``faiss.index_factory`` string (``Flat``, ``IVF1024,SQ8``, ``IVF16384_HNSW32,PQ64``).
        nprobe: IVF lists visited per search (ignored by other index types); kept in the meta.
        ef_search: HNSW candidates explored per search (ignored by other index types); kept in the meta.
        rerank_factor: above 1, searches re-score that many times the neighbours they need
            with the exact vectors (for compressed codes); kept in the meta.
        use_gpu: ``auto`` builds on the GPU when FAISS sees one; ``never`` stays on the CPU.
        meta: facts to keep with the index (model name and version).
        seed: picks the training sample of an IVF or quantised index.

    Returns:
        A :class:`CatalogueIndex` holding a CPU index and the rows as float16 vectors.
    """
    import faiss

    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"expected a non-empty (n, d) embedding matrix, got shape {embeddings.shape}")
    items = sku_ids if isinstance(sku_ids, CatalogueMap) else None
    if items is None:
        if image_paths is None or not (len(embeddings) == len(sku_ids) == len(image_paths)):
            raise ValueError("embeddings, sku_ids and image_paths must have the same length")
        items = CatalogueMap.from_lists(sku_ids, image_paths)
    elif len(items) != len(embeddings):
        raise ValueError("embeddings and the catalogue map must have the same length")
    n, dim = embeddings.shape
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    target = index
    if _use_gpu(use_gpu):
        try:
            target = faiss.index_cpu_to_all_gpus(index)
            LOGGER.info("building the index on %d GPU(s)", faiss.get_num_gpus())
        except RuntimeError as error:  # e.g. an HNSW coarse quantizer has no GPU version
            LOGGER.warning("building %s on the CPU: %s", factory, error)
    if not index.is_trained:
        sample = _training_sample(embeddings, index, seed)
        if _has_graph_quantizer(index):
            _train_two_level(index, sample, seed, on_gpu=target is not index)
        else:
            target.train(sample)
    # Rows are assigned to lists by the coarse quantizer: an HNSW one needs its search depth set
    # before adding, not only before searching (FAISS's default of 16 misplaces rows).
    set_search_params(index, nprobe, ef_search)
    for start in range(0, n, ROWS_PER_CHUNK):
        target.add(np.ascontiguousarray(embeddings[start : start + ROWS_PER_CHUNK], dtype=np.float32))
    if target is not index:
        index = faiss.index_gpu_to_cpu(target)
    set_search_params(index, nprobe, ef_search)
    info = {
        "factory": factory,
        "nprobe": nprobe,
        "ef_search": ef_search,
        "rerank_factor": int(rerank_factor),
        "dim": int(dim),
        "ntotal": int(index.ntotal),
        **(meta or {}),
    }
    vectors = embeddings if embeddings.dtype == np.float16 else embeddings.astype(np.float16)
    return CatalogueIndex(index, items, info, vectors)


def _training_sample(embeddings: np.ndarray, index, seed: int) -> np.ndarray:
    """A random sample of rows, large enough for the index's k-means and codebooks, as float32."""
    ivf = ivf_layer(index)
    wanted = max(MIN_TRAIN_ROWS, TRAIN_ROWS_PER_LIST * (ivf.nlist if ivf is not None else 0))
    if wanted >= len(embeddings):
        return np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), wanted, replace=False))
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def _has_graph_quantizer(index) -> bool:
    import faiss

    # Only an IVF index at the top: under a transform (OPQ) the centroids would live in its space.
    top = faiss.downcast_index(index)
    return isinstance(top, faiss.IndexIVF) and isinstance(faiss.downcast_index(top.quantizer), faiss.IndexHNSW)


def _train_two_level(index, sample: np.ndarray, seed: int, on_gpu: bool) -> None:
    """Train an IVF index with an HNSW coarse quantizer by FAISS's two-level k-means.

    Flat k-means costs rows x lists x dim per iteration: at 65,536 lists that is hours on two
    cores. ``faiss.contrib.clustering.two_level_clustering`` clusters into √lists groups and each
    group into its share of the lists (its ``train_ivf_index_with_2level`` takes L2 indexes only;
    here the centroids are spherical, for inner product). The codes then train on a sample
    of residuals, as large as their codebooks need.
    """
    from faiss.contrib.clustering import two_level_clustering

    ivf = ivf_layer(index)
    groups = int(np.sqrt(ivf.nlist))
    centroids, _ = two_level_clustering(sample, groups, ivf.nlist, spherical=True, seed=seed, gpu=on_gpu)
    # A quantizer already holding nlist centroids is kept by IndexIVF.train, which trains the codes.
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(sample[:CODEBOOK_TRAIN_ROWS])


def _checksum(folder: Path, meta: dict) -> str:
    # The facts in index.json (model version above all) are covered too, so editing them
    # is caught like a flipped byte in the index itself.
    digest = hashlib.sha256()
    for name in _data_files(folder):
        _hash_file_into(digest, folder / name)
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


def _data_files(folder: Path) -> list[str]:
    # vectors.npy is covered where it exists; folders saved before it keep their digest.
    names = [INDEX_FILE, items_file(folder)]
    return names + [VECTORS_FILE] if (folder / VECTORS_FILE).exists() else names


def _read_faiss(path: Path):
    """Read an index file memory-mapped where FAISS allows it (flat codes: Flat, SQ, PQ, HNSW
    storage), so that the workers serving one file share its pages; a full read otherwise."""
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


def save_index(catalogue: CatalogueIndex, out_dir: str | Path) -> str:
    """Write the index folder; returns its SHA-256 checksum (also stored in ``index.json``)."""
    import faiss

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # Each file is written beside its place and renamed over it: a process that has the old file
    # memory-mapped (a server loaded from this folder) keeps reading the old pages; writing into
    # a mapped file would kill it with SIGBUS.
    _write_replacing(folder / INDEX_FILE, lambda path: faiss.write_index(catalogue.index, str(path)))
    _write_replacing(folder / ITEMS_FILE, catalogue.items.write)
    if catalogue.vectors is not None:
        _write_replacing(folder / VECTORS_FILE, lambda path: _write_vectors(catalogue.vectors, path))
    else:
        (folder / VECTORS_FILE).unlink(missing_ok=True)
    (folder / LEGACY_ITEMS_FILE).unlink(missing_ok=True)  # an older save in the same folder
    _save_embedder_graph(catalogue, folder)
    checksum = _checksum(folder, catalogue.meta)
    catalogue.meta["checksum"] = checksum
    _write_replacing(folder / META_FILE, lambda path: path.write_text(json.dumps(catalogue.meta, indent=2)))
    return checksum


def _save_embedder_graph(catalogue: CatalogueIndex, folder: Path) -> None:
    """Copy the graph that made the vectors into the folder; its digest goes into the checksummed meta."""
    import shutil

    if catalogue.embedder_graph is None:
        (folder / EMBEDDER_FILE).unlink(missing_ok=True)
        catalogue.meta.pop("embedder_sha256", None)
        return
    _write_replacing(folder / EMBEDDER_FILE, lambda path: shutil.copyfile(catalogue.embedder_graph, path))
    catalogue.embedder_graph = folder / EMBEDDER_FILE
    catalogue.meta["embedder_sha256"] = _file_digest(catalogue.embedder_graph)


def _hash_file_into(digest, path: Path) -> None:
    # Streamed: an index of 10M vectors is gigabytes, which must not be held twice to hash it.
    with open(path, "rb") as handle:
        while chunk := handle.read(CHECKSUM_CHUNK):
            digest.update(chunk)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_file_into(digest, path)
    return digest.hexdigest()


def verified_embedder_graph(folder: str | Path, meta: dict) -> Path | None:
    """The index folder's embedder graph, checked against the digest its meta records (None: torch).

    Raises:
        IndexMismatchError: the meta names a graph the folder lacks, or one with other bytes.
    """
    expected = meta.get("embedder_sha256")
    if expected is None:
        return None
    path = Path(folder) / EMBEDDER_FILE
    if not path.exists() or _file_digest(path) != expected:
        raise IndexMismatchError(f"index {folder}: {EMBEDDER_FILE} is missing or not the graph that embedded it")
    return path


def _write_vectors(vectors: np.ndarray, path: Path) -> None:
    # Chunked through a memory-mapped .npy: 10M rows never sit in memory twice.
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, len(vectors), ROWS_PER_CHUNK):
        out[start : start + ROWS_PER_CHUNK] = vectors[start : start + ROWS_PER_CHUNK]
    out.flush()
    del out


def _write_replacing(path: Path, write) -> None:
    """``write(temporary path)``, then rename the result over ``path`` (atomic on one file system)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_index(
    folder: str | Path,
    expected_checksum: str | None = None,
    expected_model_version: str | None = None,
    writable: bool = False,
) -> CatalogueIndex:
    """Load an index folder, verifying it before anything uses it.

    Args:
        writable: read the FAISS index into memory, so rows can be added to it; otherwise it is
            memory-mapped where FAISS allows (shared by every process serving the file).
        expected_checksum: the checksum recorded on the model version; must match the files.
        expected_model_version: the model version the caller serves; the index must be built
            from it.

    Raises:
        IndexMismatchError: missing files, files that do not match their checksum, or an index
            built from another model version.
    """

    folder = Path(folder)
    for name in (INDEX_FILE, items_file(folder), META_FILE):
        if not (folder / name).exists():
            raise IndexMismatchError(f"index folder {folder} lacks {name}")
    meta = json.loads((folder / META_FILE).read_text())
    actual = _checksum(folder, meta)
    if actual != meta.get("checksum"):
        raise IndexMismatchError(f"index {folder} is corrupt: checksum {actual} != recorded {meta.get('checksum')}")
    if expected_checksum is not None and actual != expected_checksum:
        raise IndexMismatchError(
            f"index {folder} has checksum {actual}, but the model version records {expected_checksum}"
        )
    if expected_model_version is not None and str(meta.get("model_version")) != str(expected_model_version):
        raise IndexMismatchError(
            f"index {folder} was built from model version {meta.get('model_version')}, "
            f"not the served version {expected_model_version}"
        )
    import faiss

    items = CatalogueMap.read(folder)
    index = faiss.read_index(str(folder / INDEX_FILE)) if writable else _read_faiss(folder / INDEX_FILE)
    set_search_params(index, meta.get("nprobe"), meta.get("ef_search"))
    vectors, reader = None, None
    if (folder / VECTORS_FILE).exists():
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
        # Where the rows do not fit the memory budget beside the index (policy.rerank_reads).
        reader = RowReader(folder / VECTORS_FILE) if meta.get("rerank_reads") == "pread" else None
    if index.ntotal != len(items) or (vectors is not None and vectors.shape != (len(items), index.d)):
        raise IndexMismatchError(
            f"index {folder} has {index.ntotal} rows, {len(items)} items and vectors of shape "
            f"{None if vectors is None else vectors.shape}"
        )
    return CatalogueIndex(index, items, meta, vectors, reader, verified_embedder_graph(folder, meta))


def with_rows(catalogue: CatalogueIndex, embeddings: np.ndarray, sku_ids: list[str], image_paths: list[str]):
    """A new :class:`CatalogueIndex` with rows appended: new SKUs, or new images of known ones.

    The rows already indexed keep their codes, vectors and row numbers; only the new rows are
    encoded (with the index's trained quantizer, never retrained). ``catalogue`` must be loaded
    ``writable`` and is consumed: its FAISS index is the new one's.

    Raises:
        ValueError: no rows, a dimension that is not the index's, or an image path already indexed.
    """
    vectors = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
    if len(vectors) == 0 or vectors.shape[1] != catalogue.dim:
        raise ValueError(f"expected (n, {catalogue.dim}) embeddings to add, got shape {vectors.shape}")
    if not (len(vectors) == len(sku_ids) == len(image_paths)):
        raise ValueError("embeddings, sku_ids and image_paths must have the same length")
    if catalogue.vectors is None:
        raise ValueError("this index keeps no exact vectors (saved before they were kept): rebuild it first")
    refuse_indexed_paths(catalogue, image_paths)
    for start in range(0, len(vectors), ROWS_PER_CHUNK):
        catalogue.index.add(vectors[start : start + ROWS_PER_CHUNK])
    meta = {**catalogue.meta, "ntotal": int(catalogue.index.ntotal)}
    stored = np.concatenate([catalogue.vectors, vectors.astype(np.float16)])
    items = catalogue.items.extended(sku_ids, image_paths)
    return CatalogueIndex(catalogue.index, items, meta, stored, embedder_graph=catalogue.embedder_graph)


def refuse_indexed_paths(catalogue: CatalogueIndex, image_paths: list[str]) -> None:
    """Raise ValueError if any of these images is indexed already (an add must not double a row)."""
    held = catalogue.items.holds_paths(image_paths)
    if held.any():
        first = image_paths[int(np.argmax(held))]
        raise ValueError(f"{int(held.sum())} of the images are indexed already (first: {first}); remove them first")


def without_skus(catalogue: CatalogueIndex, sku_ids: list[str]) -> tuple[CatalogueIndex, int]:
    """A new :class:`CatalogueIndex` without any row of these SKUs, and the rows removed.

    The remaining rows keep their order and codes and are renumbered from 0, as the map is.
    ``catalogue`` must be loaded ``writable`` and is consumed.

    Raises:
        ValueError: an SKU the index does not hold, or removing every row.
    """
    import faiss

    codes = catalogue.items.codes_of(sku_ids)
    if (codes < 0).any():
        unknown = [sku for sku, code in zip(sku_ids, codes) if code < 0]
        raise ValueError(f"not in the index: {', '.join(map(str, unknown[:10]))}")
    drop = np.isin(np.asarray(catalogue.items.sku_codes), codes)
    if drop.all():
        raise ValueError("that would remove every row of the index")
    removed = np.flatnonzero(drop).astype(np.int64)
    index = catalogue.index
    ivf = ivf_layer(index)
    if ivf is not None:
        index.remove_ids(faiss.IDSelectorBatch(removed))
        _renumber_ivf(ivf, removed)
    elif isinstance(faiss.downcast_index(index), faiss.IndexFlatCodes):  # Flat, SQ, PQ: compacted in order
        index.remove_ids(faiss.IDSelectorBatch(removed))
    else:  # HNSW cannot remove: rebuild the graph from the kept exact vectors
        index = faiss.clone_index(index)
        index.reset()
        kept = np.flatnonzero(~drop)
        for start in range(0, len(kept), ROWS_PER_CHUNK):
            index.add(np.ascontiguousarray(catalogue.vectors[kept[start : start + ROWS_PER_CHUNK]], np.float32))
        set_search_params(index, catalogue.meta.get("nprobe"), catalogue.meta.get("ef_search"))
    meta = {**catalogue.meta, "ntotal": int(index.ntotal)}
    vectors = None if catalogue.vectors is None else np.asarray(catalogue.vectors)[~drop]
    kept_items = catalogue.items.taking(~drop)
    return CatalogueIndex(index, kept_items, meta, vectors, embedder_graph=catalogue.embedder_graph), len(removed)


def _renumber_ivf(ivf, removed: np.ndarray) -> None:
    # IVF lists keep each row's id after a removal; ids must stay row numbers of the compacted map.
    import faiss

    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
        renumbered = ids - np.searchsorted(removed, ids)
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).copy()
        lists.update_entries(list_no, 0, size, faiss.swig_ptr(renumbered), faiss.swig_ptr(codes))
