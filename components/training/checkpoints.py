"""Per-epoch checkpoints of a training run: safetensors and JSON, never pickles.

Checkpoints live in a folder named by :func:`run_fingerprint`, so a crashed run resumes where it
stopped and a run with other params never picks up a foreign checkpoint. Each is written under a
partial name and renamed last; the two newest are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from components.config import Params
from components.model import Encoder
from components.training.losses import MarginHead

LOGGER = logging.getLogger(__name__)


def run_fingerprint(params: Params, data_version: str | None) -> str:
    """A short hash of everything that shapes a training run (checkpoint folder name)."""
    # Not hashed: how long to train (epochs), where files go, how often to evaluate, the device:
    # a run asked for more epochs continues the shorter run's checkpoints.
    # Nor how images are decoded: decoding is deterministic, so the cache and workers change only speed.
    not_shaping = {
        "resume",
        "device",
        "epochs",
        "output_dir",
        "checkpoint_dir",
        "eval_every_epochs",
        "decoded_cache_mb",
        "loader_workers",
    }
    # The recipe's flat form, the layout of earlier params files: checkpoints from before the
    # train section was grouped keep their names and still resume.
    recipe = {key: value for key, value in params.train.flat().items() if key not in not_shaping}
    shaping = {
        "model": params.model.model_dump(),
        "train": recipe,
        "data": params.data.model_dump(),
        "data_version": data_version,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def save_checkpoint(
    folder: Path,
    epoch: int,
    encoder: Encoder,
    head: MarginHead,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float]],
    averaged: AveragedModel | None,
) -> None:
    """Write epoch ``epoch``'s weights, optimiser state, history and weight average to ``folder``."""
    from safetensors.torch import save_file

    target = folder / f"epoch-{epoch:04d}"
    partial = folder / f".epoch-{epoch:04d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    modules = {"encoder": encoder, "head": head, **({"averaged": averaged} if averaged is not None else {})}
    for name, module in modules.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
            str(partial / f"{name}.safetensors"),
        )
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in opt_state["state"].items():
        for key, value in values.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    save_file(tensors, str(partial / "optimizer.safetensors"))
    (partial / "state.json").write_text(
        json.dumps({"epoch": epoch, "history": history, "param_groups": opt_state["param_groups"], "scalars": scalars})
    )
    # Rename last, so a crash mid-write never leaves a checkpoint that looks complete.
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    for old in sorted(folder.glob("epoch-*"))[:-2]:
        shutil.rmtree(old)


def load_latest_checkpoint(
    folder: Path, encoder: Encoder, head: MarginHead, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]], dict[str, torch.Tensor] | None] | None:
    """Restore the newest checkpoint in place; returns its epoch, history and weight-average state."""
    from safetensors.torch import load_file

    checkpoints = sorted(folder.glob("epoch-*"))
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    state = json.loads((latest / "state.json").read_text())
    encoder.load_state_dict(load_file(str(latest / "encoder.safetensors")))
    head.load_state_dict(load_file(str(latest / "head.safetensors")))
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for name, value in list(load_file(str(latest / "optimizer.safetensors")).items()) + list(state["scalars"].items()):
        param_id, key = name.split(".", 1)
        opt_state["state"].setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict(opt_state)
    averaged_file = latest / "averaged.safetensors"
    averaged_state = load_file(str(averaged_file)) if averaged_file.exists() else None
    LOGGER.info("resumed from checkpoint %s", latest)
    return int(state["epoch"]), state["history"], averaged_state
