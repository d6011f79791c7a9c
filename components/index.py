"""The FAISS catalogue index: build, save with a checksum, load with verification, search.

Embeddings are L2-normalised, so inner product is cosine similarity. As FAISS ``contrib/``
does, the GPU is used only when ``faiss.get_num_gpus()`` reports one, and indexes are always
saved as CPU indexes so a CPU host can load them.

An index folder holds ``index.faiss``, ``items.arrow`` (row -> SKU and image path,
:mod:`components.catalogue_map`) and ``index.json`` (the model name and version it was built
from, the factory, the dimension and the SHA-256 checksum of the two data files).
:func:`load_index` refuses a folder whose checksum or model version does not match what the
caller expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.catalogue_map import ITEMS_FILE, LEGACY_ITEMS_FILE, CatalogueMap, items_file
from components.config import EvaluateParams, IndexParams

LOGGER = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
CHECKSUM_CHUNK = 8 << 20  # bytes hashed at a time


class IndexMismatchError(RuntimeError):
    """An index that is corrupt, or that was not built from the expected model version."""


@dataclass
class CatalogueIndex:
    """A FAISS index with the SKU and image path of each row (:class:`CatalogueMap`)."""

    index: object
    items: CatalogueMap
    meta: dict

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
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.dim}")
        n_items = len(self.items)
        # Ask for more neighbours than SKUs wanted, widening until top_k distinct SKUs appear.
        want = min(n_items, max(top_k * 4, top_k))
        while True:
            scores, rows = self.index.search(queries, want)
            results = [_distinct_skus(score_row, id_row, self.items, top_k) for score_row, id_row in zip(scores, rows)]
            if want >= n_items or all(len(r) >= top_k for r in results):
                return results
            want = min(n_items, want * 4)


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


def _set_search_params(index, nprobe: int | None, ef_search: int | None) -> None:
    """How much of the index a search visits: IVF lists (``nprobe``; FAISS's default of 1 misses
    most neighbours) or HNSW candidates (``ef_search``; FAISS's default of 16 misses many).
    ``None`` leaves FAISS's default, as for indexes saved before the setting existed."""
    import faiss

    if nprobe:
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:  # not an IVF index: nothing to set
            pass
    graph = getattr(faiss.downcast_index(index), "hnsw", None)
    if ef_search and graph is not None:
        graph.efSearch = int(ef_search)


def build_index(
    embeddings: np.ndarray,
    sku_ids: list[str],
    image_paths: list[str],
    factory: str = "Flat",
    use_gpu: str = "auto",
    meta: dict | None = None,
    nprobe: int = 16,
    ef_search: int = 128,
) -> CatalogueIndex:
    """Build an inner-product index over catalogue embeddings.

    Args:
        embeddings: ``(n, d)`` L2-normalised rows.
        factory: a ``faiss.index_factory`` string (``Flat``, ``IVF1024,Flat``, ``HNSW32`` ...).
        nprobe: IVF lists visited per search (ignored by other index types); kept in the meta.
        ef_search: HNSW candidates explored per search (ignored by other index types); kept in the meta.
        use_gpu: ``auto`` builds on the GPU when FAISS sees one; ``never`` stays on the CPU.
        meta: facts to keep with the index (model name and version).

    Returns:
        A :class:`CatalogueIndex` holding a CPU index.
    """
    import faiss

    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty (n, d) embedding matrix, got shape {vectors.shape}")
    if not (len(vectors) == len(sku_ids) == len(image_paths)):
        raise ValueError("embeddings, sku_ids and image_paths must have the same length")
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if _use_gpu(use_gpu):
        LOGGER.info("building the index on %d GPU(s)", faiss.get_num_gpus())
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        gpu_index.train(vectors)
        gpu_index.add(vectors)
        index = faiss.index_gpu_to_cpu(gpu_index)
    else:
        index.train(vectors)
        index.add(vectors)
    _set_search_params(index, nprobe, ef_search)
    info = {
        "factory": factory,
        "nprobe": nprobe,
        "ef_search": ef_search,
        "dim": int(vectors.shape[1]),
        "ntotal": int(index.ntotal),
        **(meta or {}),
    }
    return CatalogueIndex(index, CatalogueMap.from_lists(sku_ids, image_paths), info)


def _checksum(folder: Path, meta: dict) -> str:
    # The facts in index.json (model version above all) are covered too, so editing them
    # is caught like a flipped byte in the index itself.
    digest = hashlib.sha256()
    for name in (INDEX_FILE, items_file(folder)):
        # Streamed: an index of 10M vectors is gigabytes, which must not be held twice to hash it.
        with open(folder / name, "rb") as handle:
            while chunk := handle.read(CHECKSUM_CHUNK):
                digest.update(chunk)
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


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
    (folder / LEGACY_ITEMS_FILE).unlink(missing_ok=True)  # an older save in the same folder
    checksum = _checksum(folder, catalogue.meta)
    catalogue.meta["checksum"] = checksum
    _write_replacing(folder / META_FILE, lambda path: path.write_text(json.dumps(catalogue.meta, indent=2)))
    return checksum


def _write_replacing(path: Path, write) -> None:
    """``write(temporary path)``, then rename the result over ``path`` (atomic on one file system)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_index(
    folder: str | Path, expected_checksum: str | None = None, expected_model_version: str | None = None
) -> CatalogueIndex:
    """Load an index folder, verifying it before anything uses it.

    Args:
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
    items = CatalogueMap.read(folder)
    index = _read_faiss(folder / INDEX_FILE)
    _set_search_params(index, meta.get("nprobe"), meta.get("ef_search"))
    if index.ntotal != len(items):
        raise IndexMismatchError(f"index {folder} has {index.ntotal} rows but {len(items)} items")
    return CatalogueIndex(index, items, meta)


def build_catalogue_index(
    encoder,
    preprocess,
    catalogue_rows,
    index_params: IndexParams | None = None,
    batch_size: int | None = None,
    meta: dict | None = None,
) -> CatalogueIndex:
    """Embed the catalogue images with ``encoder`` and index them.

    Args:
        catalogue_rows: manifest rows (``image_path``, ``sku_id``) of the catalogue.
        index_params: the index section of the params (factory, search settings, GPU use);
            ``None`` = its defaults.
        batch_size: images embedded per forward pass; ``None`` = ``evaluate.batch_size``'s
            default, so an index and an evaluation embed alike unless told otherwise.
        meta: facts kept in ``index.json``; pass ``model_name`` and ``model_version`` so the
            service can check the index belongs to the model it serves.
    """
    from components.model import embed_images

    index_params = index_params or IndexParams()
    paths = list(catalogue_rows["image_path"])
    if not paths:
        raise ValueError("the catalogue is empty: no rows with role 'catalogue' to index")
    vectors = embed_images(encoder, preprocess, paths, batch_size or EvaluateParams().batch_size)
    return build_index(
        vectors,
        list(catalogue_rows["sku_id"]),
        paths,
        index_params.factory,
        index_params.use_gpu,
        meta,
        index_params.nprobe,
        index_params.ef_search,
    )


def build_model_index(
    encoder_dir: str | Path,
    manifest,
    out_dir: str | Path,
    index_params: IndexParams,
    batch_size: int,
    model_name: str,
    model_version: str,
    reject_below: float | None,
) -> tuple[str, CatalogueIndex]:
    """Build and save the catalogue index of a saved encoder: the one path every pipeline takes.

    The flow's ``build-index`` task, ``skumatch index`` and the DVC ``index`` stage all call this,
    so every index carries the same meta: the model's name and version, the calibrated open-set
    threshold ``reject_below`` (the service's "no confident match"; ``None`` when evaluation
    calibrated none) and the training run's fingerprint.

    Args:
        manifest: the dataset manifest; its catalogue rows are indexed.
        model_version: the registered version, or ``local`` for an index outside the registry.

    Returns:
        The index's checksum and the index itself.
    """
    from components.data import select
    from components.model import load_encoder

    encoder, preprocess, description = load_encoder(encoder_dir)
    meta = {
        "model_name": model_name,
        "model_version": str(model_version),
        "reject_below": reject_below,
        "run_fingerprint": description.get("run_fingerprint"),
    }
    catalogue = build_catalogue_index(
        encoder, preprocess, select(manifest, role="catalogue"), index_params, batch_size, meta=meta
    )
    return save_index(catalogue, out_dir), catalogue
