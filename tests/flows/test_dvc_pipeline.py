"""`dvc exp run` / `dvc repro` of the project's own dvc.yaml in a real DVC repo, on a tiny model and dataset.

The DVC stages call the `skumatch` CLI; the index they make must be the one the retrain flow's
`build-index` task makes from the same encoder and metrics: one index-building path. An
experiment run with `-S` shows in `dvc exp show` with its params and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import load_params
from components.data import load_manifest
from components.index import load_index
from flows.retrain import build_index

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # The venv's own `skumatch` and `dvc`, whatever the caller's PATH; a committer for git.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "skumatch tests",
        "GIT_AUTHOR_EMAIL": "tests@skumatch.invalid",
        "GIT_COMMITTER_NAME": "skumatch tests",
        "GIT_COMMITTER_EMAIL": "tests@skumatch.invalid",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def dvc_repo(tmp_path, synthetic_dataset, tiny_model_overrides):
    """A git + DVC repo holding the project's dvc.yaml, its stage deps, a tiny dataset and tiny params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "components", repo / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(synthetic_dataset, repo / "data" / "grocery")
    params = load_params(
        ROOT / "params.yaml",
        tiny_model_overrides
        + [
            "data.root=data/grocery",
            "train.augment.image_size=null",
            "train.schedule.epochs=1",
            "train.schedule.frozen_epochs=1",
            "train.sampler.batch_size=12",
            "train.schedule.lr=0.01",  # the experiment below runs with 0.02
            "train.schedule.backbone_lr=0.001",
            f"train.io.checkpoint_dir={tmp_path / 'checkpoints'}",
        ],
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    # Experiments need a commit to be based on.
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "baseline"], repo)
    return repo


def test_an_experiment_builds_the_index_the_flow_builds_and_shows_in_exp_show(dvc_repo, tmp_path, monkeypatch):
    import dvc.api

    _run([sys.executable, "-m", "dvc", "exp", "run", "-n", "faster-head", "-S", "train.schedule.lr=0.02"], dvc_repo)
    (shown,) = [row for row in dvc.api.exp_show(repo=str(dvc_repo)) if row.get("Experiment") == "faster-head"]
    assert shown["train.schedule.lr"] == 0.02
    assert 0.0 <= shown["catalogue.top1"] <= 1.0

    monkeypatch.chdir(dvc_repo)
    params = load_params("params.yaml")
    metrics = json.loads(Path(params.evaluate.metrics_path).read_text())
    encoder_meta = json.loads((Path(params.train.io.output_dir) / "encoder.json").read_text())
    repro = load_index(params.index.output_dir, expected_model_version="local")
    # The stage carried evaluation's open-set threshold and the training run's fingerprint.
    assert repro.meta["reject_below"] == pytest.approx(metrics["open_set"]["threshold"])
    assert repro.meta["run_fingerprint"] == encoder_meta["run_fingerprint"]
    assert repro.meta["model_name"] == params.registry.model_name

    # The flow's task, given the same encoder, data and threshold, writes the same index: same
    # meta, same vectors, hence the same checksum.
    manifest = load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    flow_checksum = build_index.fn(
        Path(params.train.io.output_dir),
        params,
        manifest,
        "local",
        tmp_path / "flow-index",
        metrics["open_set"]["threshold"],
    )
    flow = load_index(tmp_path / "flow-index", expected_checksum=flow_checksum)
    assert flow.meta == repro.meta
    assert flow_checksum == repro.meta["checksum"]

    # Nothing changed, so a second repro runs no stage.
    assert "didn't change, skipping" in _run([sys.executable, "-m", "dvc", "repro"], dvc_repo).stdout
