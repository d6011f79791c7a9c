"""The MLflow registry on a real SQLite store: versions, aliases, promotion, rollback, CLI, download."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from components import registry
from components.config import ModelParams, RegistryParams
from components.index import IndexMismatchError, save_index
from components.index.indexing import build_catalogue_index
from components.matcher import load_served_model
from components.model import build_encoder, save_encoder
from flows.cli import app

METRICS = {"catalogue": {"top1": 0.9, "top3": 1.0}, "nn": {"top1": 0.8, "top3": 0.95}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = RegistryParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test")
    return params, registry.connect(params)


@pytest.fixture
def tiny_encoder_dir(tmp_path, tiny_clip_dir):
    params = ModelParams(backbone="hf-clip", hf_model_id=str(tiny_clip_dir), embed_dim=16, image_size=16)
    encoder, preprocess = build_encoder(params)
    return save_encoder(encoder, preprocess, params, tmp_path / "encoder"), encoder, preprocess


def _register_with_index(store, encoder_bundle, synthetic_dataset, tmp_path, indexed=True):
    params, client = store
    model_dir, encoder, preprocess = encoder_bundle
    with mlflow.start_run() as run:
        version = registry.register_version(client, params, run.info.run_id, model_dir, METRICS, "abc.dir")
    if indexed:
        rows = pd.DataFrame(
            {"image_path": [str(p) for p in sorted(synthetic_dataset.glob("iconic-images-and-descriptions/*/*.jpg"))]}
        )
        rows["sku_id"] = [p.split("/")[-2] for p in rows["image_path"]]
        catalogue = build_catalogue_index(
            encoder, preprocess, rows, meta={"model_name": params.model_name, "model_version": str(version.version)}
        )
        folder = tmp_path / f"index-{version.version}"
        registry.attach_index(client, params.model_name, str(version.version), folder, save_index(catalogue, folder))
    return str(version.version)


def test_version_carries_metrics_data_version_and_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path):
    params, client = store
    version = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    stored = client.get_model_version(params.model_name, version)
    assert stored.tags["data_version"] == "abc.dir"
    assert json.loads(stored.tags["metrics"]) == METRICS
    assert stored.tags["metric.catalogue.top1"] == "0.900000"
    resolved = registry.download_version(client, params.model_name, version, tmp_path / "dl")
    assert (resolved.encoder_dir / "model.safetensors").exists()
    served = load_served_model(
        resolved.encoder_dir, resolved.index_dir, params.model_name, version, resolved.index_checksum
    )
    iconic = sorted(synthetic_dataset.glob("iconic-images-and-descriptions/*/*.jpg"))[0]
    from PIL import Image

    best = served.match([Image.open(iconic)], top_k=3)[0]
    assert best[0]["sku_id"] == iconic.parent.name and len(best) == 3
    assert np.allclose(np.linalg.norm(served.embed([Image.open(iconic)]), axis=1), 1.0, atol=1e-5)


def test_served_model_refuses_index_of_another_version(store, tiny_encoder_dir, synthetic_dataset, tmp_path):
    params, client = store
    first = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    resolved = registry.download_version(client, params.model_name, first, tmp_path / "dl")
    with pytest.raises(IndexMismatchError, match="built from model version 1, not the served version 2"):
        load_served_model(resolved.encoder_dir, resolved.index_dir, params.model_name, "2", resolved.index_checksum)
    with pytest.raises(IndexMismatchError, match="records deadbeef"):
        load_served_model(resolved.encoder_dir, resolved.index_dir, params.model_name, first, "deadbeef")


def test_promote_and_rollback(store, tiny_encoder_dir, synthetic_dataset, tmp_path):
    params, client = store
    v1 = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    v2 = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    v3 = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path, indexed=False)

    with pytest.raises(registry.RegistryError, match="no @champion|has no version or alias"):
        registry.rollback(client, params.model_name)
    assert registry.promote(client, params.model_name, v1) is None
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(client, params.model_name)
    assert str(registry.promote(client, params.model_name, v2)) == v1
    with pytest.raises(registry.RegistryError, match="has no index"):
        registry.promote(client, params.model_name, v3)
    with pytest.raises(registry.RegistryError, match="no version or alias '99'"):
        registry.promote(client, params.model_name, "99")
    assert str(registry.resolve_version(client, params.model_name, "@champion").version) == v2

    assert tuple(map(str, registry.rollback(client, params.model_name))) == (v2, v1)
    assert str(client.get_model_version_by_alias(params.model_name, "champion").version) == v1
    # Promoting the champion again is no move; refused promotions are none either.
    assert str(registry.promote(client, params.model_name, v1)) == v1
    assert [(m.action, m.from_version, m.to_version) for m in registry.champion_history(client, params.model_name)] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("rollback", v2, v1),
    ]


def test_every_move_records_who_when_and_why_and_rollback_replays_them(
    store, tiny_encoder_dir, synthetic_dataset, tmp_path
):
    import getpass
    from datetime import UTC, datetime, timedelta

    params, client = store
    v1, v2, v3 = (_register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path) for _ in range(3))
    registry.promote(client, params.model_name, v1, reason="first")
    registry.promote(client, params.model_name, v2, by="ana", reason="better on shelves")
    registry.promote(client, params.model_name, v3, by="ben", reason="new flavours")
    assert registry.rollback(client, params.model_name, by="ana", reason="v3 misreads lids") == (v3, v2)
    assert registry.rollback(client, params.model_name, by="ana", reason="v2 too") == (v2, v1)
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(client, params.model_name, reason="nothing left")

    moves = registry.champion_history(client, params.model_name)
    assert [(m.action, m.from_version, m.to_version, m.by, m.reason) for m in moves] == [
        ("promote", None, v1, getpass.getuser(), "first"),
        ("promote", v1, v2, "ana", "better on shelves"),
        ("promote", v2, v3, "ben", "new flavours"),
        ("rollback", v3, v2, "ana", "v3 misreads lids"),
        ("rollback", v2, v1, "ana", "v2 too"),
    ]
    for move in moves:
        assert abs(datetime.fromisoformat(move.at) - datetime.now(UTC)) < timedelta(minutes=5)
    # Each move is a tag of its own: the history is not one value that grows past a tag's limit.
    tags = client.get_registered_model(params.model_name).tags
    assert sorted(key for key in tags if key.startswith("champion_history.")) == [
        f"champion_history.{number:06d}" for number in range(1, 6)
    ]


def test_a_registry_from_before_recorded_moves_still_rolls_back(store, tiny_encoder_dir, synthetic_dataset, tmp_path):
    params, client = store
    v1, v2 = (_register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path) for _ in range(2))
    # What promote() left before moves were recorded: the alias and a JSON list of earlier champions.
    client.set_registered_model_alias(params.model_name, "champion", v2)
    client.set_registered_model_tag(params.model_name, "champion_history", json.dumps([v1]))
    assert registry.champion_history(client, params.model_name) == []
    assert registry.rollback(client, params.model_name, reason="back") == (v2, v1)
    assert [m.action for m in registry.champion_history(client, params.model_name)] == ["rollback"]


def test_cli_promote_rollback_and_champion(store, tiny_encoder_dir, synthetic_dataset, tmp_path):
    params, client = store
    v1 = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    v2 = _register_with_index(store, tiny_encoder_dir, synthetic_dataset, tmp_path)
    flags = ["-S", f"registry.tracking_uri={params.tracking_uri}", "-S", "registry.experiment=test"]
    runner = CliRunner()

    result = runner.invoke(app, ["promote", v1, *flags])
    assert result.exit_code == 2 and "--reason" in result.output  # a manual move says why
    assert runner.invoke(app, ["promote", v1, "--reason", "first", *flags]).exit_code == 0
    result = runner.invoke(app, ["promote", v2, "--reason", "better", "--by", "ana", *flags])
    assert result.exit_code == 0 and f"{v1} -> {v2}" in result.output
    shown = json.loads(runner.invoke(app, ["champion", *flags]).output)
    assert shown["champion"]["version"] == int(v2) or str(shown["champion"]["version"]) == v2
    assert shown["champion"]["metrics"] == METRICS

    result = runner.invoke(app, ["rollback", "--reason", "worse on lids", "--by", "ben", *flags])
    assert result.exit_code == 0 and f"{v2} -> {v1}" in result.output
    result = runner.invoke(app, ["rollback", "--reason", "again", *flags])
    assert result.exit_code == 1 and "no earlier champion" in result.output
    result = runner.invoke(app, ["promote", "42", "--reason", "typo", *flags])
    assert result.exit_code == 1 and "'42'" in result.output

    moves = json.loads(runner.invoke(app, ["history", "--json", *flags]).output)
    assert [(m["action"], m["from_version"], m["to_version"], m["by"], m["reason"]) for m in moves[1:]] == [
        ("promote", v1, v2, "ana", "better"),
        ("rollback", v2, v1, "ben", "worse on lids"),
    ]
    table = runner.invoke(app, ["history", *flags]).output.splitlines()
    assert table[0].split() == ["when", "(UTC)", "action", "from", "to", "by", "reason"]
    assert table[2].split()[1:] == ["promote", v1, v2, "ana", "better"]
    assert table[3].split()[1:] == ["rollback", v2, v1, "ben", "worse", "on", "lids"]
    result = runner.invoke(app, ["history", *flags[:2], "-S", "registry.model_name=nothing-here"])
    assert result.exit_code == 1 and "no registered model 'nothing-here'" in result.output
