"""A service must refuse to start on an index that does not verify, and packaging must refuse it too."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from serving_support import flip_byte, mlflow_globals_restored, private_home, start_server, stop_server, wait_ready

pytestmark = pytest.mark.integration


def _stored_model_dir(bentoml_home: Path, model_tag: str) -> Path:
    name, version = model_tag.split(":")
    return bentoml_home / "models" / name / version


def test_service_refuses_to_start_on_a_corrupted_index(packaged, tmp_path):
    champion = packaged.champion
    # A copy of the whole BentoML home, so the good store the other tests serve stays intact.
    env = private_home(champion.env, tmp_path)
    flip_byte(_stored_model_dir(Path(env["BENTOML_HOME"]), packaged.model_tag) / "index" / "index.faiss")

    server = start_server(packaged.bento_tag, env, tmp_path / "serve.log")
    try:
        # BentoML keeps the server process up and restarts the failed worker every ~10 s, so the
        # refusal shows as: the startup error in the log, and /readyz never answering 200.
        deadline = time.monotonic() + 90
        while "Application startup failed" not in server.output() and time.monotonic() < deadline:
            assert server.process.poll() is None or "IndexMismatchError" in server.output(), server.output()[-5000:]
            time.sleep(0.5)
        output = server.output()
        assert "Application startup failed" in output, output[-5000:]
        assert "IndexMismatchError" in output and "is corrupt: checksum" in output, output[-5000:]
        assert not wait_ready(server, timeout=3), "a service with a corrupted index became ready"
    finally:
        stop_server(server)


def test_packaging_refuses_a_version_whose_recorded_checksum_differs(registered_champion, tmp_path):
    """The registry says one checksum, the index files hash to another: nothing gets packaged."""
    from components import registry
    from components.config import load_params
    from components.index import IndexMismatchError
    from serving.build import package_champion

    champion = registered_champion
    # Work on a copy of the MLflow database (artifacts are shared read-only), so the recorded
    # checksum of the real store stays right for the other tests.
    database = shutil.copy(champion.root / "mlflow.db", tmp_path / "mlflow.db")
    tracking_uri = f"sqlite:///{database}"
    params = load_params(champion.params_file, [f"registry.tracking_uri={tracking_uri}"])
    with mlflow_globals_restored():
        client = registry.connect(params.registry)
        client.set_model_version_tag(params.registry.model_name, champion.version, "index_checksum", "0" * 64)
        with pytest.raises(IndexMismatchError, match="records 0{64}"):
            package_champion(params)
