"""Data-parallel training: two ``torchrun`` processes on gloo train as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from components.training.distributed import DataParallel
from flows.cli import app

REPO_ROOT = Path(__file__).resolve().parents[2]
# Stated tolerance: the per-epoch losses, validation scores and the saved projection's weights of
# two processes agree with one process's to float rounding of the gradient sum's order (absolute
# differences), and validation top-k exactly.
LOSS_TOLERANCE = SCORE_TOLERANCE = WEIGHT_TOLERANCE = 1e-5  # measured: 6e-7, 3e-8, 5e-8


def test_shares_cover_a_batch_once_and_their_weights_make_the_batch_mean():
    for count in (12, 13, 7):
        for world in (1, 2, 3):
            parts = [DataParallel(rank, world).share(count) for rank in range(world)]
            rows = np.concatenate([np.arange(count)[part] for part in parts])
            assert rows.tolist() == list(range(count))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
            # Each rank's mean loss times its weight, averaged over ranks, is the mean over the batch.
            losses = np.random.default_rng(count).random(count)
            weighted = [
                losses[part].mean() * DataParallel(rank, world).loss_weight(count) for rank, part in enumerate(parts)
            ]
            assert np.mean(weighted) == pytest.approx(losses.mean())


def test_one_process_is_not_parallel():
    alone = DataParallel()
    assert not alone.enabled and alone.is_main and alone.share(5) == slice(0, 5) and alone.loss_weight(5) == 1.0
    assert alone.mean(2.5) == 2.5


def _train_arguments(out: Path, overrides: list[str]) -> list[str]:
    """``skumatch train``'s arguments, writing the model and checkpoints under ``out``."""
    return [
        "train",
        "--params",
        str(REPO_ROOT / "params.yaml"),
        *[arg for override in overrides for arg in ("-S", override)],
        "-S",
        f"train.io.output_dir={out / 'model'}",
        "-S",
        f"train.io.checkpoint_dir={out / 'checkpoints'}",
    ]


def _printed(output: str) -> dict:
    return json.loads(output[output.index("{") :])


@pytest.mark.integration
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    tiny_model_overrides, synthetic_dataset, tmp_path
):
    from components.model import load_encoder

    overrides = tiny_model_overrides + [
        f"data.root={synthetic_dataset}",
        # One epoch on cached features, one on crops; augmentation off, so both runs draw alike.
        "train.schedule.epochs=2",
        "train.schedule.frozen_epochs=1",
        "train.schedule.eval_every_epochs=1",
        "train.sampler.batch_size=12",
        "train.sampler.unfrozen_batch_size=12",
        "train.sampler.images_per_sku=2",
        "train.augment.enabled=false",
        "train.augment.image_size=null",
        "train.device=cpu",
    ]
    # One process: here, through the same command; two: torchrun's processes on gloo.
    single = CliRunner().invoke(app, _train_arguments(tmp_path / "one", overrides))
    assert single.exit_code == 0, single.output
    alone = _printed(single.output)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "flows.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        command + _train_arguments(tmp_path / "two", overrides),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    pair = _printed(two.stdout)

    assert (alone["processes"], pair["processes"]) == (1, 2)
    assert len(pair["train_loss"]) == 2
    assert pair["train_loss"] == pytest.approx(alone["train_loss"], abs=LOSS_TOLERANCE)
    # Validation: the same answers (top-k), and the scores behind them to float rounding.
    assert set(pair["metrics"]) == set(alone["metrics"])
    for protocol, figures in alone["metrics"].items():
        for name, value in figures.items():
            if name.startswith("top") or name.startswith("queries"):
                assert pair["metrics"][protocol][name] == value, (protocol, name)
            else:
                assert pair["metrics"][protocol][name] == pytest.approx(value, abs=SCORE_TOLERANCE), (protocol, name)
    # Rank 0 alone saved, and its weights are the single process's.
    one, _, _ = load_encoder(tmp_path / "one" / "model")
    two, _, _ = load_encoder(tmp_path / "two" / "model")
    for (name, mine), (_, theirs) in zip(one.projection.state_dict().items(), two.projection.state_dict().items()):
        assert (mine - theirs).abs().max() <= WEIGHT_TOLERANCE, (name, float((mine - theirs).abs().max()))
