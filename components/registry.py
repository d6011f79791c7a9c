"""The MLflow registry: tracking, model versions, aliases, and downloading a version's files.

MLflow 3 with aliases, never the deprecated stages. With no tracking URI configured the
embedded default is a SQLite store (``.skumatch/mlflow.db``) with a local artifact root
(``.skumatch/mlartifacts``); ``MLFLOW_TRACKING_URI`` or ``registry.tracking_uri`` point
anywhere else (an MLflow server, Postgres...).

A registered version carries: the encoder folder (safetensors + ``encoder.json`` with the
resolved params) as its source, tags with the data version and evaluation metrics, and,
once built, the FAISS index as an artifact of the same run with its checksum in a tag. Later
index versions of the same model version (products added or removed, a rebuild) are MLflow runs
of their own (``index v3.2``), holding the index folder, its lineage tags and its recall; the
model version's ``index_*`` tags point at the current one, which is what serving loads.
``@challenger`` marks the last version that passed the gate, ``@champion`` the served one.
Every move of ``@champion`` is recorded on the registered model, one tag each
(``champion_history.000001``...): who, when, why, from which version to which. Rollback replays
those moves to find the previous champion.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import RegistryParams

LOGGER = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# The run's resolved params tree, from which a version can be trained again.
PARAMS_ARTIFACT = "params.json"
ENCODER_ARTIFACT = "encoder"
INDEX_ARTIFACT = "index"
# Before moves were recorded one by one: a JSON list of earlier champions, still read for rollback.
LEGACY_HISTORY_TAG = "champion_history"
MOVE_TAG_PREFIX = "champion_history."
DEFAULT_HOME = Path(os.environ.get("SKUMATCH_HOME", ".skumatch"))


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (no champion, unknown version...)."""


def tracking_uri(params: RegistryParams) -> str:
    """The tracking URI in force: params, then ``MLFLOW_TRACKING_URI``, then the embedded SQLite."""
    if params.tracking_uri:
        return params.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(DEFAULT_HOME / 'mlflow.db').resolve()}"


def connect(params: RegistryParams):
    """Point MLflow at the configured store and make sure the experiment exists.

    Returns:
        An ``MlflowClient`` bound to that store.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(params.experiment) is None:
        # A SQLite store keeps artifacts beside its database (MLflow would use ./mlruns of
        # whatever folder the process runs in); a tracking server manages its own.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        client.create_experiment(params.experiment, artifact_location=location)
    mlflow.set_experiment(params.experiment)
    return client


class MlflowTracker:
    """The training tracker (``components.training.Tracker``) backed by an MLflow run."""

    def __init__(self, run_id: str) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # MLflow limits a param value to 6000 characters; longer ones are facts for artifacts.
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def register_version(
    client,
    params: RegistryParams,
    run_id: str,
    model_dir: str | Path,
    metrics: dict[str, dict[str, float]],
    data_version: str,
    lineage: dict[str, str] | None = None,
) -> Any:
    """Log the encoder folder to the run and register it as a new model version.

    Args:
        lineage: more tags on the version (the flow's: code commit, flow run, the champion it was
            compared with and that champion's metrics, the gate's verdict).

    Returns:
        The new ``ModelVersion``.
    """
    from mlflow.exceptions import MlflowException

    client.log_artifacts(run_id, str(model_dir), ENCODER_ARTIFACT)
    try:
        client.create_registered_model(params.model_name, description="skumatch product-matching encoder")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{ENCODER_ARTIFACT}"
    tags = {"data_version": data_version, "metrics": json.dumps(metrics, sort_keys=True)}
    tags.update(
        {
            f"metric.{protocol}.{name}": f"{value:.6f}"
            for protocol, values in metrics.items()
            for name, value in values.items()
        }
    )
    tags.update(lineage or {})
    version = client.create_model_version(params.model_name, source=source, run_id=run_id, tags=tags)
    LOGGER.info("registered %s version %s", params.model_name, version.version)
    return version


INDEX_RECORDED = ("recall_at_1", "recall_at_10", "ntotal")


def attach_index(client, model_name: str, version: str, index_dir: str | Path, checksum: str) -> None:
    """Store an index folder with the run of ``version`` and record its checksum on the version."""
    model_version = client.get_model_version(model_name, version)
    client.log_artifacts(model_version.run_id, str(index_dir), INDEX_ARTIFACT)
    meta = _index_meta(index_dir)
    _log_index_metrics(client, model_version.run_id, meta)
    _point_at_index(client, model_name, version, checksum, model_version.run_id, meta)


def record_index_version(
    client, experiment: str, model_name: str, version: str, index_dir: str | Path, checksum: str
) -> str:
    """Record a new index version of model ``version`` as an MLflow run, and make it the version's index.

    The run (``index v<model>.<index>``) holds the folder as its ``index`` artifact, the index's
    lineage as tags (model version, index version, parent, manifest SHA-256, change), its
    factory and search settings as params, and its recall and size as metrics. Serving picks it
    up through its hot swap, since the version's ``index_checksum`` changes.

    Returns:
        The run id.
    """
    meta = _index_meta(index_dir)
    if str(meta.get("model_version")) != str(version):
        raise RegistryError(
            f"index {index_dir} was built from model version {meta.get('model_version')}, not {version}"
        )
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {
        "skumatch.kind": "index",
        "skumatch.model_name": model_name,
        "skumatch.model_version": str(version),
        "skumatch.index_version": str(meta.get("index_version")),
        "skumatch.parent_index_version": str(meta.get("parent_index_version")),
        "skumatch.manifest_sha256": str(meta.get("manifest_sha256")),
        "skumatch.change": str(meta.get("change")),
        "index_checksum": checksum,
    }
    run = client.create_run(experiment_id, run_name=f"index v{version}.{meta.get('index_version')}", tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    settings = ("factory", "nprobe", "ef_search", "rerank_factor", "factory_reason")
    client.log_batch(run_id, params=[Param(key, str(meta.get(key))[:6000]) for key in settings])
    _log_index_metrics(client, run_id, meta)
    client.log_artifacts(run_id, str(index_dir), INDEX_ARTIFACT)
    client.set_terminated(run_id)
    _point_at_index(client, model_name, version, checksum, run_id, meta)
    LOGGER.info("index version %s of model version %s recorded in run %s", meta.get("index_version"), version, run_id)
    return run_id


def _index_meta(index_dir: str | Path) -> dict:
    from components.index import META_FILE

    return json.loads((Path(index_dir) / META_FILE).read_text())


def _log_index_metrics(client, run_id: str, meta: dict) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"index_{key}", float(meta[key]), now, 0) for key in INDEX_RECORDED if meta.get(key) is not None]
    client.log_batch(run_id, metrics=metrics)


def _point_at_index(client, model_name: str, version: str, checksum: str, run_id: str, meta: dict) -> None:
    client.set_model_version_tag(model_name, version, "index_checksum", checksum)
    client.set_model_version_tag(model_name, version, "index_artifact", INDEX_ARTIFACT)
    client.set_model_version_tag(model_name, version, "index_run_id", run_id)
    client.set_model_version_tag(model_name, version, "index_version", str(meta.get("index_version") or 1))


def resolve_version(client, model_name: str, ref: str) -> Any:
    """A ``ModelVersion`` from a version number (``"3"``) or an alias (``"champion"``, ``"@champion"``).

    Raises:
        RegistryError: no such model, version or alias.
    """
    from mlflow.exceptions import MlflowException

    ref = str(ref).lstrip("@")
    try:
        if ref.isdigit():
            return client.get_model_version(model_name, ref)
        return client.get_model_version_by_alias(model_name, ref)
    except MlflowException as err:
        raise RegistryError(f"model {model_name!r} has no version or alias {ref!r}") from err


def alias_target(client, model_name: str, alias: str = CHAMPION) -> tuple[str, str | None]:
    """``(version, index checksum)`` that ``alias`` points at now: what a service polls to notice a change.

    Raises:
        RegistryError: no such model or alias.
    """
    version = resolve_version(client, model_name, alias)
    return str(version.version), version.tags.get("index_checksum")


def set_alias(client, model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version``."""
    client.set_registered_model_alias(model_name, alias, str(version))


@dataclass(frozen=True)
class ChampionMove:
    """One move of ``@champion``: a promotion or a rollback, by whom, when (UTC, ISO 8601) and why."""

    action: str  # "promote" or "rollback"
    from_version: str | None
    to_version: str
    by: str
    at: str
    reason: str


def champion_history(client, model_name: str) -> list[ChampionMove]:
    """Every recorded move of ``@champion``, oldest first.

    Raises:
        RegistryError: no such registered model.
    """
    return _moves(_model_tags(client, model_name))


def _model_tags(client, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name).tags
    except MlflowException as err:
        raise RegistryError(f"no registered model {model_name!r}") from err


def _moves(tags: dict[str, str]) -> list[ChampionMove]:
    return [ChampionMove(**json.loads(value)) for key, value in sorted(tags.items()) if key.startswith(MOVE_TAG_PREFIX)]


def _record_move(client, model_name: str, action: str, from_version, to_version, by, reason: str) -> ChampionMove:
    move = ChampionMove(
        action=action,
        from_version=None if from_version is None else str(from_version),
        to_version=str(to_version),
        by=by or getpass.getuser(),
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        reason=reason,
    )
    # One tag per move: a registered model's tag value is bounded, its number of tags is not.
    number = len(champion_history(client, model_name)) + 1
    client.set_registered_model_tag(model_name, f"{MOVE_TAG_PREFIX}{number:06d}", json.dumps(asdict(move)))
    return move


def _earlier_champions(client, model_name: str) -> list[str]:
    """The champions a rollback can return to, most recent last: the moves replayed."""
    tags = _model_tags(client, model_name)
    earlier = json.loads(tags.get(LEGACY_HISTORY_TAG, "[]"))
    for move in _moves(tags):
        if move.action == "promote" and move.from_version is not None:
            earlier.append(move.from_version)
        elif move.action == "rollback" and earlier:
            earlier.pop()
    return earlier


def promote(client, model_name: str, version: str, by: str | None = None, reason: str = "") -> str | None:
    """Make ``version`` the ``@champion`` and record the move (``by`` defaults to the OS user).

    The version must carry an index with a checksum, since serving refuses one without.

    Returns:
        The previous champion's version, or None.

    Raises:
        RegistryError: unknown version, or a version with no index.
    """
    target = resolve_version(client, model_name, str(version))
    if "index_checksum" not in target.tags:
        raise RegistryError(f"version {target.version} has no index; build one before promoting it")
    try:
        previous = str(resolve_version(client, model_name, CHAMPION).version)
    except RegistryError:
        previous = None
    if previous == str(target.version):
        return previous
    set_alias(client, model_name, CHAMPION, target.version)
    _record_move(client, model_name, "promote", previous, target.version, by, reason)
    LOGGER.info("@champion: %s -> %s", previous, target.version)
    return previous


def rollback(client, model_name: str, by: str | None = None, reason: str = "") -> tuple[str, str]:
    """Point ``@champion`` back at the previous champion and record the move.

    Returns:
        ``(from_version, to_version)``.

    Raises:
        RegistryError: no champion, or no earlier champion to go back to.
    """
    current = str(resolve_version(client, model_name, CHAMPION).version)
    earlier = _earlier_champions(client, model_name)
    if not earlier:
        raise RegistryError(
            f"@champion of {model_name!r} is version {current} and has no earlier champion to roll back to"
        )
    previous = earlier[-1]
    set_alias(client, model_name, CHAMPION, previous)
    _record_move(client, model_name, "rollback", current, previous, by, reason)
    LOGGER.info("@champion rolled back: %s -> %s", current, previous)
    return current, previous


@dataclass(frozen=True)
class RecordedTraining:
    """What a registered version was trained from: the resolved params tree and the data's DVC hash."""

    version: str
    run_id: str
    params: dict[str, Any]
    data_version: str
    metrics: dict[str, dict[str, float]]


def recorded_training(client, model_name: str, ref: str) -> RecordedTraining:
    """The params (its run's ``params.json``), data version and metrics a version was registered with.

    Raises:
        RegistryError: unknown ref, or a version whose run holds no ``params.json``.
    """
    version = resolve_version(client, model_name, ref)
    names = {artifact.path for artifact in client.list_artifacts(version.run_id)} if version.run_id else set()
    if PARAMS_ARTIFACT not in names:
        raise RegistryError(
            f"version {version.version} of {model_name!r} has no recorded {PARAMS_ARTIFACT} (registered before "
            "runs recorded their params tree); it cannot be re-run"
        )
    folder = tempfile.mkdtemp(prefix="skumatch-params-")
    params = json.loads(Path(client.download_artifacts(version.run_id, PARAMS_ARTIFACT, folder)).read_text())
    return RecordedTraining(
        str(version.version),
        version.run_id,
        params,
        version.tags.get("data_version", ""),
        json.loads(version.tags.get("metrics", "{}")),
    )


@dataclass
class ResolvedModel:
    """A model version's files on local disk, with the facts needed to verify them."""

    model_name: str
    version: str
    encoder_dir: Path
    index_dir: Path | None
    index_checksum: str | None
    tags: dict[str, str]


def download_version(
    client, model_name: str, ref: str, dst: str | Path | None = None, with_index: bool = True
) -> ResolvedModel:
    """Download a version's encoder (and index) to ``dst``.

    Args:
        ref: a version number or an alias.
        with_index: fetch the index too; a version without one is an error then.

    Raises:
        RegistryError: unknown ref, or no index where one was asked for.
    """
    import mlflow

    version = resolve_version(client, model_name, ref)
    target = Path(dst or tempfile.mkdtemp(prefix="skumatch-"))
    target.mkdir(parents=True, exist_ok=True)
    # Through the client, not mlflow's global tracking URI: a caller such as the service's hot
    # swap may read another registry than the process-wide one.
    for folder in ("encoder_dl", "index_dl"):
        (target / folder).mkdir(exist_ok=True)
    if version.run_id:
        encoder_dir = Path(client.download_artifacts(version.run_id, ENCODER_ARTIFACT, str(target / "encoder_dl")))
    else:  # a version registered from a source outside any run
        encoder_dir = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target / "encoder_dl"))
        )
    index_dir, checksum = None, version.tags.get("index_checksum")
    if with_index:
        if checksum is None:
            raise RegistryError(f"version {version.version} of {model_name!r} has no index")
        # The current index version's run; versions indexed before index runs existed: the version's own.
        index_run = version.tags.get("index_run_id", version.run_id)
        index_dir = Path(
            client.download_artifacts(
                index_run, version.tags.get("index_artifact", INDEX_ARTIFACT), str(target / "index_dl")
            )
        )
    return ResolvedModel(model_name, str(version.version), encoder_dir, index_dir, checksum, dict(version.tags))
