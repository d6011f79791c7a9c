"""The registry's Prefect flows: ``promote``, ``rollback``, ``evaluate`` and ``reproduce`` a registered version.

Deployed from ``prefect.yaml`` so that an operator can run them from the Prefect UI or API, with
the run kept in Prefect's history beside the retrains. Each is one registry or evaluation call;
``skumatch promote`` / ``rollback`` / ``evaluate`` do the same from the command line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_table_artifact

from components import evaluate as evaluate_lib
from components import registry
from components.config import load_params


def _by(by: str | None) -> str:
    """Who moves ``@champion``: the caller's name, else this flow run."""
    return by or f"prefect flow run {prefect_runtime.flow_run.name} ({prefect_runtime.flow_run.id})"


@flow(name="promote")
def promote(
    version: str,
    reason: str,
    by: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Point ``@champion`` at ``version`` and record who, when and why; ``{"from", "to"}``."""
    params = load_params(params_path, overrides)
    client = registry.connect(params.registry)
    previous = registry.promote(client, params.registry.model_name, version, _by(by), reason)
    return {"from": previous, "to": str(version)}


@flow(name="rollback")
def rollback(
    reason: str, by: str | None = None, params_path: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Point ``@champion`` back at the previous champion and record the move; ``{"from", "to"}``."""
    params = load_params(params_path, overrides)
    client = registry.connect(params.registry)
    before, after = registry.rollback(client, params.registry.model_name, _by(by), reason)
    return {"from": before, "to": after}


@flow(name="evaluate")
def evaluate(
    model: str = registry.CHAMPION,
    data_root: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Both protocols' metrics of a registered version (number or alias) on the current data.

    Published as a Prefect table artifact; nothing in the registry changes.
    """
    from components.data import load_manifest
    from components.model import load_encoder

    params = load_params(params_path, list(overrides or []) + ([f"data.root={data_root}"] if data_root else []))
    client = registry.connect(params.registry)
    resolved = registry.download_version(
        client, params.registry.model_name, model, dst=tempfile.mkdtemp(prefix="skumatch-evaluate-"), with_index=False
    )
    encoder, preprocess, _ = load_encoder(resolved.encoder_dir)
    manifest = load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    metrics = evaluate_lib.evaluate_encoder(
        encoder, preprocess, manifest, params.data.query_split, params.data.train_split, params.evaluate
    )
    create_table_artifact(
        key="version-metrics",
        table=[{"model": f"v{resolved.version}", **evaluate_lib.flatten_metrics(metrics)}],
        description=f"{params.registry.model_name} version {resolved.version} on {params.data.root}",
    )
    return metrics


@flow(name="reproduce")
def reproduce(
    version: str, data_root: str | None = None, params_path: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train a registered version again from its recorded params on its recorded data, and evaluate it.

    ``data_root`` defaults to the recorded one; its DVC hash must be the version's (check the data
    out with ``git checkout`` + ``dvc checkout`` first). The run starts from scratch (fresh
    checkpoint and feature-cache folder) and registers nothing. ``params_path`` and ``overrides``
    only say which registry to read.

    Returns:
        The version, its data version, recorded and reproduced metrics, and the gate protocol's
        top-1 difference (reproduced minus recorded).
    """
    import yaml

    from components.data import data_version, load_manifest
    from components.model import load_encoder
    from components.training import train_encoder

    params = load_params(params_path, overrides)
    client = registry.connect(params.registry)
    recorded = registry.recorded_training(client, params.registry.model_name, version)
    root = data_root or recorded.params["data"]["root"]
    found = data_version(root)
    if found != recorded.data_version:
        raise registry.RegistryError(
            f"the data at {root} is {found}, and version {recorded.version} was trained on {recorded.data_version}: "
            "check that data version out (git checkout + dvc checkout), or name its folder with data_root"
        )
    scratch = Path(tempfile.mkdtemp(prefix="skumatch-reproduce-"))
    (scratch / "params.yaml").write_text(yaml.safe_dump(recorded.params, sort_keys=False))
    again = load_params(
        scratch / "params.yaml",
        [
            f"data.root={root}",
            f"train.io.output_dir={scratch / 'model'}",
            f"train.io.checkpoint_dir={scratch / 'work'}",
        ],
    )
    manifest = load_manifest(again.data.root, again.data.layout, again.data.max_images_per_sku)
    result = train_encoder(again, manifest, data_version=found, progress=False)
    encoder, preprocess, _ = load_encoder(result.model_dir)
    metrics = evaluate_lib.evaluate_encoder(
        encoder, preprocess, manifest, again.data.query_split, again.data.train_split, again.evaluate
    )
    gate = again.evaluate.gate_protocol
    difference = metrics[gate]["top1"] - recorded.metrics[gate]["top1"]
    create_table_artifact(
        key="reproduction",
        table=[
            {"model": f"v{recorded.version} as registered", **evaluate_lib.flatten_metrics(recorded.metrics)},
            {"model": f"v{recorded.version} trained again", **evaluate_lib.flatten_metrics(metrics)},
        ],
        description=f"{gate} top-1 difference {difference:+.4f} on {found}",
    )
    return {
        "version": recorded.version,
        "data_version": found,
        "recorded": recorded.metrics,
        "reproduced": metrics,
        "top1_difference": difference,
    }
