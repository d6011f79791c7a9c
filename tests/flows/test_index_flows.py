"""Changing a registered version's catalogue without training: ``skumatch index add`` / ``remove`` and
the ``rebuild_index`` flow, against a real SQLite MLflow registry and the session's Prefect server."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from components import registry
from components.config import Params, load_params
from components.data import load_manifest, select
from components.index import load_index
from components.index.indexing import build_model_index, manifest_digest
from components.model import build_encoder, embed_images, load_encoder, save_encoder
from flows.cli import app
from flows.index_flows import rebuild_index
from tests.conftest import SkuSpec

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
NEW_SKU = SkuSpec("Orange-Diamond", "Pointy", "cross", (250, 140, 0))


@pytest.fixture(autouse=True)
def _on_prefect_api(prefect_api):
    """The index flows run against the session's temporary Prefect server."""


@dataclass
class Registered:
    params: Params
    overrides: list[str]
    client: object
    version: str
    dataset: Path

    @property
    def name(self) -> str:
        return self.params.registry.model_name

    def cli(self, *args: str):
        options = [flag for override in self.overrides for flag in ("-S", override)]
        return CliRunner().invoke(app, [*args, "--params", str(REPO_ROOT / "params.yaml"), *options])

    def current(self):
        """The champion's files as the service would download them, verified."""
        resolved = registry.download_version(self.client, self.name, "champion")
        return resolved, load_index(resolved.index_dir, resolved.index_checksum, resolved.version)


@pytest.fixture
def champion(tmp_path, monkeypatch, tiny_model_overrides, synthetic_dataset) -> Registered:
    """Version 1 of a tiny encoder, registered and promoted with its index version 1 (no training)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_model_overrides + [f"registry.tracking_uri={uri}", "index.use_gpu=never"]
    params = load_params(REPO_ROOT / "params.yaml", overrides)
    client = registry.connect(params.registry)
    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, tmp_path / "encoder")
    run = client.create_run(client.get_experiment_by_name(params.registry.experiment).experiment_id)
    metrics = {"catalogue": {"top1": 1.0, "top3": 1.0}}
    registered = registry.register_version(client, params.registry, run.info.run_id, encoder_dir, metrics, "v")
    version = str(registered.version)
    manifest = load_manifest(synthetic_dataset)
    checksum, _ = build_model_index(
        encoder_dir,
        manifest,
        tmp_path / "index",
        params.index,
        params.embedding,
        params.registry.model_name,
        version,
        0.5,
    )
    registry.attach_index(client, params.registry.model_name, version, tmp_path / "index", checksum)
    registry.promote(client, params.registry.model_name, version)
    return Registered(params, overrides, client, version, synthetic_dataset)


def printed_summary(output: str) -> dict:
    """The JSON a command printed last (the runner mixes in MLflow's progress bars and the flow's log)."""
    line = [line for line in output.splitlines() if '{"model_version"' in line][-1]
    return json.loads(line[line.index('{"model_version"') :])


def new_products_manifest(folder: Path, draw_sku, known_sku: str) -> Path:
    """Three catalogue images: two of a new SKU and one new image of a known SKU (plus a query row)."""
    folder.mkdir(parents=True)
    rows = []
    for number, (spec_name, spec) in enumerate([(NEW_SKU.name, NEW_SKU), (NEW_SKU.name, NEW_SKU)]):
        path = folder / f"new-{number}.png"
        draw_sku(spec, np.random.default_rng(number)).save(path)
        rows.append({"image_path": path.name, "sku_id": spec_name, "split": "catalogue", "role": "catalogue"})
    from tests.conftest import SYNTHETIC_SKUS

    known = next(spec for spec in SYNTHETIC_SKUS if spec.name == known_sku)
    draw_sku(known, np.random.default_rng(7)).save(folder / "known-extra.png")
    rows.append({"image_path": "known-extra.png", "sku_id": known_sku, "split": "catalogue", "role": "catalogue"})
    rows.append({"image_path": "new-0.png", "sku_id": NEW_SKU.name, "split": "val", "role": "query"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_index_add_then_remove_each_make_a_recorded_index_version(champion, tmp_path, draw_sku):
    before_files, before = champion.current()
    known = before.items.sku(0)
    manifest = new_products_manifest(tmp_path / "new", draw_sku, known)

    added = champion.cli("index", "add", str(manifest))
    assert added.exit_code == 0, added.output
    summary = printed_summary(added.output)
    assert summary["model_version"] == champion.version and summary["index_version"] == 2
    assert summary["parent_index_version"] == 1 and summary["rows"] == len(before) + 3

    # The version now points at index version 2, recorded as a run of its own with its lineage.
    tags = champion.client.get_model_version(champion.name, champion.version).tags
    assert tags["index_version"] == "2" and tags["index_checksum"] == summary["checksum"]
    run = champion.client.get_run(tags["index_run_id"])
    catalogue_rows = select(load_manifest(manifest, layout="manifest"), role="catalogue")
    assert run.data.tags["skumatch.manifest_sha256"] == manifest_digest(catalogue_rows)
    assert run.data.tags["skumatch.parent_index_version"] == "1" and run.data.tags["skumatch.change"] == "add"
    assert run.data.metrics["index_recall_at_10"] == 1.0 and run.data.params["factory"] == "Flat"

    # The served files: the new rows are found, the old rows' vectors and SKUs are untouched.
    files, after = champion.current()
    assert after.meta["checksum"] == summary["checksum"] and len(after) == len(before) + 3
    assert np.array_equal(np.asarray(after.vectors[: len(before)]), np.asarray(before.vectors))
    assert list(after.items.rows())[: len(before)] == list(before.items.rows())
    encoder, preprocess, _ = load_encoder(files.encoder_dir)
    query = embed_images(encoder, preprocess, [str(tmp_path / "new" / "new-1.png")], 4)
    assert after.search(query, 1)[0][0][0] == NEW_SKU.name
    assert after.items.sku_count == before.items.sku_count + 1

    # Adding the same images again is refused before anything is embedded; nothing changes.
    again = champion.cli("index", "add", str(manifest))
    assert again.exit_code == 1 and "indexed already" in again.output
    assert champion.client.get_model_version(champion.name, champion.version).tags["index_version"] == "2"

    removed = champion.cli("index", "remove", NEW_SKU.name, known)
    assert removed.exit_code == 0, removed.output
    summary = printed_summary(removed.output)
    assert summary["index_version"] == 3 and summary["parent_index_version"] == 2
    _, final = champion.current()
    remaining = {sku for sku, _ in final.items.rows()}
    assert NEW_SKU.name not in remaining and known not in remaining
    assert len(final) == len(after) - sum(1 for sku, _ in after.items.rows() if sku in (NEW_SKU.name, known))
    assert all(sku not in (NEW_SKU.name, known) for sku, _ in final.search(query, 10)[0])
    assert final.meta["skus_removed"] == sorted([NEW_SKU.name, known])

    unknown = champion.cli("index", "remove", "No-Such-SKU")
    assert unknown.exit_code == 1 and "not in the index: No-Such-SKU" in unknown.output


def test_a_tampered_current_index_is_refused_before_any_change(champion, tmp_path, draw_sku):
    resolved, current = champion.current()
    run = champion.client.get_run(champion.client.get_model_version(champion.name, champion.version).run_id)
    logged = Path(run.info.artifact_uri.removeprefix("file://")) / "index" / "items.arrow"
    data = bytearray(logged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    logged.write_bytes(bytes(data))
    refused = champion.cli("index", "remove", current.items.sku(0))
    assert refused.exit_code == 1 and "corrupt" in refused.output
    assert champion.client.get_model_version(champion.name, champion.version).tags["index_version"] == "1"


def test_rebuild_index_is_a_prefect_flow_that_re_embeds_into_the_next_version(champion):
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    _, before = champion.current()
    environ = dict(os.environ)
    state = rebuild_index(
        data_root=str(champion.dataset),
        params_path=str(REPO_ROOT / "params.yaml"),
        overrides=champion.overrides + ["embedding.shard_size=2"],
        return_state=True,
    )
    assert state.is_completed()
    assert dict(os.environ) == environ  # the Dask cluster's OMP_NUM_THREADS=1 does not stay behind
    summary = state.result()
    assert summary["index_version"] == 2 and summary["parent_index_version"] == 1
    # The six catalogue images in three shards, embedded by both processes of a local Dask cluster
    # (embedding.dask_workers: 2); the shards are cleared once the index version is saved.
    assert summary["embedding"] == {"shards": 3, "resumed": 0, "embedded": 3, "workers": 2}
    assert not any((Path(".skumatch") / "shards").glob("*/shard-*.npy"))
    _, after = champion.current()
    # The same encoder and catalogue: the same rows and vectors, a new version with its own lineage.
    assert list(after.items.rows()) == list(before.items.rows())
    assert np.array_equal(np.asarray(after.vectors), np.asarray(before.vectors))
    assert after.meta["change"] == "rebuild" and after.meta["parent_checksum"] == before.meta["checksum"]
    assert after.meta["reject_below"] == before.meta["reject_below"] == 0.5
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert client.read_flow(flow_run.flow_id).name == "rebuild_index"
        assert flow_run.state.is_completed()
        assert client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run.name])))
