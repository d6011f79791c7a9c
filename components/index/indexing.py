"""Making catalogue index versions: the one path from embeddings to a saved, tuned, verified index.

Every index is an *index version* of one model version: the retrain flow's build is version 1,
and each ``skumatch index add`` / ``remove`` or ``rebuild_index`` run makes the next one, with
its parent version, the SHA-256 of the manifest rows it embedded, the recall it measured and its
own checksum in ``index.json``. Adding embeds only the new images with the model's encoder;
nothing is retrained and no other product's vector is touched.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from components.config import EmbeddingParams, IndexParams
from components.index.catalogue_index import (
    CatalogueIndex,
    build_index,
    load_index,
    refuse_indexed_paths,
    save_index,
    with_rows,
    without_skus,
)
from components.index.catalogue_map import CatalogueMap
from components.index.policy import measure_recall, plan_index, rerank_reads, tune_search

EXACT_RECALL = {"recall_at_1": 1.0, "recall_at_10": 1.0}
MILVUS_URI_ENV, MILVUS_TOKEN_ENV = "SKUMATCH_MILVUS_URI", "MILVUS_TOKEN"


def save_version(catalogue: CatalogueIndex, out_dir: str | Path, params: IndexParams) -> str:
    """Save an index version, and with ``index.backend: milvus`` publish it to its own collection.

    The collection's name and URI go into the meta before the save, so the checksum covers where
    the service will search; the collection then carries that checksum and the model version.
    """
    if params.backend == "milvus":
        catalogue.meta.update(
            backend="milvus",
            milvus_uri=params.milvus_uri,
            milvus_collection=_collection_name(catalogue.meta),
            milvus_index_type=params.milvus_index_type,
        )
    else:
        for key in ("backend", "milvus_uri", "milvus_collection", "milvus_index_type"):
            catalogue.meta.pop(key, None)
    checksum = save_index(catalogue, out_dir)
    if params.backend == "milvus":
        from components.index.milvus import publish_to_milvus

        published = publish_to_milvus(
            params.milvus_uri,
            catalogue.meta["milvus_collection"],
            catalogue.vectors,
            catalogue.items,
            catalogue.meta,
            token=os.environ.get(MILVUS_TOKEN_ENV, ""),
            index_type=params.milvus_index_type,
        )
        published.close()
    return checksum


def _collection_name(meta: dict) -> str:
    # Milvus names take letters, digits and underscores; one collection per index version, so a
    # service still on the previous version keeps its rows until it swaps.
    raw = f"skumatch_{meta.get('model_name')}_v{meta.get('model_version')}_i{meta.get('index_version', 1)}"
    return re.sub(r"[^0-9A-Za-z_]", "_", raw)


def open_catalogue(folder: str | Path, expected_checksum: str | None, expected_model_version: str | None):
    """The index a service searches: the verified folder itself, or the Milvus collection its meta names.

    The folder is always verified first (checksum, model version); a Milvus collection must then
    carry the same checksum and model version. ``SKUMATCH_MILVUS_URI`` points a host at another
    address of the same cluster than the one the index was built with.

    Raises:
        IndexMismatchError: the folder or the collection does not match.
    """
    catalogue = load_index(folder, expected_checksum, expected_model_version)
    if catalogue.meta.get("backend") != "milvus":
        return catalogue
    from components.index.milvus import open_milvus_index

    milvus = open_milvus_index(
        os.environ.get(MILVUS_URI_ENV) or catalogue.meta["milvus_uri"],
        catalogue.meta["milvus_collection"],
        expected_checksum=catalogue.meta["checksum"],
        expected_model_version=expected_model_version,
        token=os.environ.get(MILVUS_TOKEN_ENV, ""),
    )
    milvus.items, milvus.vectors, milvus.embedder_graph = catalogue.items, catalogue.vectors, catalogue.embedder_graph
    return milvus


def manifest_digest(rows) -> str:
    """SHA-256 of manifest rows' ``sku_id`` and ``image_path``, in order: which images a version embedded."""
    digest = hashlib.sha256()
    for sku, path in zip(rows["sku_id"], rows["image_path"]):
        digest.update(f"{sku}\t{path}\n".encode())
    return digest.hexdigest()


def index_embeddings(
    embeddings: np.ndarray, items: CatalogueMap, params: IndexParams, meta: dict | None = None
) -> CatalogueIndex:
    """Index embeddings as ``params`` say: the ``auto`` plan or a named factory, then tuned.

    Exact search records recall 1 without measuring it; any other index is tuned to
    ``index.target_recall`` (or, with ``index.tune`` off, measured at its fixed settings).
    """
    compressed = any(codes in params.factory for codes in ("PQ", "SQ"))
    factory, rerank, reason = params.factory, params.rerank_factor if compressed else 1, "index.factory"
    reads = rerank_reads(len(embeddings), embeddings.shape[1], 0, params) if rerank > 1 else "mapped"
    if factory == "auto":
        plan = plan_index(len(embeddings), embeddings.shape[1], params)
        factory, rerank, reason, reads = plan.factory, plan.rerank_factor, plan.reason, plan.rerank_reads
    info = {**(meta or {}), "factory_reason": reason, "rerank_reads": reads}
    catalogue = build_index(
        embeddings, items, None, factory, params.use_gpu, info, params.nprobe, params.ef_search, rerank
    )
    if factory == "Flat":
        catalogue.meta.update(EXACT_RECALL)
    elif params.tune:
        tune_search(catalogue, params.target_recall, params.tune_sample, params.tune_query_cosine)
    else:
        catalogue.meta.update(measure_recall(catalogue, params.tune_sample, params.tune_query_cosine))
    return catalogue


def build_catalogue_index(
    encoder,
    preprocess,
    catalogue_rows,
    index_params: IndexParams | None = None,
    embedding: EmbeddingParams | None = None,
    meta: dict | None = None,
    vectors: np.ndarray | None = None,
    model_dir: str | Path | None = None,
) -> CatalogueIndex:
    """Embed the catalogue images with ``encoder`` and index them.

    Args:
        catalogue_rows: manifest rows (``image_path``, ``sku_id``) of the catalogue.
        index_params: the index section of the params (factory, budget, tuning, GPU use);
            ``None`` = its defaults.
        embedding: the embedding section (runtime, batch size, decode threads). An ONNX runtime's
            graph is made for the encoder saved in ``model_dir`` (int8: calibrated on these images)
            and kept with the index, so queries are embedded by the same graph. ``None``: the torch
            runtime, for an encoder with no saved folder.
        meta: facts kept in ``index.json``; pass ``model_name`` and ``model_version`` so the
            service can check the index belongs to the model it serves.
        vectors: the rows' embeddings, when they were made already (a sharded run); they must
            be ``encoder``'s on ``embedding.runtime``, one per row in order.

    Raises:
        ValueError: no catalogue rows, or ``vectors`` of another length.
    """
    from components.embedder import embedder_for

    embedding = embedding or EmbeddingParams(runtime="torch")
    paths = list(catalogue_rows["image_path"])
    if not paths:
        raise ValueError("the catalogue is empty: no rows with role 'catalogue' to index")
    if vectors is not None and len(vectors) != len(paths):
        raise ValueError(f"{len(vectors)} embeddings for {len(paths)} catalogue rows")
    embedder, graph = embedder_for(encoder, preprocess, embedding, model_dir, calibration_paths=paths)
    if vectors is None:
        vectors = embedder.embed_paths(paths)
    items = CatalogueMap.from_lists(list(catalogue_rows["sku_id"]), paths)
    info = {"manifest_sha256": manifest_digest(catalogue_rows), "embedding_runtime": embedder.runtime, **(meta or {})}
    catalogue = index_embeddings(vectors, items, index_params or IndexParams(), info)
    catalogue.embedder_graph = graph
    return catalogue


def build_model_index(
    encoder_dir: str | Path,
    manifest,
    out_dir: str | Path,
    index_params: IndexParams,
    embedding: EmbeddingParams,
    model_name: str,
    model_version: str,
    reject_below: float | None,
    parent: dict | None = None,
    vectors: np.ndarray | None = None,
) -> tuple[str, CatalogueIndex]:
    """Build and save the catalogue index of a saved encoder: the one path every pipeline takes.

    The flow's ``build-index`` task, ``rebuild_index``, ``skumatch index build`` and the DVC
    ``index`` stage all call this, so every index carries the same meta: the model's name and
    version, the calibrated open-set threshold ``reject_below`` (the service's "no confident
    match"; ``None`` when evaluation calibrated none), the training run's fingerprint, and its
    index version.

    Args:
        manifest: the dataset manifest; its catalogue rows are indexed.
        model_version: the registered version, or ``local`` for an index outside the registry.
        parent: the meta of the index version this one replaces (a rebuild); ``None`` = version 1.
        embedding: the embedding section: the runtime the catalogue is embedded on.
        vectors: the catalogue rows' embeddings by this encoder on that runtime, made already (a sharded run).

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
        **_lineage(parent, "build" if parent is None else "rebuild"),
    }
    rows = select(manifest, role="catalogue")
    catalogue = build_catalogue_index(encoder, preprocess, rows, index_params, embedding, meta, vectors, encoder_dir)
    return save_version(catalogue, out_dir, index_params), catalogue


def _lineage(parent: dict | None, change: str) -> dict:
    if parent is None:
        return {"index_version": 1, "parent_index_version": None, "change": change}
    return {
        "index_version": int(parent.get("index_version") or 1) + 1,
        "parent_index_version": int(parent.get("index_version") or 1),
        "parent_checksum": parent.get("checksum"),
        "change": change,
    }


def add_to_index(
    encoder_dir: str | Path,
    index_dir: str | Path,
    new_rows,
    out_dir: str | Path,
    index_params: IndexParams,
    embedding: EmbeddingParams,
    expected_checksum: str | None,
    expected_model_version: str | None,
) -> tuple[str, CatalogueIndex]:
    """The next index version: ``index_dir``'s index with ``new_rows`` embedded and added.

    The new rows are embedded on the runtime the index was built with, by its own graph when it
    keeps one (``embedding`` gives only the batch size and decode threads), so old and new rows compare.

    Args:
        new_rows: manifest rows (``image_path``, ``sku_id``): new SKUs, or new images of known ones.
        expected_checksum, expected_model_version: what the registry records for the current
            index; a folder that does not match is refused before anything is embedded.

    Raises:
        IndexMismatchError: the current index does not verify.
        ValueError: no rows, or an image already indexed.
    """
    from components.embedder import build_embedder
    from components.model import load_encoder

    current = load_index(index_dir, expected_checksum, expected_model_version, writable=True)
    paths = list(new_rows["image_path"])
    if not paths:
        raise ValueError("the manifest holds no catalogue rows to add")
    refuse_indexed_paths(current, paths)  # before any embedding work
    encoder, preprocess, _ = load_encoder(encoder_dir)
    runtime = current.meta.get("embedding_runtime", "torch")
    embedder = build_embedder(
        encoder, preprocess, runtime, current.embedder_graph, None, embedding.batch_size, embedding.decode_threads
    )
    return add_vectors(current, embedder.embed_paths(paths), new_rows, out_dir, index_params)


def add_vectors(
    current: CatalogueIndex, vectors: np.ndarray, new_rows, out_dir: str | Path, index_params: IndexParams
) -> tuple[str, CatalogueIndex]:
    """The index half of :func:`add_to_index`: append embedded rows, re-measure recall, save the next version.

    ``current`` must be loaded ``writable`` and is consumed.
    """
    paths, skus = list(new_rows["image_path"]), [str(sku) for sku in new_rows["sku_id"]]
    updated = with_rows(current, vectors, skus, paths)
    updated.meta.update(_lineage(current.meta, "add"), manifest_sha256=manifest_digest(new_rows), rows_added=len(paths))
    updated.meta.update(_remeasured(updated, index_params))
    return save_version(updated, out_dir, index_params), updated


def remove_from_index(
    index_dir: str | Path,
    sku_ids: list[str],
    out_dir: str | Path,
    index_params: IndexParams,
    expected_checksum: str | None,
    expected_model_version: str | None,
) -> tuple[str, CatalogueIndex]:
    """The next index version: ``index_dir``'s index without any image of ``sku_ids``.

    Raises:
        IndexMismatchError: the current index does not verify.
        ValueError: an SKU the index does not hold, or no SKU left.
    """
    current = load_index(index_dir, expected_checksum, expected_model_version, writable=True)
    updated, removed = without_skus(current, list(dict.fromkeys(sku_ids)))
    updated.meta.update(
        _lineage(current.meta, "remove"),
        manifest_sha256=None,
        skus_removed=sorted(set(sku_ids)),
        rows_removed=removed,
    )
    updated.meta.update(_remeasured(updated, index_params))
    return save_version(updated, out_dir, index_params), updated


def _remeasured(catalogue: CatalogueIndex, params: IndexParams) -> dict:
    # A changed catalogue keeps its search settings; its recall is measured again, not assumed.
    if catalogue.meta.get("factory") == "Flat":
        return EXACT_RECALL
    return measure_recall(catalogue, params.tune_sample, params.tune_query_cosine)
