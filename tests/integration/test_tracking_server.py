"""The registry on a real tracking server: Debian's PostgreSQL behind ``mlflow server`` with served artifacts.

A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``, as the ``postgres`` user when the tests
run as root: PostgreSQL refuses root) holds the backend store; ``mlflow server
--artifacts-destination`` serves the artifacts over HTTP. The flows talk to the server's HTTP
URI only, as the README's production setup does.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from components import registry
from flows import registry_flows
from flows.retrain import retrain
from serving.local import LocalServer, free_port, stop_server, wait_ready

pytestmark = pytest.mark.integration

MODEL = "skumatch-encoder"


def _postgres_bin() -> Path:
    """Debian's server binaries (``postgresql`` package; .ci/run installs it)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql: apt-get install postgresql")
    return Path(found[-1]).parent


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    """A PostgreSQL cluster of its own on 127.0.0.1, trusted locally; the URI of its ``mlflow`` database."""
    binaries, port = _postgres_bin(), free_port()
    # Not under pytest's tmp folder: the postgres user cannot enter root's private folders.
    folder = Path(tempfile.mkdtemp(prefix="skumatch-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(
        _as_postgres_user([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        **run,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    subprocess.run(
        _as_postgres_user(
            [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]
        ),
        **run,
    )
    try:
        subprocess.run(
            _as_postgres_user(
                [str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"]
            ),
            **run,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), **run)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres_uri, tmp_path_factory) -> Iterator[dict[str, object]]:
    """``mlflow server`` on the PostgreSQL store, serving artifacts from a folder; its URL and that folder."""
    artifacts = tmp_path_factory.mktemp("served-artifacts")
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "log"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        postgres_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalServer(f"http://127.0.0.1:{port}", process, log)
    try:
        if not wait_ready(server, timeout=120, path="/health"):
            pytest.fail(f"mlflow server did not come up:\n{server.output()[-3000:]}")
        yield {"url": server.url, "artifacts": artifacts}
    finally:
        stop_server(server)


def test_retrain_promote_and_rollback_through_a_tracking_server_on_postgresql(
    tracking_server, postgres_uri, prefect_api, quick_retrain_overrides, synthetic_dataset, tmp_path, monkeypatch
):
    import sqlalchemy
    from mlflow import MlflowClient

    from components.config import load_params

    monkeypatch.chdir(tmp_path)
    url = tracking_server["url"]
    overrides = quick_retrain_overrides + [f"registry.tracking_uri={url}", f"data.root={synthetic_dataset}"]
    trained = retrain(params_path="params.yaml", overrides=overrides)
    assert (trained["version"], trained["champion"]) == ("1", "1")
    client = MlflowClient(url, url)
    # A second version with an index, through the server: the same files registered again.
    first = registry.download_version(client, MODEL, "1", tmp_path / "v1")
    params = load_params("params.yaml", overrides)
    again = client.create_run(client.get_run(trained["run_id"]).info.experiment_id).info.run_id
    second = registry.register_version(
        client, params.registry, again, first.encoder_dir, trained["metrics"], trained["data_version"]
    ).version
    registry.attach_index(client, MODEL, second, first.index_dir, first.index_checksum)

    assert registry_flows.promote(str(second), "same weights, new build", by="ops on call", overrides=overrides) == {
        "from": "1",
        "to": "2",
    }
    assert registry_flows.rollback("v2 misbehaves in the shop", by="ops on call", overrides=overrides) == {
        "from": "2",
        "to": "1",
    }
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    moves = registry.champion_history(client, MODEL)
    assert [(move.action, move.from_version, move.to_version) for move in moves] == [
        ("promote", None, "1"),
        ("promote", "1", "2"),
        ("rollback", "2", "1"),
    ]
    assert (moves[2].by, moves[2].reason) == ("ops on call", "v2 misbehaves in the shop")

    # The store really is PostgreSQL: both versions and the alias are rows there ...
    engine = sqlalchemy.create_engine(postgres_uri)
    with engine.connect() as database:
        versions = database.execute(
            sqlalchemy.text("SELECT version FROM model_versions WHERE name = :name ORDER BY version"), {"name": MODEL}
        ).scalars()
        assert list(versions) == [1, 2]
        alias = database.execute(
            sqlalchemy.text("SELECT version FROM registered_model_aliases WHERE name = :name AND alias = 'champion'"),
            {"name": MODEL},
        ).scalar_one()
        assert alias == 1
    engine.dispose()
    # ... and the artifacts went through the server into its artifact folder.
    run = client.get_run(trained["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "plots" not in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}  # plots off
    stored = {path.name for path in Path(tracking_server["artifacts"]).rglob("*") if path.is_file()}
    assert {"challenger_vs_champion.md", "sku_top1.png", "index.faiss"} <= stored
    # The served champion downloads through the server, index and all.
    resolved = registry.download_version(client, MODEL, "champion", tmp_path / "download")
    assert resolved.version == "1" and (resolved.index_dir / "index.faiss").exists()
