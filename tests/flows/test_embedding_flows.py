"""The ``embed_catalogue`` flow on a Dask cluster it did not start: what ``embedding.dask_address`` names in
production. The scheduler and both workers are their own processes, started with the ``dask`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.config import load_params
from components.data import load_manifest
from components.embedding import ShardedEmbedding
from components.model import build_encoder, save_encoder
from flows.embedding_flows import PROGRESS_KEY, embed_planned_run
from serving.local import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; (address, worker process ids)."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask-cluster")
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = str(Path(sys.executable).with_name("dask"))
    # The workers import this package as any deployed worker would: from the environment, not the caller.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    commands = [[dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"]]
    commands += [
        [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"worker-{n}"] for n in range(WORKERS)
    ]
    processes = []
    for number, command in enumerate(commands):
        with (logs / f"{number}.log").open("wb") as log:
            processes.append(subprocess.Popen(command, cwd=logs, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(WORKERS, timeout=120)
            worker_pids = set(client.run(os.getpid).values())
        yield address, worker_pids
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def encoder_dir(tiny_model_overrides, tmp_path_factory) -> Path:
    params = load_params(None, tiny_model_overrides)
    model, preprocess = build_encoder(params.model)
    return save_encoder(model, preprocess, params.model, tmp_path_factory.mktemp("encoder") / "encoder")


def test_embed_catalogue_runs_its_shards_on_an_existing_dask_cluster(
    prefect_api, dask_cluster, encoder_dir, synthetic_dataset, tiny_model_overrides, tmp_path, monkeypatch
):
    from distributed import Client

    address, worker_pids = dask_cluster
    images = sorted(load_manifest(synthetic_dataset)["image_path"])[:16]
    # Folders relative to the flow's working directory, which is not the workers': they must find
    # the graph, the images and the shard folder all the same (deploy.md: the flow's view of them).
    monkeypatch.chdir(tmp_path)
    images = [os.path.relpath(path) for path in images]
    shared = ["embedding.graph_dir=graphs", "embedding.shard_size=4"]
    on_cluster = load_params(None, [*tiny_model_overrides, *shared, f"embedding.dask_address={address}"]).embedding
    run = ShardedEmbedding.plan("cluster", images, 4, "tiny")

    summary = embed_planned_run(run, os.path.relpath(encoder_dir), on_cluster)

    assert summary == {"shards": 4, "resumed": 0, "embedded": 4, "workers": WORKERS}
    # The run's progress bar in the Prefect UI: a progress artifact, moved to 100% shard by shard.
    bar = latest_progress()
    assert bar.data == 100.0 and "cluster" in bar.description
    with Client(address, timeout=30) as client:
        # Each worker process built the production embedder once, for its shards; none came from here.
        built = client.run(lambda: sys.modules["flows.embedding_flows"]._worker_embedder.cache_info().misses)
        assert set(client.run(os.getpid).values()) == worker_pids
    assert sorted(built.values()) == [1] * WORKERS
    # The same vectors as the same run embedded in this process, one shard after another.
    here = load_params(None, [*tiny_model_overrides, *shared, "embedding.dask_workers=0"]).embedding
    local = ShardedEmbedding.plan("here", images, 4, "tiny")
    assert embed_planned_run(run=local, encoder_dir=os.path.relpath(encoder_dir), params=here)["workers"] == 1
    np.testing.assert_allclose(run.assemble(), local.assemble(), atol=1e-5)

    # Run again on the cluster: every shard is on disk, so nothing is sent to the workers.
    again = ShardedEmbedding.plan("cluster", images, 4, "tiny")
    assert embed_planned_run(again, os.path.relpath(encoder_dir), on_cluster) == {
        "shards": 4,
        "resumed": 4,
        "embedded": 0,
        "workers": 0,
    }
    resumed_bar = latest_progress()
    assert resumed_bar.id != bar.id and resumed_bar.data == 100.0


def latest_progress():
    """The newest ``embed_catalogue`` progress artifact on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert artifact.type == "progress"
    return artifact


def test_a_dask_address_no_scheduler_answers_fails_the_run_naming_it(
    prefect_api, encoder_dir, synthetic_dataset, tiny_model_overrides, tmp_path
):
    import dask

    images = sorted(load_manifest(synthetic_dataset)["image_path"])[:4]
    address = f"tcp://127.0.0.1:{free_port()}"
    settings = [f"embedding.graph_dir={tmp_path / 'graphs'}", f"embedding.dask_address={address}"]
    params = load_params(None, [*tiny_model_overrides, *settings]).embedding
    run = ShardedEmbedding.plan(tmp_path / "run", images, 2, "tiny")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(OSError, match=address):
        embed_planned_run(run, str(encoder_dir), params)
    assert run.remaining() == [0, 1]  # nothing half-done is left to take for a finished shard
