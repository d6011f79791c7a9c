"""The retrain flow under Prefect's test harness, with a real SQLite MLflow and real FAISS."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components import registry
from components.config import load_params
from components.evaluate import GateFailedError
from components.matcher import load_served_model
from components.validation import DataValidationError
from flows import registry_flows
from flows.retrain import retrain

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def published_report(client: MlflowClient, run_id: str, flow_run_id: str) -> str:
    """The challenger report of a run: its MLflow markdown, checked equal to the flow run's Prefect artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    assert {a.path for a in client.list_artifacts(run_id, "report")} == {
        "report/challenger_vs_champion.md",
        "report/sku_top1.png",
    }
    markdown = Path(client.download_artifacts(run_id, "report/challenger_vs_champion.md")).read_text()
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["challenger-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert artifact.type == "markdown" and artifact.data == markdown
    return markdown


@pytest.fixture(autouse=True)
def _on_prefect_api(prefect_api):
    """Every test here runs its flow against the session's temporary Prefect server."""


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_overrides, synthetic_dataset):
    """A scratch working folder with its own MLflow store; returns the flow's overrides."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_model_overrides + [
        f"registry.tracking_uri={uri}",
        f"data.root={synthetic_dataset}",
        "train.schedule.epochs=4",
        "train.schedule.frozen_epochs=3",
        "train.sampler.batch_size=12",
        "train.sampler.images_per_sku=2",
        "train.schedule.lr=0.01",
        "train.schedule.backbone_lr=0.001",
        "evaluate.min_top1=0.3",
        "evaluate.min_top3=0.5",
    ]
    return {"overrides": overrides, "uri": uri, "root": tmp_path}


def test_first_run_registers_indexes_and_promotes(workspace):
    summary = retrain(params_path="params.yaml", overrides=workspace["overrides"])

    client = MlflowClient(workspace["uri"], workspace["uri"])
    champion = client.get_model_version_by_alias("skumatch-encoder", "champion")
    assert str(champion.version) == summary["version"] == "1"
    assert str(client.get_model_version_by_alias("skumatch-encoder", "challenger").version) == "1"
    # The version carries its data version, metrics and index checksum ...
    assert champion.tags["data_version"].endswith(".dir")
    assert json.loads(champion.tags["metrics"])["catalogue"]["top1"] == pytest.approx(
        summary["metrics"]["catalogue"]["top1"]
    )
    assert champion.tags["index_checksum"] == summary["index_checksum"]
    # Its lineage: the code's commit and tree state, the flow run, no champion to compare with.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout
    assert champion.tags["git_commit"] == commit.strip()
    assert champion.tags["git_dirty"] == str(bool(changed.strip())).lower()
    assert champion.tags["prefect_flow_run_id"] == summary["flow_run_id"]
    assert champion.tags["compared_champion_version"] == "none" and champion.tags["gate"] == "passed"
    # The automatic promotion is recorded as this flow run's, with the gate's verdict as its reason.
    (move,) = registry.champion_history(client, "skumatch-encoder")
    assert (move.action, move.from_version, move.to_version, move.reason) == ("promote", None, "1", summary["gate"])
    assert move.by.startswith("prefect flow run ") and summary["flow_run_id"] in move.by
    # ... its run the resolved params, per-epoch history and the GX data docs.
    run = client.get_run(champion.run_id)
    assert run.data.params["train.schedule.epochs"] == "4"
    assert run.data.params["data.version"] == champion.tags["data_version"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [0, 1, 2, 3]
    # Validation every train.schedule.eval_every_epochs (2 in params.yaml) and after the last epoch.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val.catalogue.top3")] == [1, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"encoder", "index", "data_docs", "metrics.json", "params.json", "plots", "report"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/embedding_map.png", "plots/worst_confusions.png"}
    # The gate's report, in MLflow and in Prefect: the challenger's figures and no champion.
    report = published_report(client, run.info.run_id, summary["flow_run_id"])
    assert report.startswith("# Challenger against no champion\n\n" + summary["gate"])
    assert f"| catalogue.top1 | {summary['metrics']['catalogue']['top1']:.4f} |" in report
    assert "No `@champion` to compare with" in report
    # The DVC metrics file is written too.
    metrics_file = json.loads((workspace["root"] / "reports/metrics.json").read_text())
    assert set(metrics_file) == {"nn", "catalogue", "open_set"}

    # The index verifies against the version and serves sensible matches.
    resolved = registry.download_version(client, "skumatch-encoder", "champion", workspace["root"] / "dl")
    served = load_served_model(
        resolved.encoder_dir, resolved.index_dir, "skumatch-encoder", resolved.version, resolved.index_checksum
    )
    assert len(served.catalogue) == 6
    # The open-set threshold calibrated in evaluation travels in the index meta (checksummed).
    assert served.reject_below == pytest.approx(summary["metrics"]["open_set"]["threshold"])
    assert {"precision", "recall", "threshold"} <= set(summary["metrics"]["open_set"])

    # The registry's flows (the promote, rollback and evaluate deployments) on that version.
    again = registry_flows.evaluate("champion", params_path="params.yaml", overrides=workspace["overrides"])
    assert again["catalogue"]["top1"] == pytest.approx(summary["metrics"]["catalogue"]["top1"], abs=1e-6)
    assert registry_flows.promote("1", "already champion", overrides=workspace["overrides"]) == {"from": "1", "to": "1"}
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry_flows.rollback("nothing to go back to", overrides=workspace["overrides"])
    assert len(registry.champion_history(client, "skumatch-encoder")) == 1  # neither was a move

    # Trained again from scratch on its recorded params and data version: the same top-1, within a point.
    reproduced = registry_flows.reproduce("1", overrides=workspace["overrides"])
    assert reproduced["data_version"] == champion.tags["data_version"]
    assert abs(reproduced["top1_difference"]) <= 0.01
    assert reproduced["reproduced"]["catalogue"]["top1"] == pytest.approx(
        summary["metrics"]["catalogue"]["top1"], abs=0.01
    )
    assert len(client.search_model_versions("name='skumatch-encoder'")) == 1  # nothing registered
    # Refused, before any training: other data than the version's, and a version with no recorded params.
    changed = workspace["root"] / "changed-data"
    shutil.copytree(run.data.tags["data_root"], changed)
    next(changed.rglob("*.jpg")).unlink()
    with pytest.raises(registry.RegistryError, match="trained on"):
        registry_flows.reproduce("1", data_root=str(changed), overrides=workspace["overrides"])
    bare_run = client.create_run(run.info.experiment_id).info.run_id
    params = load_params("params.yaml", workspace["overrides"])
    bare = registry.register_version(
        client, params.registry, bare_run, resolved.encoder_dir, summary["metrics"], champion.tags["data_version"]
    )
    with pytest.raises(registry.RegistryError, match="no recorded params.json"):
        registry_flows.reproduce(str(bare.version), overrides=workspace["overrides"])


def test_worse_challenger_is_refused_and_champion_kept(workspace):
    first = retrain(params_path="params.yaml", overrides=workspace["overrides"])
    # An untrained challenger (zero learning rates) on the same data must lose to the champion.
    worse = workspace["overrides"] + [
        "train.schedule.lr=1e-12",
        "train.schedule.backbone_lr=0",
        "train.schedule.epochs=1",
        "train.schedule.frozen_epochs=1",
        "evaluate.min_top1=0",
        "evaluate.min_top3=0",
        "evaluate.champion_tolerance=0",
        "train.io.checkpoint_dir=checkpoints-worse",
    ]
    with pytest.raises(Exception) as caught:
        retrain(params_path="params.yaml", overrides=worse)
    error = caught.value
    assert isinstance(error, GateFailedError), error
    assert "vs champion" in str(error) and "worse" in str(error)
    assert any(char.isdigit() for char in str(error))
    client = MlflowClient(workspace["uri"], workspace["uri"])
    assert str(client.get_model_version_by_alias("skumatch-encoder", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("skumatch-encoder", "challenger").version) == "1"
    # The refused challenger is registered for the audit: tagged refused, compared with v1, no index.
    refused = client.get_model_version("skumatch-encoder", "2")
    assert refused.tags["gate"] == "refused" and refused.tags["gate_summary"] == str(error)
    # The champion's metrics on the challenger's data: the same data here, so the first run's figures,
    # read from the embeddings the first run made of it (as challenger), not embedded again.
    assert refused.tags["compared_champion_version"] == "1"
    assert client.get_run(refused.run_id).data.tags["champion_embeddings"] == "cached"
    assert client.get_run(first["run_id"]).data.tags.get("champion_embeddings") is None  # no champion then
    compared = json.loads(refused.tags["compared_champion_metrics"])
    for protocol in ("catalogue", "nn"):
        assert compared[protocol]["top1"] == pytest.approx(first["metrics"][protocol]["top1"], abs=1e-6)
    assert "index_checksum" not in refused.tags
    # The refusal's report compares both on the same data, metric by metric and SKU by SKU.
    report = published_report(client, refused.run_id, refused.tags["prefect_flow_run_id"])
    assert report.startswith("# Challenger against champion v1\n\n" + str(error))
    challenger_metrics = json.loads(refused.tags["metrics"])
    top1, best = challenger_metrics["catalogue"]["top1"], compared["catalogue"]["top1"]
    assert f"| catalogue.top1 | {top1:.4f} | {best:.4f} | {top1 - best:+.4f} |" in report
    assert "## SKUs that gained most (catalogue top-1)" in report and "## SKUs that lost most" in report
    assert "6 SKUs compared:" in report
    with pytest.raises(registry.RegistryError, match="no index"):
        registry.promote(client, "skumatch-encoder", "2")


def test_planted_bad_dataset_stops_before_training(workspace, synthetic_dataset, tmp_path):
    bad = shutil.copytree(synthetic_dataset, tmp_path / "bad")
    train_lines = (bad / "train.txt").read_text().splitlines()
    corrupt = bad / train_lines[0].split(",")[0]
    corrupt.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    leaked = train_lines[5].split(",")[0]
    val_lines = (bad / "val.txt").read_text().splitlines()
    shutil.copy(bad / leaked, bad / val_lines[0].split(",")[0])
    classes = (bad / "classes.csv").read_text().splitlines()
    fields = classes[2].split(",")
    no_catalogue_sku = fields[0]
    fields[4] = ""
    classes[2] = ",".join(fields)
    (bad / "classes.csv").write_text("\n".join(classes) + "\n")

    with pytest.raises(DataValidationError) as caught:
        retrain(params_path="params.yaml", overrides=workspace["overrides"] + [f"data.root={bad}"])
    message = str(caught.value)
    assert "image_decodes" in message and str(corrupt) in message
    assert "no_cross_split_duplicate" in message and str(bad / leaked) in message
    assert "catalogue_image_present" in message and no_catalogue_sku in message
    client = MlflowClient(workspace["uri"], workspace["uri"])
    assert client.search_model_versions("name='skumatch-encoder'") == []
    assert not Path("models").exists()
