"""The ``skumatch`` stage commands, run through typer's runner on real data and a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest
from typer.testing import CliRunner

from components import registry
from components.config import load_params
from components.model import build_encoder, save_encoder
from flows.cli import app


@pytest.fixture
def encoder_dir(tmp_path, tiny_model_overrides):
    params = load_params(None, tiny_model_overrides)
    encoder, preprocess = build_encoder(params.model)
    return save_encoder(encoder, preprocess, params.model, tmp_path / "encoder")


def _json_tail(output: str) -> dict:
    """The JSON document a command printed last (log lines may come before it)."""
    return json.loads(output[output.index("{") :])


def test_evaluate_a_model_folder_on_any_split(encoder_dir, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(encoder_dir),
            "--data",
            str(synthetic_dataset),
            "--queries",
            "val",
            "--metrics-out",
            "reports/metrics.json",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = _json_tail(result.output)
    assert set(metrics) == {"nn", "catalogue", "open_set"}
    assert {"top1", "top3", "top5", "delta_similarity", "map"} <= set(metrics["catalogue"])
    assert json.loads((tmp_path / "reports/metrics.json").read_text()) == metrics

    # Any <name>.txt of the layout is a query split; one that does not exist is a clear error.
    result = runner.invoke(app, ["evaluate", str(encoder_dir), "--data", str(synthetic_dataset), "--queries", "test"])
    assert result.exit_code == 1 and "split 'test' is not in the dataset" in result.output


def test_evaluate_a_registered_alias(encoder_dir, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(None, [f"registry.tracking_uri={uri}"])
    client = registry.connect(params.registry)
    with mlflow.start_run() as run:
        version = registry.register_version(client, params.registry, run.info.run_id, encoder_dir, {}, "x.dir")
    registry.set_alias(client, params.registry.model_name, "challenger", str(version.version))

    runner = CliRunner()
    flags = ["--data", str(synthetic_dataset), "-S", f"registry.tracking_uri={uri}"]
    by_alias = runner.invoke(app, ["evaluate", "challenger", *flags])
    by_number = runner.invoke(app, ["evaluate", str(version.version), *flags])
    assert by_alias.exit_code == 0 and by_number.exit_code == 0, by_alias.output + by_number.output
    assert _json_tail(by_alias.output) == _json_tail(by_number.output)

    missing = runner.invoke(app, ["evaluate", "champion", *flags])
    assert missing.exit_code == 1 and "no version or alias 'champion'" in missing.output


def test_bad_params_are_refused_with_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", "-S", "train.epochz=3"])
    assert result.exit_code == 1
    assert "train.epochz" in result.output and "Extra inputs are not permitted" in result.output


def test_index_without_evaluation_metrics_is_refused_naming_the_command_to_run(tmp_path, monkeypatch):
    # The index carries the open-set threshold that evaluation calibrates; without its metrics
    # file the command stops instead of building an index that never says "no confident match".
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "reports" / "metrics.json"
    result = CliRunner().invoke(app, ["index", "build", "--model-dir", "models/encoder", "--metrics", str(missing)])
    assert result.exit_code == 1
    assert f"no evaluation metrics at {missing}" in result.output
    assert "skumatch evaluate models/encoder --metrics-out" in result.output
    assert not (tmp_path / "models" / "index").exists()
