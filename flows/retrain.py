"""The ``retrain`` Prefect flow: validate -> fine-tune -> evaluate -> gate -> register -> index -> promote.

Every gate, passed or refused, publishes a challenger-against-champion report (a Prefect markdown
artifact, and markdown plus a plot with the MLflow run). A challenger the gate refuses is
registered too, tagged ``gate: refused`` with the numbers, and then the flow fails: it gets no
index and no alias, so nothing can serve it.

Each task wraps one component call and adds what orchestration is for: retries where a
store may hiccup, Prefect artifacts people look at (validation report, metrics, gate
verdict) and logging. The decisions themselves (validation rules, gate) live in components.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

# Inputs here are DataFrames, models and MLflow clients: hashing them for a cache key costs
# time and warnings, and results are not persisted anyway, so tasks do not cache.
from prefect.cache_policies import NO_CACHE

from components import data as data_lib
from components import evaluate as evaluate_lib
from components import lineage as lineage_lib
from components import registry
from components import validation as validation_lib
from components.config import Params, flatten_params, load_params
from components.index import indexing

LOGGER = logging.getLogger(__name__)
# Where the challenger report goes in the MLflow run's artifacts.
REPORT_FOLDER = "report"


@task(name="load-data", cache_policy=NO_CACHE)
def load_data(params: Params) -> tuple[pd.DataFrame, str]:
    """Read the dataset into a manifest and compute its DVC hash."""
    manifest = data_lib.load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    version = data_lib.data_version(params.data.root)
    get_run_logger().info(
        "dataset %s: %d images, %d SKUs, DVC hash %s",
        params.data.root,
        len(manifest),
        manifest["sku_id"].nunique(),
        version,
    )
    return manifest, version


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(manifest: pd.DataFrame, params: Params, report_dir: Path) -> validation_lib.ValidationReport:
    """Run the Great Expectations checkpoint; a failure stops the flow before training."""
    report = validation_lib.validate_dataset(manifest, params.validation, report_dir)
    create_markdown_artifact(
        key="data-validation", markdown=report.to_markdown(), description=f"GX data docs: {report.data_docs_path}"
    )
    validation_lib.raise_for_failures(report)
    return report


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune(params: Params, manifest: pd.DataFrame, data_version: str, run_id: str):
    """Fine-tune the encoder, tracking every epoch in the MLflow run."""
    from components.training import train_encoder

    return train_encoder(params, manifest, registry.MlflowTracker(run_id), data_version, progress=True)


def embedding_cache(params: Params, model_run: str | None, data_version: str) -> evaluate_lib.EmbeddingCache | None:
    """Where a model run's evaluation embeddings on this data are kept (None: the cache is off)."""
    if not params.evaluate.embedding_cache_dir or not model_run:
        return None
    return evaluate_lib.EmbeddingCache(params.evaluate.embedding_cache_dir, model_run, data_version)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(
    encoder_dir: Path, params: Params, manifest: pd.DataFrame, cache: evaluate_lib.EmbeddingCache | None = None
) -> evaluate_lib.Evaluation:
    """Both protocols' metrics of a saved encoder on the query split, and its top-1 per SKU."""
    from components.model import load_encoder

    def load():
        encoder, preprocess, _ = load_encoder(encoder_dir)
        return encoder, preprocess

    return evaluate_lib.evaluate_model(
        load, manifest, params.data.query_split, params.data.train_split, params.evaluate, cache
    )


@task(name="plots", cache_policy=NO_CACHE)
def log_plots(encoder_dir: Path, params: Params, manifest: pd.DataFrame, history: list[dict], run_id: str) -> list[str]:
    """Training curves, a t-SNE map and the worst confusions, stored with the MLflow run."""
    from matplotlib import pyplot as plt
    from mlflow import MlflowClient

    from components.model import load_encoder
    from components.report import run_figures

    encoder, preprocess, _ = load_encoder(encoder_dir)
    figures = run_figures(
        encoder,
        preprocess,
        manifest,
        params.data.query_split,
        params.data.train_split,
        history,
        params.evaluate.batch_size,
    )
    client = MlflowClient()
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"plots/{name}")
        plt.close(figure)
    return sorted(figures)


@task(name="evaluate-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def evaluate_champion(
    params: Params, manifest: pd.DataFrame, client, data_version: str
) -> tuple[str | None, evaluate_lib.Evaluation | None]:
    """Re-evaluate ``@champion`` on this run's data, so the gate compares like with like.

    Its embeddings come from the cache where its run was evaluated on this data version before
    (as the challenger it once was, or as champion); only then is it downloaded and embedded.
    """
    from components.model import load_encoder

    try:
        version = registry.resolve_version(client, params.registry.model_name, registry.CHAMPION)
    except registry.RegistryError:
        get_run_logger().info("no @champion yet: the gate checks thresholds only")
        return None, None

    def load():
        champion = registry.download_version(
            client,
            params.registry.model_name,
            str(version.version),
            dst=tempfile.mkdtemp(prefix="skumatch-champion-"),
            with_index=False,
        )
        encoder, preprocess, _ = load_encoder(champion.encoder_dir)
        return encoder, preprocess

    cache = embedding_cache(params, version.run_id, data_version)
    evaluation = evaluate_lib.evaluate_model(
        load, manifest, params.data.query_split, params.data.train_split, params.evaluate, cache
    )
    get_run_logger().info(
        "@champion v%s evaluated %s",
        version.version,
        "from its cached embeddings" if evaluation.from_cache else "by embedding it",
    )
    return str(version.version), evaluation


@task(name="gate", cache_policy=NO_CACHE)
def apply_gate(
    challenger: dict, champion: dict | None, champion_version: str | None, params: Params
) -> evaluate_lib.GateDecision:
    """Apply the promotion gate and publish the verdict (the flow registers a refused challenger too)."""
    decision = evaluate_lib.gate(challenger, champion, params.evaluate)
    rows = [{"model": "challenger", **evaluate_lib.flatten_metrics(challenger)}]
    if champion is not None:
        rows.append({"model": f"champion v{champion_version}", **evaluate_lib.flatten_metrics(champion)})
    create_table_artifact(key="evaluation-metrics", table=rows, description="top-k over distinct SKUs")
    create_markdown_artifact(key="promotion-gate", markdown=f"## {decision.summary()}\n")
    return decision


@task(name="challenger-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish_report(
    challenger: evaluate_lib.Evaluation,
    champion: evaluate_lib.Evaluation | None,
    champion_version: str | None,
    decision: evaluate_lib.GateDecision,
    params: Params,
    run_id: str,
) -> str:
    """The challenger-against-champion report, as a Prefect artifact and with the MLflow run; its markdown."""
    from matplotlib import pyplot as plt
    from mlflow import MlflowClient

    from components.comparison import challenger_report

    report = challenger_report(
        challenger, champion, champion_version, decision.summary(), params.evaluate.gate_protocol
    )
    client = MlflowClient()
    client.log_text(run_id, report.markdown, f"{REPORT_FOLDER}/challenger_vs_champion.md")
    client.log_figure(run_id, report.figure, f"{REPORT_FOLDER}/sku_top1.png")
    plt.close(report.figure)
    create_markdown_artifact(
        key="challenger-report",
        markdown=report.markdown,
        description=f"the gate's report; its plot is the MLflow run's {REPORT_FOLDER}/sku_top1.png",
    )
    return report.markdown


def version_lineage(
    decision: evaluate_lib.GateDecision, champion_version: str | None, champion: dict | None
) -> dict[str, str]:
    """The tags that trace a version: code commit, flow run, the champion it was compared with, the verdict."""
    return {
        **lineage_lib.code_version(),
        "prefect_flow_run_id": str(prefect_runtime.flow_run.id),
        "compared_champion_version": champion_version or "none",
        "compared_champion_metrics": json.dumps(champion or {}, sort_keys=True),
        "gate": "passed" if decision.passed else "refused",
        "gate_summary": decision.summary(),
    }


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register(client, params: Params, run_id: str, encoder_dir: Path, metrics: dict, data_version: str, lineage: dict):
    """Register the encoder as a new model version, refused or not, with its lineage."""
    return registry.register_version(client, params.registry, run_id, encoder_dir, metrics, data_version, lineage)


@task(name="build-index", cache_policy=NO_CACHE)
def build_index(
    encoder_dir: Path,
    params: Params,
    manifest: pd.DataFrame,
    version: str,
    out_dir: Path,
    reject_below: float | None = None,
) -> str:
    """Build the catalogue index from the registered version's encoder; returns its checksum.

    ``reject_below`` (the calibrated open-set threshold) travels in the index's checksummed
    meta, so the service answers "no confident match" with the threshold of its own model.
    """
    checksum, _ = indexing.build_model_index(
        encoder_dir,
        manifest,
        out_dir,
        params.index,
        params.embedding,
        params.registry.model_name,
        str(version),
        reject_below,
    )
    return checksum


@task(name="publish-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish_version(client, params: Params, version: str, index_dir: Path, checksum: str, gate: str) -> str | None:
    """Attach the index, alias the version ``@challenger`` and, if configured, promote it.

    An automatic promotion is recorded as made by this flow run, with the gate's verdict as its reason.
    """
    name = params.registry.model_name
    registry.attach_index(client, name, version, index_dir, checksum)
    registry.set_alias(client, name, registry.CHALLENGER, version)
    if params.registry.auto_promote:
        flow_run = prefect_runtime.flow_run
        registry.promote(client, name, version, by=f"prefect flow run {flow_run.name} ({flow_run.id})", reason=gate)
        return version
    return None


@flow(name="retrain", log_prints=True)
def retrain(
    params_path: str = "params.yaml", overrides: list[str] | None = None, data_root: str | None = None
) -> dict[str, Any]:
    """Retrain on the current data and promote the result if it passes the gate.

    Args:
        params_path: the params file.
        overrides: ``section.key=value`` changes on top of it.
        data_root: the dataset to train on (overrides ``data.root``).

    Returns:
        A summary: data version, run id, registered version, metrics, gate verdict, champion.
    """
    import mlflow

    overrides = list(overrides or []) + ([f"data.root={data_root}"] if data_root else [])
    params = load_params(params_path, overrides)
    manifest, version_of_data = load_data(params)
    client = registry.connect(params.registry)
    with mlflow.start_run(run_name="retrain") as run:
        run_id = run.info.run_id
        mlflow.log_params(flatten_params(params))
        # The whole tree as resolved, for `skumatch reproduce` (flat params are strings, and truncated).
        mlflow.log_dict(params.model_dump(mode="json"), registry.PARAMS_ARTIFACT)
        mlflow.set_tags({"data_version": version_of_data, "data_root": str(params.data.root)})
        work = Path(tempfile.mkdtemp(prefix="skumatch-run-"))
        try:
            validate_data(manifest, params, work / "data_docs")
        finally:
            if (work / "data_docs").exists():
                mlflow.log_artifacts(str(work / "data_docs"), "data_docs")
        result = fine_tune(params, manifest, version_of_data, run_id)
        evaluation = evaluate_model(
            result.model_dir, params, manifest, embedding_cache(params, run_id, version_of_data)
        )
        metrics = evaluation.metrics
        mlflow.log_metrics({f"eval.{k}": v for k, v in evaluate_lib.flatten_metrics(metrics).items()})
        mlflow.log_dict(metrics, "metrics.json")
        evaluate_lib.write_metrics(metrics, params.evaluate.metrics_path)
        if params.evaluate.plots:
            log_plots(result.model_dir, params, manifest, result.history, run_id)
        champion_version, champion_evaluation = evaluate_champion(params, manifest, client, version_of_data)
        champion = champion_evaluation.metrics if champion_evaluation else None
        if champion_evaluation is not None:
            mlflow.set_tag("champion_embeddings", "cached" if champion_evaluation.from_cache else "computed")
        decision = apply_gate(metrics, champion, champion_version, params)
        mlflow.set_tag("gate", decision.summary())
        publish_report(evaluation, champion_evaluation, champion_version, decision, params, run_id)
        lineage = version_lineage(decision, champion_version, champion)
        model_version = register(client, params, run_id, result.model_dir, metrics, version_of_data, lineage)
        if not decision.passed:
            # Registered, tagged refused, never indexed or aliased: the refusal can be audited.
            raise evaluate_lib.GateFailedError(decision)
    checksum = build_index(
        result.model_dir,
        params,
        manifest,
        model_version.version,
        work / "index",
        evaluate_lib.open_set_threshold(metrics),
    )
    promoted = publish_version(client, params, model_version.version, work / "index", checksum, decision.summary())
    summary = {
        "data_version": version_of_data,
        "run_id": run_id,
        "model_name": params.registry.model_name,
        "version": str(model_version.version),
        "index_checksum": checksum,
        "metrics": metrics,
        "gate": decision.summary(),
        "champion": promoted or champion_version,
        "flow_run_id": str(prefect_runtime.flow_run.id),
        "train_wall_time_s": round(result.wall_time_s, 1),
    }
    print(json.dumps(summary, indent=2))
    return summary
