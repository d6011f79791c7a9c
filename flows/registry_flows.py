"""The registry's Prefect flows: ``promote``, ``rollback`` and ``evaluate`` a registered version.

Deployed from ``prefect.yaml`` so that an operator can run them from the Prefect UI or API, with
the run kept in Prefect's history beside the retrains. Each is one registry or evaluation call;
``skumatch promote`` / ``rollback`` / ``evaluate`` do the same from the command line.
"""

from __future__ import annotations

import tempfile
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
