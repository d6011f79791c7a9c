"""``skumatch``: the command line. Every command is a thin call into components or flows.

Stage commands (``validate``, ``train``, ``evaluate``, ``index``) are what ``dvc.yaml`` runs;
``retrain`` runs the whole Prefect flow; ``promote``/``rollback`` move MLflow aliases and
``history`` shows who moved them, when and why;
``build``/``serve``/``match`` package, serve and call the matching service.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# Usage reports would only fail (and log errors) on hosts with no internet; opt out unless the
# user chose otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

app = typer.Typer(
    help="skumatch: product image matching, from data to a served model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Bring datasets under DVC.", no_args_is_help=True)
app.add_typer(data_app, name="data")
index_app = typer.Typer(
    help="Build a local index, or change a registered version's catalogue without training.", no_args_is_help=True
)
app.add_typer(index_app, name="index")

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. train.schedule.epochs=3")]
DataOption = Annotated[Optional[str], typer.Option("--data", help="dataset path (overrides data.root)")]
ReasonOption = Annotated[str, typer.Option("--reason", help="why: kept with the move in the registry's history")]
ByOption = Annotated[Optional[str], typer.Option("--by", help="who moves it (default: the OS user)")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def _params(params_path: Path, overrides: list[str] | None, data: str | None = None):
    from components.config import ParamsError, load_params

    try:
        return load_params(params_path, list(overrides or []) + ([f"data.root={data}"] if data else []))
    except ParamsError as err:
        _fail(str(err))


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Configure logging once for every command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Great Expectations logs hundreds of INFO lines per checkpoint; keep its warnings only.
    for noisy in ("great_expectations", "faiss.loader", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def retrain(params: ParamsOption = Path("params.yaml"), overrides: SetOption = None, data: DataOption = None) -> None:
    """Run the retrain flow: validate, fine-tune, evaluate, gate, register, index, promote."""
    from components.config import ParamsError
    from components.data import DatasetError
    from components.evaluate import GateFailedError
    from components.validation import DataValidationError
    from flows.retrain import retrain as retrain_flow

    try:
        retrain_flow(str(params), list(overrides or []), data)
    except (GateFailedError, DataValidationError, DatasetError, ParamsError) as err:
        _fail(str(err))


@app.command()
def validate(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    data: DataOption = None,
    report_dir: Annotated[Path, typer.Option(help="where the GX data docs go")] = Path("reports/validation"),
) -> None:
    """Validate a dataset with the Great Expectations checkpoint (DVC stage ``validate``)."""
    from components.data import DatasetError, load_manifest
    from components.validation import validate_dataset

    cfg = _params(params, overrides, data)
    try:
        manifest = load_manifest(cfg.data.root, cfg.data.layout, cfg.data.max_images_per_sku)
    except DatasetError as err:
        _fail(str(err))
    report = validate_dataset(manifest, cfg.validation, report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(report.to_dict(), indent=2))
    typer.echo(report.to_markdown())
    if not report.success:
        _fail(f"validation failed: {len(report.failures)} problem(s); data docs at {report.data_docs_path}")


@app.command()
def train(params: ParamsOption = Path("params.yaml"), overrides: SetOption = None, data: DataOption = None) -> None:
    """Fine-tune the encoder into ``train.io.output_dir`` (DVC stage ``train``; no registry).

    Prints the last epoch's validation metrics (the gate protocol; ``evaluate`` gives both) and
    each epoch's loss. On several processes: ``torchrun --nproc-per-node N -m flows.cli train``
    (gloo on a CPU, NCCL on GPUs); rank 0 saves and prints.
    """
    from components.data import data_version, load_manifest
    from components.training import train_encoder

    cfg = _params(params, overrides, data)
    manifest = load_manifest(cfg.data.root, cfg.data.layout, cfg.data.max_images_per_sku)
    result = train_encoder(cfg, manifest, data_version=data_version(cfg.data.root))
    if result.rank != 0:
        return
    typer.echo(
        json.dumps(
            {
                "model_dir": str(result.model_dir),
                "wall_time_s": round(result.wall_time_s, 1),
                "processes": result.world_size,
                "metrics": result.metrics,
                "train_loss": [record["train.loss"] for record in result.history],
            },
            indent=2,
        )
    )


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Argument(help="registered version or alias (e.g. 3, champion), or a model folder")
    ] = "champion",
    data: DataOption = None,
    queries: Annotated[Optional[str], typer.Option(help="query split: any <name>.txt of the layout")] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    metrics_out: Annotated[Optional[Path], typer.Option(help="also write the metrics JSON here")] = None,
) -> None:
    """Print both protocols' metrics (nn and catalogue) as JSON."""
    from components import registry
    from components.data import DatasetError, load_manifest
    from components.evaluate import evaluate_encoder, write_metrics
    from components.model import load_encoder

    cfg = _params(params, overrides, data)
    query_split = queries or cfg.data.query_split
    try:
        if Path(model).is_dir():
            model_dir = Path(model)
        else:
            client = registry.connect(cfg.registry)
            model_dir = registry.download_version(client, cfg.registry.model_name, model, with_index=False).encoder_dir
        encoder, preprocess, _ = load_encoder(model_dir)
        manifest = load_manifest(cfg.data.root, cfg.data.layout, cfg.data.max_images_per_sku)
        metrics = evaluate_encoder(encoder, preprocess, manifest, query_split, cfg.data.train_split, cfg.evaluate)
    except (registry.RegistryError, DatasetError, FileNotFoundError) as err:
        _fail(str(err))
    if metrics_out:
        write_metrics(metrics, metrics_out)
    typer.echo(json.dumps(metrics, indent=2))


@index_app.command("build")
def index_build(
    model_dir: Annotated[Path, typer.Option(help="a saved encoder folder")] = Path("models/encoder"),
    out: Annotated[Optional[Path], typer.Option(help="index folder (default index.output_dir)")] = None,
    metrics: Annotated[
        Optional[Path],
        typer.Option(
            help="the encoder's evaluation metrics, whose open-set threshold the index carries "
            "(default evaluate.metrics_path, what `skumatch evaluate --metrics-out` writes)"
        ),
    ] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    data: DataOption = None,
) -> None:
    """Build the catalogue index of a saved encoder, outside the registry (DVC stage ``index``)."""
    from components.data import load_manifest
    from components.evaluate import open_set_threshold
    from components.index.indexing import build_model_index

    cfg = _params(params, overrides, data)
    metrics_file = metrics or Path(cfg.evaluate.metrics_path)
    if not metrics_file.is_file():
        _fail(
            f"no evaluation metrics at {metrics_file}: run `skumatch evaluate {model_dir} --metrics-out "
            f"{metrics_file}` first; the index carries the open-set threshold it calibrates"
        )
    manifest = load_manifest(cfg.data.root, cfg.data.layout, cfg.data.max_images_per_sku)
    out_dir = out or Path(cfg.index.output_dir)
    checksum, catalogue = build_model_index(
        model_dir,
        manifest,
        out_dir,
        cfg.index,
        cfg.embedding,
        cfg.registry.model_name,
        "local",
        open_set_threshold(json.loads(metrics_file.read_text())),
    )
    typer.echo(
        json.dumps(
            {
                "index_dir": str(out_dir),
                "checksum": checksum,
                "ntotal": len(catalogue),
                "reject_below": catalogue.meta.get("reject_below"),
            }
        )
    )


ModelOption = Annotated[str, typer.Option("--model", help="registered version number or alias")]


def _index_change(run) -> None:
    """Run an index flow and print its summary; a refusal is an error message, not a traceback."""
    from components.data import DatasetError
    from components.index import IndexMismatchError
    from components.registry import RegistryError

    try:
        typer.echo(json.dumps(run()))
    except (ValueError, IndexMismatchError, RegistryError, DatasetError) as err:
        _fail(str(err))


@index_app.command("add")
def index_add(
    manifest: Annotated[Path, typer.Argument(help="a manifest (CSV/Parquet) whose catalogue rows are added")],
    model: ModelOption = "champion",
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Embed new products (or new images of known ones) into the next index version of ``--model``."""
    from flows.index_flows import add_products

    _index_change(lambda: add_products(str(manifest), model, str(params), list(overrides or [])))


@index_app.command("remove")
def index_remove(
    skus: Annotated[list[str], typer.Argument(help="SKU ids whose every catalogue image is removed")],
    model: ModelOption = "champion",
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Remove products from the catalogue, into the next index version of ``--model``."""
    from flows.index_flows import remove_products

    _index_change(lambda: remove_products(list(skus), model, str(params), list(overrides or [])))


@index_app.command("rebuild")
def index_rebuild(
    model: ModelOption = "champion",
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    data: DataOption = None,
) -> None:
    """Re-embed the whole current catalogue with ``--model``'s encoder into its next index version (no training)."""
    from flows.index_flows import rebuild_index

    _index_change(lambda: rebuild_index(model, data, str(params), list(overrides or [])))


def _move_champion(params: Path, overrides: list[str] | None, move) -> None:
    """Run a registry action that moves ``@champion`` and print ``from -> to``.

    Args:
        move: ``(client, model_name) -> (from_version, to_version)``.
    """
    from components import registry

    cfg = _params(params, overrides)
    client = registry.connect(cfg.registry)
    try:
        before, after = move(client, cfg.registry.model_name)
    except registry.RegistryError as err:
        _fail(str(err))
    typer.echo(f"@champion of {cfg.registry.model_name}: {before} -> {after}")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="the model version to make @champion")],
    reason: ReasonOption,
    by: ByOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Point ``@champion`` at VERSION (the previous champion is kept for rollback)."""
    from components import registry

    _move_champion(
        params, overrides, lambda client, model: (registry.promote(client, model, version, by, reason), version)
    )


@app.command()
def rollback(
    reason: ReasonOption, by: ByOption = None, params: ParamsOption = Path("params.yaml"), overrides: SetOption = None
) -> None:
    """Point ``@champion`` back at the previous champion."""
    from components import registry

    _move_champion(params, overrides, lambda client, model: registry.rollback(client, model, by, reason))


@app.command()
def history(
    as_json: Annotated[bool, typer.Option("--json", help="the moves as a JSON list")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Every move of ``@champion``, oldest first: when, what, from and to which version, who, why."""
    from dataclasses import asdict

    from components import registry

    cfg = _params(params, overrides)
    try:
        moves = registry.champion_history(registry.connect(cfg.registry), cfg.registry.model_name)
    except registry.RegistryError as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps([asdict(move) for move in moves], indent=2))
        return
    rows = [("when (UTC)", "action", "from", "to", "by", "reason")] + [
        (move.at, move.action, move.from_version or "-", move.to_version, move.by, move.reason) for move in moves
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


@app.command()
def reproduce(
    version: Annotated[str, typer.Argument(help="the model version (or alias) to train again")],
    data: DataOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Train VERSION again from its recorded params on its recorded data version, and compare its metrics.

    ``--data`` names the version's data folder when it is not where the version was trained.
    """
    from components import registry
    from flows.registry_flows import reproduce as reproduce_flow

    try:
        outcome = reproduce_flow(version, data, str(params), overrides)
    except registry.RegistryError as err:
        _fail(str(err))
    typer.echo(json.dumps(outcome, indent=2))


@app.command()
def champion(params: ParamsOption = Path("params.yaml"), overrides: SetOption = None) -> None:
    """Show the current ``@champion`` and ``@challenger`` with their metrics."""
    from components import registry

    cfg = _params(params, overrides)
    client = registry.connect(cfg.registry)
    shown = {}
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        try:
            version = registry.resolve_version(client, cfg.registry.model_name, alias)
            shown[alias] = {
                "version": version.version,
                "data_version": version.tags.get("data_version"),
                "index_checksum": version.tags.get("index_checksum"),
                "metrics": json.loads(version.tags.get("metrics", "{}")),
            }
        except registry.RegistryError:
            shown[alias] = None
    typer.echo(json.dumps(shown, indent=2))


@app.command()
def build(
    ref: Annotated[str, typer.Option(help="version or alias to package")] = "champion",
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Package a registered model and its index into a Bento."""
    from components import registry
    from components.index import IndexMismatchError
    from serving.build import package_champion

    cfg = _params(params, overrides)
    try:
        model_tag, bento_tag = package_champion(cfg, ref)
    except (registry.RegistryError, IndexMismatchError) as err:
        _fail(str(err))
    typer.echo(json.dumps({"bento_model": model_tag, "bento": bento_tag}))


@app.command()
def serve(
    bento: Annotated[Optional[str], typer.Option(help="Bento tag (default: the latest skumatch Bento)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default serve.port)")] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Serve a Bento on localhost (foreground, like ``bentoml serve``)."""
    from serving.build import serve_command

    cfg = _params(params, overrides)
    command = serve_command(bento, port or cfg.serve.port, host=cfg.serve.host)
    typer.echo(" ".join(command), err=True)
    # Become the server process, so a signal sent to this PID (Ctrl-C, a supervisor, the
    # quickstart's cleanup) stops the server instead of leaving it orphaned.
    os.execv(command[0], command)


@app.command()
def match(
    images: Annotated[list[Path], typer.Argument(help="one or more photos to match", exists=True, dir_okay=False)],
    url: Annotated[str, typer.Option(help="the service's base URL")] = "http://127.0.0.1:3000",
    top_k: Annotated[int, typer.Option(min=1, max=100)] = 5,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="SKUMATCH_API_KEY", help="the service's API key, when it requires one")
    ] = None,
) -> None:
    """Send photos to a running service and print the top SKUs of each.

    One photo goes to ``/match``; several go to ``/match_batch``, up to its per-request limit at a
    time, so the service embeds them in batches. A service that requires API keys takes one from
    ``--api-key`` or ``SKUMATCH_API_KEY``.
    """
    import httpx

    from serving.client import SkumatchClient, SkumatchError

    try:
        with SkumatchClient(url, api_key, timeout=120) as client:
            # Results are printed as each request answers, so a long list shows progress and a
            # refused request later on still leaves the earlier answers on screen.
            results = [client.match(images[0], top_k)] if len(images) == 1 else client.iter_match_batch(images, top_k)
            for path, result in zip(images, results):
                unsure = "  (no confident match)" if result.no_confident_match else ""
                typer.echo(f"{path} -> model {result.model_name} v{result.model_version}{unsure}")
                for rank, hit in enumerate(result.matches, start=1):
                    typer.echo(f"  {rank}. {hit.sku_id:<30} {hit.score:.4f}")
    except SkumatchError as err:
        _fail(_match_error(err, images))
    except httpx.HTTPError as err:
        _fail(f"no answer from {url}: {err}")


def _match_error(err, sent: list[Path]) -> str:
    """What to print for the service's refusal (a ``serving.client.SkumatchError``) of ``sent``."""
    # The service names undecodable uploads by position; say which of the user's files they are.
    if err.bad_images:
        return f"{err.status}: these photos could not be decoded, nothing in their batch was matched:\n" + "\n".join(
            f"  {sent[bad.index]}: {bad.error}" for bad in err.bad_images
        )
    if len(sent) == 1 and err.status in (400, 413) and err.reason:
        return f"{err.status}: {sent[0]}: {err.message}"
    return str(err)


@data_app.command("add")
def data_add(
    path: Annotated[Path, typer.Argument(help="a dataset folder inside the repo, e.g. data/shop")],
    push: Annotated[bool, typer.Option(help="push to the default DVC remote")] = False,
) -> None:
    """``dvc add`` a dataset folder, print its DVC hash and announce it to Prefect (``skumatch.data.added``)."""
    from components.dvc_data_ops import DataVersioningError, add_dataset

    try:
        dvc_hash = add_dataset(path, ".", push=push)
    except DataVersioningError as err:
        _fail(str(err))
    typer.echo(dvc_hash)
    _announce(path, dvc_hash)


@data_app.command("import")
def data_import(
    url: Annotated[str, typer.Argument(help="git repo URL or local path of a DVC data registry")],
    path: Annotated[str, typer.Argument(help="the dataset's path inside that repo")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where it goes here")] = Path("data/dataset"),
    rev: Annotated[Optional[str], typer.Option(help="git revision of the source")] = None,
) -> None:
    """``dvc import`` a dataset from a data registry, print its DVC hash and announce it to Prefect."""
    from components.dvc_data_ops import DataVersioningError, import_dataset

    try:
        dvc_hash = import_dataset(url, path, out, ".", rev=rev)
    except DataVersioningError as err:
        _fail(str(err))
    typer.echo(dvc_hash)
    _announce(out, dvc_hash)


def _announce(folder: Path, dvc_hash: str) -> None:
    from flows.events import DATA_ADDED, announce_data_version

    if announce_data_version(folder, dvc_hash):
        typer.echo(f"announced {DATA_ADDED} for {folder} to Prefect", err=True)
    else:
        typer.echo(f"no Prefect API configured (PREFECT_API_URL): {DATA_ADDED} not sent", err=True)


if __name__ == "__main__":
    sys.exit(app())
