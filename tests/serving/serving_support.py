"""Helpers of the serving tests: a tiny registered @champion in a throwaway MLflow store, packaged
into a throwaway BentoML home, and a real ``bentoml serve`` process over HTTP.

Nothing is mocked: MLflow runs on SQLite under ``tmp_path``, ``BENTOML_HOME`` points at a
temporary folder, packaging runs ``skumatch build`` in a subprocess (BentoML caches its
store locations per process, so a subprocess is the only way to be sure of using the temporary
home), and the server is a ``serving.local`` subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serving.local import running, start_server, stop_server, wait_ready  # noqa: F401  (re-exported to the tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBED_DIM = 16
IMAGE_SIZE = 16
MODEL_NAME = "skumatch-serving-test"
BENTO_MODEL_NAME = "skumatch-matcher-test"
# Catalogue images per SKU: the iconic image plus this many training photos, so the index holds
# several rows per SKU and the distinct-SKU ranking is exercised.
EXTRA_CATALOGUE_IMAGES = 2
# The keyed server's credentials (conftest ``keyed_server``): two caller keys and an admin token.
CALLER_KEYS = ("caller-key-one", "caller-key-two")
ADMIN_TOKEN = "admin-token-of-the-keyed-server"


@dataclass
class RegisteredChampion:
    """A registered, indexed and promoted tiny model, with the stores it lives in."""

    root: Path
    params_file: Path
    env: dict[str, str]
    version: str
    index_checksum: str
    encoder_dir: Path
    index_dir: Path
    catalogue: dict[str, list[Path]] = field(default_factory=dict)  # sku -> image files


@dataclass
class Packaged:
    """What ``skumatch build`` produced."""

    champion: RegisteredChampion
    model_tag: str
    bento_tag: str
    output: str


def subprocess_env(tracking_uri: str, bentoml_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BENTOML_HOME": str(bentoml_home),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "BENTOML_DO_NOT_TRACK": "True",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.pop("SKUMATCH_BENTO_MODEL", None)
    return env


@contextmanager
def mlflow_globals_restored():
    """Undo what ``registry.connect`` sets process-wide (tracking and registry URI, experiment).

    Other test modules in the same session must not inherit this module's private store.
    """
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = saved


def register_tiny_champion(root: Path, tiny_clip_dir: Path, dataset: Path) -> RegisteredChampion:
    """Register a tiny CLIP encoder in a fresh SQLite MLflow store, index a catalogue, promote it."""
    with mlflow_globals_restored():
        return _register_tiny_champion(root, tiny_clip_dir, dataset)


def _register_tiny_champion(root: Path, tiny_clip_dir: Path, dataset: Path) -> RegisteredChampion:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from components import registry
    from components.config import IndexParams, load_params
    from components.index import save_index
    from components.index.indexing import build_catalogue_index
    from components.model import build_encoder, save_encoder

    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    params_file = root / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "backbone": "hf-clip",
                    "hf_model_id": str(tiny_clip_dir),
                    "embed_dim": EMBED_DIM,
                    "image_size": IMAGE_SIZE,
                },
                "registry": {"tracking_uri": tracking_uri, "experiment": "serving-test", "model_name": MODEL_NAME},
                # A batch size below the test catalogue's SKU count, so /match_batch embeds in several batches.
                "serve": {"top_k": 3, "batch_size": 3, "bento_model_name": BENTO_MODEL_NAME},
            }
        )
    )
    params = load_params(params_file)
    # Create the experiment first with its artifacts under root: with an explicit tracking URI,
    # registry.connect leaves MLflow's default artifact location (./mlruns in the working dir).
    MlflowClient(tracking_uri, tracking_uri).create_experiment(
        params.registry.experiment, artifact_location=(root / "mlartifacts").resolve().as_uri()
    )
    client = registry.connect(params.registry)

    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, root / "encoder")

    catalogue: dict[str, list[Path]] = {}
    for sku_dir in sorted((dataset / "iconic-images-and-descriptions").iterdir()):
        sku = sku_dir.name
        catalogue[sku] = [
            sku_dir / f"{sku}_Iconic.jpg",
            *sorted((dataset / "train" / sku).glob("*.jpg"))[:EXTRA_CATALOGUE_IMAGES],
        ]
    rows = pd.DataFrame([{"image_path": str(p), "sku_id": sku} for sku, paths in catalogue.items() for p in paths])

    with mlflow.start_run() as run:
        version = registry.register_version(
            client,
            params.registry,
            run.info.run_id,
            encoder_dir,
            {"catalogue": {"top1": 1.0, "top3": 1.0}},
            "synthetic-v1",
        ).version
    index = build_catalogue_index(
        encoder,
        preprocess,
        rows,
        IndexParams(use_gpu="never"),
        meta={"model_name": MODEL_NAME, "model_version": str(version)},
    )
    index_dir = root / "index"
    checksum = save_index(index, index_dir)
    registry.attach_index(client, MODEL_NAME, str(version), index_dir, checksum)
    registry.promote(client, MODEL_NAME, str(version))
    env = subprocess_env(tracking_uri, root / "bentoml_home")
    return RegisteredChampion(root, params_file, env, str(version), checksum, encoder_dir, index_dir, catalogue)


def package_in_subprocess(champion: RegisteredChampion, ref: str = "champion") -> Packaged:
    """Run ``skumatch build`` against the champion's stores and parse its tags."""
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build", "--params", str(champion.params_file), "--ref", ref],
        cwd=REPO_ROOT,
        env=champion.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    tags = json.loads(result.stdout[result.stdout.index("{") :])
    return Packaged(champion, tags["bento_model"], tags["bento"], output)


def private_home(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` with a copy of its BentoML home in ``folder``, for a server started beside the shared one.

    BentoML empties its Prometheus folder, ``$BENTOML_HOME/prometheus_multiproc_dir``, whenever a
    server starts, so two servers on one home lose each other's metrics.
    """
    import shutil

    home = shutil.copytree(
        Path(env["BENTOML_HOME"]),
        folder / "bentoml_home",
        symlinks=True,
        ignore=shutil.ignore_patterns("prometheus_multiproc_dir"),
    )
    return {**env, "BENTOML_HOME": str(home)}


def copy_registry(champion: RegisteredChampion, folder: Path) -> str:
    """A copy of the champion's MLflow database in ``folder``; returns its tracking URI.

    Artifacts stay where they are (shared read-only by both databases); what the copy registers,
    promotes or tags leaves the original, which the other serving tests use, as it was.
    """
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{shutil.copy(champion.root / 'mlflow.db', folder / 'mlflow.db')}"


def register_new_version(
    champion: RegisteredChampion,
    tracking_uri: str,
    clip_dir: Path,
    folder: Path,
    skus: list[str] | None = None,
    promote: bool = True,
) -> tuple[str, str, Path]:
    """Register another tiny encoder (``clip_dir``) with an index of ``skus``' catalogue images.

    Returns:
        ``(version, index checksum, the index folder as logged)``.
    """
    with mlflow_globals_restored():
        return _register_new_version(champion, tracking_uri, clip_dir, folder, skus, promote)


def _register_new_version(champion, tracking_uri, clip_dir, folder, skus, promote):
    import mlflow
    import pandas as pd

    from components import registry
    from components.config import IndexParams, load_params
    from components.index import save_index
    from components.index.indexing import build_catalogue_index
    from components.model import build_encoder, save_encoder

    params = load_params(
        champion.params_file, [f"registry.tracking_uri={tracking_uri}", f"model.hf_model_id={clip_dir}"]
    )
    client = registry.connect(params.registry)
    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, folder / "encoder")
    chosen = skus or list(champion.catalogue)
    rows = pd.DataFrame(
        [{"image_path": str(path), "sku_id": sku} for sku in chosen for path in champion.catalogue[sku]]
    )
    with mlflow.start_run() as run:
        version = str(
            registry.register_version(
                client,
                params.registry,
                run.info.run_id,
                encoder_dir,
                {"catalogue": {"top1": 1.0, "top3": 1.0}},
                "synthetic-v2",
            ).version
        )
    index = build_catalogue_index(
        encoder,
        preprocess,
        rows,
        IndexParams(use_gpu="never"),
        meta={"model_name": MODEL_NAME, "model_version": version},
    )
    checksum = save_index(index, folder / "index")
    registry.attach_index(client, MODEL_NAME, version, folder / "index", checksum)
    if promote:
        registry.promote(client, MODEL_NAME, version)
    return version, checksum, folder / "index"


def logged_index_file(tracking_uri: str, version: str, name: str = "index.faiss") -> Path:
    """Where the registry stored a version's index file (to corrupt it in place)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    run = client.get_run(client.get_model_version(MODEL_NAME, version).run_id)
    return Path(run.info.artifact_uri.removeprefix("file://")) / "index" / name


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt a file in place by inverting one byte (the middle one by default)."""
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if offset is None else offset
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@dataclass
class ServedFiles:
    """An encoder folder and its index folder on disk, built without any registry."""

    encoder_dir: Path
    index_dir: Path
    model_name: str
    version: str
    checksum: str
    iconic: dict[str, Path]
