"""Serving fixtures; the helpers behind them live in ``serving_support.py``.

Fixtures that build something expensive are session-scoped and shared by the serving modules:
tests that corrupt files copy them first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_support import (
    ADMIN_TOKEN,
    CALLER_KEYS,
    EMBED_DIM,
    IMAGE_SIZE,
    Packaged,
    RegisteredChampion,
    ServedFiles,
    copy_registry,
    package_in_subprocess,
    private_home,
    register_tiny_champion,
    running,
)


@pytest.fixture(scope="session")
def registered_champion(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, synthetic_dataset: Path
) -> RegisteredChampion:
    """A tiny CLIP model registered as ``@champion`` with its index, in a private store shared by the serving tests."""
    return register_tiny_champion(tmp_path_factory.mktemp("serving-store"), tiny_clip_dir, synthetic_dataset)


@pytest.fixture(scope="session")
def packaged(registered_champion: RegisteredChampion) -> Packaged:
    """The champion packaged into a BentoML model and built into a Bento (real ``serving.build``)."""
    return package_in_subprocess(registered_champion)


@pytest.fixture(scope="session")
def server(packaged: Packaged):
    """A real ``bentoml serve <bento>`` on a free port, ready, stopped at teardown.

    One for the whole session (a start costs 20-40 s here); tests that need other settings
    start their own.
    """
    with running(packaged.bento_tag, packaged.champion.env, packaged.champion.root / "serve.log") as started:
        yield started


@pytest.fixture(scope="session")
def registry_copy(packaged: Packaged, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tracking URI of a private copy of the champion's registry, which tests may change."""
    return copy_registry(packaged.champion, tmp_path_factory.mktemp("keyed-registry"))


@pytest.fixture(scope="session")
def keyed_server(packaged: Packaged, registry_copy: str, tmp_path_factory: pytest.TempPathFactory):
    """The packaged Bento served with caller API keys, an admin token and the registry copy (no polling).

    Shared by the access and hot-swap tests: one start instead of one each. Tests that move
    ``@champion`` in the copy leave the service serving it, so none assumes which version answers.
    """
    folder = tmp_path_factory.mktemp("keyed-server")
    env = {
        **private_home(packaged.champion.env, folder),
        "MLFLOW_TRACKING_URI": registry_copy,
        "SKUMATCH_API_KEYS": ",".join(CALLER_KEYS),
        "SKUMATCH_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with running(packaged.bento_tag, env, folder / "serve.log") as started:
        yield started


@pytest.fixture(scope="session")
def served_files(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, synthetic_dataset: Path) -> ServedFiles:
    """A tiny CLIP encoder saved with ``save_encoder`` and an index of the iconic images (version "7").

    Session-scoped and shared: tests that corrupt files must copy the folders first.
    """
    import pandas as pd

    from components.config import IndexParams, ModelParams
    from components.index import save_index
    from components.index.indexing import build_catalogue_index
    from components.model import build_encoder, save_encoder

    root = tmp_path_factory.mktemp("served-files")
    params = ModelParams(backbone="hf-clip", hf_model_id=str(tiny_clip_dir), embed_dim=EMBED_DIM, image_size=IMAGE_SIZE)
    encoder, preprocess = build_encoder(params)
    encoder_dir = save_encoder(encoder, preprocess, params, root / "encoder")
    iconic = {
        p.parent.name: p for p in sorted((synthetic_dataset / "iconic-images-and-descriptions").glob("*/*_Iconic.jpg"))
    }
    rows = pd.DataFrame({"image_path": [str(p) for p in iconic.values()], "sku_id": list(iconic)})
    index = build_catalogue_index(
        encoder, preprocess, rows, IndexParams(use_gpu="never"), meta={"model_name": "tiny", "model_version": "7"}
    )
    checksum = save_index(index, root / "index")
    return ServedFiles(encoder_dir, root / "index", "tiny", "7", checksum, iconic)
