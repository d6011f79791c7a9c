"""The catalogue's Prefect flows: ``rebuild_index``, ``add_products`` and ``remove_products``.

Each makes the next index version of a registered model version (``@champion`` by default)
without training: it downloads that version's encoder and current index (verified against the
checksum the registry records), changes the catalogue with ``components.index.indexing`` and records
the result with ``registry.record_index_version``. The service notices the new index checksum
through its hot swap. ``skumatch index rebuild`` / ``add`` / ``remove`` run these flows.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from components import registry
from components.config import Params, load_params
from components.index import indexing, load_index


def _current(params: Params, model: str, with_index: bool = True):
    client = registry.connect(params.registry)
    resolved = registry.download_version(
        client, params.registry.model_name, model, tempfile.mkdtemp(prefix="skumatch-index-"), with_index
    )
    return client, resolved


def _record(client, params: Params, resolved, out_dir: Path, checksum: str, catalogue) -> dict[str, Any]:
    run_id = registry.record_index_version(
        client, params.registry.experiment, params.registry.model_name, resolved.version, out_dir, checksum
    )
    meta = catalogue.meta
    return {
        "model_version": resolved.version,
        "index_version": meta["index_version"],
        "parent_index_version": meta.get("parent_index_version"),
        "checksum": checksum,
        "run_id": run_id,
        "rows": len(catalogue),
        "factory": meta.get("factory"),
        "recall_at_10": meta.get("recall_at_10"),
    }


@flow(name="rebuild_index")
def rebuild_index(
    model: str = registry.CHAMPION,
    data_root: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Re-embed the whole catalogue with a registered version's encoder (number or alias) into its next index.

    The catalogue is the current data's (``data_root`` or ``data.root``); the index settings
    are today's params (``index.*``), so a rebuild is also how a grown catalogue moves to the
    index type ``auto`` now picks. Nothing is trained. The catalogue is embedded in shards
    (``embedding.*``: on Dask workers), kept under ``embedding.shard_dir`` until the index is
    saved, so a rebuild killed halfway resumes from its finished shards when run again.
    """
    from components.data import load_manifest, select
    from components.embedding import ShardedEmbedding
    from flows.embedding_flows import embed_planned_run

    params = load_params(params_path, list(overrides or []) + ([f"data.root={data_root}"] if data_root else []))
    client, resolved = _current(params, model)
    parent = load_index(resolved.index_dir, resolved.index_checksum, resolved.version).meta
    manifest = load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    # The runtime is part of the key: shards embedded on another runtime are not reused.
    model_key = f"{params.registry.model_name} v{resolved.version} {params.embedding.runtime}"
    run = ShardedEmbedding.plan(
        Path(params.embedding.shard_dir) / re.sub(r"[^0-9A-Za-z_.-]", "_", model_key),
        list(select(manifest, role="catalogue")["image_path"]),
        params.embedding.shard_size,
        model_key,
    )
    embedded = embed_planned_run(run, str(resolved.encoder_dir), params.embedding)
    out_dir = resolved.index_dir.parent / "rebuilt"
    checksum, catalogue = indexing.build_model_index(
        resolved.encoder_dir,
        manifest,
        out_dir,
        params.index,
        params.embedding,
        params.registry.model_name,
        resolved.version,
        parent.get("reject_below"),
        parent=parent,
        vectors=run.assemble(),
    )
    shutil.rmtree(run.folder, ignore_errors=True)
    return {**_record(client, params, resolved, out_dir, checksum, catalogue), "embedding": embedded}


@flow(name="add_products")
def add_products(
    manifest_path: str,
    model: str = registry.CHAMPION,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Embed the catalogue images of a manifest (new SKUs, or new images of known ones) into the next index.

    ``manifest_path`` is a dataset manifest (CSV or Parquet: ``image_path``, ``sku_id``,
    ``split``, ``role``); its ``catalogue`` rows are added, relative paths taken from its folder.
    """
    from components.data import load_manifest, select

    params = load_params(params_path, overrides)
    rows = select(load_manifest(manifest_path, layout="manifest"), role="catalogue")
    client, resolved = _current(params, model)
    out_dir = resolved.index_dir.parent / "added"
    checksum, catalogue = indexing.add_to_index(
        resolved.encoder_dir,
        resolved.index_dir,
        rows,
        out_dir,
        params.index,
        params.embedding,
        resolved.index_checksum,
        resolved.version,
    )
    return _record(client, params, resolved, out_dir, checksum, catalogue)


@flow(name="remove_products")
def remove_products(
    sku_ids: list[str],
    model: str = registry.CHAMPION,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Remove every catalogue image of these SKUs into the next index; nothing is embedded."""
    params = load_params(params_path, overrides)
    client, resolved = _current(params, model)
    out_dir = resolved.index_dir.parent / "removed"
    checksum, catalogue = indexing.remove_from_index(
        resolved.index_dir, sku_ids, out_dir, params.index, resolved.index_checksum, resolved.version
    )
    return _record(client, params, resolved, out_dir, checksum, catalogue)
