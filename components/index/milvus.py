"""The catalogue index in a Milvus collection: publish, open with verification, search, add and remove SKUs.

It answers like the FAISS :class:`components.index.CatalogueIndex`: the ``top_k`` distinct SKUs per query,
best first, with cosine scores (inner product on L2-normalised vectors). A row holds an ``int64`` key
(``row_id``, the row number), ``sku_id``, ``image_path`` and the ``embedding``.

The URI is a Milvus Lite file (``/data/catalogue.db``: tests and a single machine) or a cluster
(``http://host:19530``, with a token). It comes from the caller's config, never from a request.

Milvus Lite 3.x (pure Python, on FAISS) supports the index types ``FLAT``, ``BRUTE_FORCE``, ``IVF_FLAT``,
``IVF_SQ8``, ``HNSW``, ``HNSW_SQ`` and ``AUTOINDEX`` (no PQ), collection properties (set at creation and by
``alter_collection_properties``) and grouping search (``group_by_field``), all of which this module uses;
it does not support filter templates (``filter_params``), so SKU ids are written into filters as escaped
string literals.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.index.catalogue_index import IndexMismatchError

if TYPE_CHECKING:
    from components.index.catalogue_map import CatalogueMap

LOGGER = logging.getLogger(__name__)

# Kept in the collection's own properties, not a companion collection: properties live in the collection's
# metadata on Lite and on a cluster (custom keys are kept since Milvus 2.4), so they are renamed and dropped
# with it and can never describe another collection's rows.
META_PROPERTY = "skumatch.meta"
PUBLISHING_SUFFIX = "__publishing"
PK_FIELD, SKU_FIELD, PATH_FIELD, VECTOR_FIELD = "row_id", "sku_id", "image_path", "embedding"
SKU_MAX_BYTES, PATH_MAX_BYTES = 1024, 4096  # VARCHAR limits are in bytes
INSERT_BATCH = 10_000  # rows per insert: a large catalogue streams instead of one huge request
SEARCH_BATCH = 1_024  # queries per search request
SKU_FILTER_BATCH = 256  # SKUs per delete filter, to keep expressions small
QUERY_LIMIT = 16_384  # Milvus's largest query window

DEFAULT_INDEX_TYPE = "HNSW"
# Build and search settings per index type, as the FAISS side's HNSW32 / ef_search=128 / nprobe=16.
DEFAULT_INDEX_PARAMS = {
    "HNSW": {"M": 32, "efConstruction": 200},
    "HNSW_SQ": {"M": 32, "efConstruction": 200, "sq_type": "SQ8"},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}
DEFAULT_SEARCH_PARAMS = {
    "HNSW": {"ef": 128},
    "HNSW_SQ": {"ef": 128},
    "IVF_FLAT": {"nprobe": 16},
    "IVF_SQ8": {"nprobe": 16},
}
# Set by this module, whatever the caller's meta says.
_OWN_KEYS = ("dim", "ntotal", "next_row", "backend", "collection")


class MilvusCatalogueIndex:
    """A catalogue in a Milvus collection, searched like components.index.CatalogueIndex."""

    def __init__(self, client, collection: str, meta: dict) -> None:
        self.client, self.collection, self.meta = client, collection, meta
        # The verified index folder's map and vectors, where the service opened the collection from one.
        self.items: CatalogueMap | None = None
        self.vectors: np.ndarray | None = None

    def stored_vector(self, row: int) -> np.ndarray | None:
        """Row ``row``'s embedding as the index folder stores it (``None`` without the folder's vectors)."""
        return None if self.vectors is None else np.asarray(self.vectors[row], dtype=np.float32)

    def __len__(self) -> int:
        return _count(self.client, self.collection)

    def __enter__(self) -> MilvusCatalogueIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a Lite file stays locked by this process until then)."""
        self.client.close()

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return int(self.meta["dim"])

    def search(self, queries: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The top_k distinct SKUs per query, best first, with cosine (inner product on L2-normalised vectors) scores.
        Several images of one SKU never take more than one place: same contract as CatalogueIndex.search."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1:]} does not match index dimension {self.dim}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        params = dict(self.meta.get("search_params") or {})
        if "ef" in params:  # HNSW needs at least as many candidates as answers
            params["ef"] = max(int(params["ef"]), top_k)
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(queries), SEARCH_BATCH):
            # Grouping search returns each SKU once, with its best image's score: the over-fetch of
            # CatalogueIndex.search without its widening, which Milvus's 16,384 limit would cap.
            hits = self.client.search(
                self.collection,
                data=queries[start : start + SEARCH_BATCH].tolist(),
                anns_field=VECTOR_FIELD,
                limit=top_k,
                group_by_field=SKU_FIELD,
                group_size=1,
                output_fields=[SKU_FIELD],
                search_params={"metric_type": "IP", "params": params},
            )
            results.extend([(hit["entity"][SKU_FIELD], float(hit["distance"])) for hit in row] for row in hits)
        return results

    def add(self, vectors: np.ndarray, sku_ids: list[str], image_paths: list[str], meta: dict) -> None:
        """Insert rows (new SKUs or new images of known ones) and record the new index version's meta
        (checksum, index_version...)."""
        vectors = _check_rows(vectors, sku_ids, image_paths, self.dim)
        first = int(self.meta.get("next_row", 0))
        _insert(self.client, self.collection, vectors, sku_ids, image_paths, first)
        digest = _delta_digest(self.meta.get("checksum"), "add", vectors, sku_ids, image_paths, meta)
        self._record(meta, digest, next_row=first + len(vectors))

    def remove(self, sku_ids: list[str], meta: dict) -> int:
        """Delete every row of these SKUs; record the new meta; return rows deleted."""
        wanted = sorted({str(sku) for sku in sku_ids})
        deleted = 0
        for start in range(0, len(wanted), SKU_FILTER_BATCH):
            batch = wanted[start : start + SKU_FILTER_BATCH]
            deleted += _delete_skus(self.client, self.collection, batch)
        digest = _delta_digest(self.meta.get("checksum"), "remove", None, wanted, [], meta)
        self._record(meta, digest, next_row=int(self.meta.get("next_row", 0)))
        return deleted

    def _record(self, meta: dict, digest: str, next_row: int) -> None:
        """Store the new version's meta in the collection, after its rows: a writer that dies in between
        leaves a row count that disagrees with the meta, which open_milvus_index refuses."""
        new = {**self.meta, **{k: v for k, v in meta.items() if k not in _OWN_KEYS}}
        new["checksum"] = meta.get("checksum") or digest
        new["parent_checksum"] = self.meta.get("checksum")
        if "index_version" in meta and "parent_index_version" not in meta and "index_version" in self.meta:
            new["parent_index_version"] = self.meta["index_version"]
        new["ntotal"] = _count(self.client, self.collection)
        new["next_row"] = next_row
        self.client.alter_collection_properties(self.collection, properties={META_PROPERTY: json.dumps(new)})
        self.meta = new


def publish_to_milvus(
    uri: str,
    collection: str,
    vectors: np.ndarray,
    items: CatalogueMap,
    meta: dict,
    token: str = "",
    index_type: str = DEFAULT_INDEX_TYPE,
    index_params: dict | None = None,
    search_params: dict | None = None,
) -> MilvusCatalogueIndex:
    """Create (or replace) the collection from an index version's vectors and map, storing meta
    (checksum, model_version, ...) with the collection.

    Args:
        uri: a Milvus Lite file path or a cluster's ``http://host:19530``.
        vectors: ``(n, d)`` L2-normalised rows, in the map's row order (a memory-mapped array streams).
        meta: the index version's facts; without a ``checksum`` one is computed from the rows and the meta.
        index_type: a Milvus index type; ``HNSW`` (default), ``IVF_FLAT`` ... for large catalogues,
            ``FLAT`` for exact answers.
        index_params, search_params: build and search settings; ``None`` = this module's defaults for the type.

    The rows are loaded into ``<collection>__publishing`` first and renamed over the old collection only
    once complete, so a failed publish leaves the served collection as it was.
    """
    n = len(items)
    if vectors.ndim != 2 or len(vectors) == 0 or len(vectors) != n:
        raise ValueError(f"expected a non-empty ({n}, d) embedding matrix, got shape {vectors.shape}")
    index_type = index_type.upper()
    dim = int(vectors.shape[1])
    info = {
        **{k: v for k, v in meta.items() if k not in _OWN_KEYS},
        "backend": "milvus",
        "index_type": index_type,
        "index_params": dict(DEFAULT_INDEX_PARAMS.get(index_type, {}) if index_params is None else index_params),
        "search_params": dict(DEFAULT_SEARCH_PARAMS.get(index_type, {}) if search_params is None else search_params),
        "metric": "IP",
        "dim": dim,
        "ntotal": n,
        "next_row": n,
    }
    if not info.get("checksum"):
        info["checksum"] = _content_digest(vectors, items, info)

    client = _connect(uri, token)
    staging = collection + PUBLISHING_SUFFIX
    try:
        if client.has_collection(staging):  # a publish that died half-way
            client.drop_collection(staging)
        _create(client, staging, dim, info)
        names, paths = items.sku_names, items.image_paths
        for start in range(0, n, INSERT_BATCH):
            stop = min(n, start + INSERT_BATCH)
            skus = names.take(items.sku_codes[start:stop]).to_pylist()
            batch = np.ascontiguousarray(vectors[start:stop], dtype=np.float32)
            _insert(client, staging, batch, skus, paths.slice(start, stop - start).to_pylist(), start)
        if (rows := _count(client, staging)) != n:
            raise IndexMismatchError(f"published {n} rows to {staging} but it holds {rows}")
        # The old collection is gone only between these two calls; searches then fail rather than mix versions.
        if client.has_collection(collection):
            client.drop_collection(collection)
        client.rename_collection(staging, collection)
        client.load_collection(collection)
    except BaseException:
        client.close()
        raise
    LOGGER.info("published %d rows (%s, dim %d) to Milvus collection %s", n, index_type, dim, collection)
    return MilvusCatalogueIndex(client, collection, info)


def open_milvus_index(
    uri: str,
    collection: str,
    expected_checksum: str | None = None,
    expected_model_version: str | None = None,
    token: str = "",
) -> MilvusCatalogueIndex:
    """Open a collection, refusing (components.index.IndexMismatchError) one whose stored checksum or model version
    is not what the caller expects, or whose row count disagrees with its stored meta."""
    client = _connect(uri, token)
    try:
        if not client.has_collection(collection):
            raise IndexMismatchError(f"Milvus at {_safe_uri(uri)} has no collection {collection}")
        description = client.describe_collection(collection)
        raw = (description.get("properties") or {}).get(META_PROPERTY)
        if not raw:
            raise IndexMismatchError(f"collection {collection} carries no {META_PROPERTY}: not published by skumatch")
        meta = json.loads(raw)
        if expected_checksum is not None and meta.get("checksum") != expected_checksum:
            raise IndexMismatchError(
                f"collection {collection} has checksum {meta.get('checksum')}, but the model version records "
                f"{expected_checksum}"
            )
        if expected_model_version is not None and str(meta.get("model_version")) != str(expected_model_version):
            raise IndexMismatchError(
                f"collection {collection} was built from model version {meta.get('model_version')}, "
                f"not the served version {expected_model_version}"
            )
        dim = _vector_dim(description)
        if dim != meta.get("dim"):
            raise IndexMismatchError(f"collection {collection} has dimension {dim}, its meta {meta.get('dim')}")
        client.load_collection(collection)
        rows = _count(client, collection)
        if rows != meta.get("ntotal"):
            raise IndexMismatchError(f"collection {collection} has {rows} rows, its meta {meta.get('ntotal')}")
    except BaseException:
        client.close()
        raise
    return MilvusCatalogueIndex(client, collection, meta)


def _connect(uri: str, token: str):
    from pymilvus import MilvusClient

    if "://" not in uri:  # a Milvus Lite file: its folder must exist
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri=uri, token=token)


def _safe_uri(uri: str) -> str:
    return uri.split("@")[-1]  # never log credentials written into a URI


def _create(client, name: str, dim: int, meta: dict) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(PK_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(SKU_FIELD, DataType.VARCHAR, max_length=SKU_MAX_BYTES)
    schema.add_field(PATH_FIELD, DataType.VARCHAR, max_length=PATH_MAX_BYTES)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index(VECTOR_FIELD, index_type=meta["index_type"], metric_type="IP", params=meta["index_params"])
    client.create_collection(name, schema=schema, index_params=index, properties={META_PROPERTY: json.dumps(meta)})


def _check_rows(vectors: np.ndarray, sku_ids: list[str], image_paths: list[str], dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.shape[1] != dim:
        raise ValueError(f"expected a non-empty (n, {dim}) embedding matrix, got shape {vectors.shape}")
    if not (len(vectors) == len(sku_ids) == len(image_paths)):
        raise ValueError("vectors, sku_ids and image_paths must have the same length")
    return vectors


def _insert(client, name: str, vectors: np.ndarray, sku_ids: list, image_paths: list, first_row: int) -> None:
    for start in range(0, len(vectors), INSERT_BATCH):
        rows = []
        for offset, (vector, sku, path) in enumerate(
            zip(
                vectors[start : start + INSERT_BATCH].tolist(),
                sku_ids[start : start + INSERT_BATCH],
                image_paths[start : start + INSERT_BATCH],
            )
        ):
            sku, path = str(sku), str(path)
            if len(sku.encode()) > SKU_MAX_BYTES or len(path.encode()) > PATH_MAX_BYTES:
                raise ValueError(f"SKU id or image path too long for the collection: {sku[:80]!r}, {path[:80]!r}")
            rows.append({PK_FIELD: first_row + start + offset, SKU_FIELD: sku, PATH_FIELD: path, VECTOR_FIELD: vector})
        client.insert(name, rows)


def _sku_filter(sku_ids: list[str]) -> str:
    # A JSON string is a valid Milvus string literal (" and \ escaped), so an id holding quotes cannot end
    # the literal early; Milvus Lite does not take filter_params templates, which would avoid quoting.
    return f"{SKU_FIELD} in {json.dumps(sku_ids, ensure_ascii=False)}"


def _delete_skus(client, name: str, sku_ids: list[str]) -> int:
    """Delete the rows of ``sku_ids`` by primary key, after checking each matched row is one of them."""
    wanted, deleted = set(sku_ids), 0
    while True:
        rows = client.query(
            name,
            filter=_sku_filter(sku_ids),
            output_fields=[PK_FIELD, SKU_FIELD],
            limit=QUERY_LIMIT,
            consistency_level="Strong",
        )
        if not rows:
            return deleted
        strays = [row[SKU_FIELD] for row in rows if row[SKU_FIELD] not in wanted]
        if strays:  # the filter matched other SKUs: never delete those
            raise RuntimeError(f"SKU filter for {name} matched rows of other SKUs: {strays[:5]!r}")
        keys = [int(row[PK_FIELD]) for row in rows]
        client.delete(name, ids=keys)
        deleted += len(keys)


def _count(client, name: str) -> int:
    # Strong: a count just after an insert or delete must include it (a cluster's default is Bounded).
    rows = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(rows[0]["count(*)"])


def _vector_dim(description: dict) -> int | None:
    for field in description.get("fields", []):
        if field.get("name") == VECTOR_FIELD:
            return int(field.get("params", {}).get("dim", 0))
    return None


def _content_digest(vectors: np.ndarray, items: CatalogueMap, meta: dict) -> str:
    """SHA-256 of the rows (vectors, SKUs, paths, in order) and the meta, for a publish given no checksum."""
    digest = hashlib.sha256()
    for start in range(0, len(vectors), INSERT_BATCH):
        digest.update(np.ascontiguousarray(vectors[start : start + INSERT_BATCH], dtype=np.float32).tobytes())
    for sku, path in items.rows():
        digest.update(f"{len(sku)}:{sku}{len(path)}:{path}".encode())
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


def _delta_digest(parent: str | None, operation: str, vectors, sku_ids: list, image_paths: list, meta: dict) -> str:
    """A change's checksum when the caller gives none: the parent's checksum chained with what changed."""
    digest = hashlib.sha256(f"{parent}|{operation}".encode())
    if vectors is not None:
        digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    for value in [*sku_ids, "|", *image_paths]:
        digest.update(f"{len(str(value))}:{value}".encode())
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()
