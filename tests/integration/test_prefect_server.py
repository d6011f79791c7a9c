"""The deployments of ``prefect.yaml`` against the session's real ``prefect server start``, as a user runs them.

``prefect deploy --all`` from a project holding the real ``prefect.yaml``, a process worker, and
``skumatch data add``: its ``skumatch.data.added`` event must start the ``retrain`` deployment
through its trigger, and the worker must run it to a registered ``@champion``. Flows run
in-process never reach the ``/filter`` routes that ``prefect deploy`` and ``prefect deployment
ls`` call; with fastapi 0.151 and later a real server answered them 422 (the 3.8 client sends
``"limit": null``), so this also keeps the pinned versions honest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "skumatch-process"  # the work pool prefect.yaml names


def _prefect(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run a ``prefect`` CLI command; its output, or a failure showing it."""
    result = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def project(tmp_path, quick_retrain_overrides, synthetic_dataset) -> Path:
    """A git + DVC project holding the real ``prefect.yaml`` and ``flows/``, with a tiny model's
    params and its own MLflow store, and a copy of the synthetic dataset under ``data/``."""
    import shutil

    import yaml

    from components.config import load_params

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "prefect.yaml", root / "prefect.yaml")
    (root / "flows").symlink_to(REPO_ROOT / "flows")
    params = load_params(
        None,
        quick_retrain_overrides + [f"registry.tracking_uri=sqlite:///{root / 'mlflow.db'}"],
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    shutil.copytree(synthetic_dataset, root / "data" / "tiny")
    for command in (["git", "init", "-q"], [str(Path(sys.executable).with_name("dvc")), "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True, env=_isolated(os.environ, tmp_path))
    return root


def _isolated(env, tmp_path: Path) -> dict[str, str]:
    """DVC and git kept away from the developer's config and telemetry."""
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("[user]\n\tname = skumatch tests\n\temail = tests@skumatch.invalid\n")
    return {
        **env,
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "GIT_CONFIG_NOSYSTEM": "1",
    }


def test_new_data_announced_by_skumatch_data_add_retrains_through_a_worker(prefect_api, project, tmp_path):
    import time

    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    # PWD as a shell in the project would set it: prefect.yaml's pull step resolves {{ $PWD }}.
    # COLUMNS: the CLI's tables are not cut to a narrow terminal's width.
    env = {**_isolated(prefect_api, tmp_path), "PWD": str(project), "COLUMNS": "240"}
    run = {"cwd": project, "env": env, "capture_output": True, "text": True, "timeout": 300}
    _prefect(env, project, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    deployed = _prefect(env, project, "deploy", "--all")
    assert {
        "retrain/retrain",
        "promote/promote",
        "rollback/rollback",
        "evaluate/evaluate",
        "reproduce/reproduce",
    } <= set(deployed.replace("'", " ").split())
    # A /filter route that answered 422 with fastapi 0.151 and later (deploy --all calls another).
    listed = _prefect(env, project, "deployment", "ls")
    assert "retrain/retrain" in listed and "evaluate/evaluate" in listed
    worker_log = Path(os.environ.get("SKUMATCH_WORKER_LOG", tmp_path / "worker.log"))
    with worker_log.open("wb") as handle:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL],
            cwd=project,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        added = subprocess.run([str(Path(sys.executable).with_name("skumatch")), "data", "add", "data/tiny"], **run)
        assert added.returncode == 0, added.stdout + added.stderr
        dvc_hash = added.stdout.strip().splitlines()[-1]
        assert dvc_hash.endswith(".dir") and "announced skumatch.data.added" in added.stderr

        # The trigger's run of the retrain deployment, followed until it ends.
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("retrain/retrain")
            deadline, flow_run = time.monotonic() + 240, None
            while time.monotonic() < deadline and not (flow_run and flow_run.state and flow_run.state.is_final()):
                time.sleep(2)
                assert worker.poll() is None, worker_log.read_text()[-3000:]
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
                flow_run = runs[0] if runs else None
        assert flow_run is not None, "the event started no run of retrain/retrain:\n" + worker_log.read_text()[-3000:]
        assert flow_run.state.is_completed(), worker_log.read_text()[-5000:]
        assert flow_run.parameters["data_root"] == str((project / "data" / "tiny").resolve())

        # It registered and promoted a version trained on the announced folder's DVC version.
        uri = f"sqlite:///{project / 'mlflow.db'}"
        champion = MlflowClient(uri, uri).get_model_version_by_alias("skumatch-encoder", "champion")
        assert champion.tags["data_version"] == dvc_hash
        assert champion.tags["prefect_flow_run_id"] == str(flow_run.id)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)


def test_data_add_without_a_prefect_api_versions_the_data_and_says_no_event_went_out(project, tmp_path):
    # Without PREFECT_API_URL Prefect would start a temporary server for the event (20 s, then a
    # timeout); nothing could be listening to it, so the command says so and goes on.
    env = {key: value for key, value in _isolated(os.environ, tmp_path).items() if key != "PREFECT_API_URL"}
    added = subprocess.run(
        [str(Path(sys.executable).with_name("skumatch")), "data", "add", "data/tiny"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert added.stdout.strip().endswith(".dir")
    assert "no Prefect API configured (PREFECT_API_URL): skumatch.data.added not sent" in added.stderr
