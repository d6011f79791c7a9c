"""The ``embed_catalogue`` Prefect flow: a sharded embedding run, its shards spread over Dask workers.

The run is planned first (``components.embedding.ShardedEmbedding``: a folder with the image list);
the flow is handed that folder and submits one task per shard it still lacks, so a flow run
killed halfway is resumed by running it again. With ``embedding.dask_workers`` the tasks run on
a local Dask cluster of that many processes, with ``embedding.dask_address`` on an existing
cluster; each worker process builds the production embedder (``components.embedder``) once. Its
progress is a Prefect progress artifact (``catalogue-embedding``), and a tqdm bar on a terminal.
"""

from __future__ import annotations

import os
from functools import lru_cache

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm.auto import tqdm

from components import embedding
from components.config import EmbeddingParams

PROGRESS_KEY = "catalogue-embedding"  # the progress artifact of each embed_catalogue run


@lru_cache(maxsize=2)
def _worker_embedder(encoder_dir: str, torch_threads: int, settings_json: str):
    """The embedder in this worker process, built on its first shard (each worker gets its share of the cores)."""
    import torch

    from components.embedder import embedder_for
    from components.model import load_encoder

    torch.set_num_threads(torch_threads)
    encoder, preprocess, _ = load_encoder(encoder_dir)
    # The graph was made before the shards were submitted (embed_planned_run): here it is only read.
    embedder, _ = embedder_for(
        encoder, preprocess, EmbeddingParams.model_validate_json(settings_json), encoder_dir, None, torch_threads
    )
    return embedder


@task(name="embed-shard", cache_policy=NO_CACHE, retries=1)
def embed_shard(
    target: str, paths: list[str], encoder_dir: str, settings_json: str, as_queries: bool, torch_threads: int
) -> int:
    """Embed one shard into ``target``; returns the worker's process id."""
    embedding.embed_shard(target, paths, _worker_embedder(encoder_dir, torch_threads, settings_json), as_queries)
    return os.getpid()


@flow(name="embed_catalogue")
def embed_catalogue(folder: str, encoder_dir: str, settings: EmbeddingParams, torch_threads: int = 1) -> dict:
    """Embed the shards a planned run in ``folder`` still lacks, one task each, with the production embedder
    that ``settings`` (the ``embedding`` section) describe.

    Returns:
        ``shards``, ``resumed`` (already on disk), ``embedded`` and ``workers`` (distinct
        processes that embedded a shard).
    """
    run = embedding.ShardedEmbedding.open(folder)
    todo = run.remaining()
    # A worker of another host or folder resolves a relative path against its own working directory:
    # every path sent is made absolute here, in the flow's view (deploy.md: workers share that view).
    settings_json = settings.model_copy(update={"graph_dir": os.path.abspath(settings.graph_dir)}).model_dump_json()
    futures = [
        embed_shard.submit(
            os.path.abspath(run.shard_path(number)),
            [os.path.abspath(path) for path in run.shard_paths(number)],
            os.path.abspath(encoder_dir),
            settings_json,
            run.as_queries,
            torch_threads,
        )
        for number in todo
    ]
    resumed = run.count - len(todo)
    # The operator's progress bar: a Prefect progress artifact in the UI, and tqdm on a terminal.
    progress = create_progress_artifact(
        _percent(resumed, run.count), key=PROGRESS_KEY, description=f"shards of {run.folder} embedded"
    )
    workers = set()
    with tqdm(total=run.count, initial=resumed, desc="embedding shards", unit="shard", disable=None) as bar:
        for finished, future in enumerate(as_completed(futures), start=1):
            workers.add(future.result())
            bar.update()
            update_progress_artifact(progress, _percent(resumed + finished, run.count))
    get_run_logger().info(
        "%d shards: %d embedded by %d workers, %d resumed", run.count, len(todo), len(workers), resumed
    )
    return {"shards": run.count, "resumed": resumed, "embedded": len(todo), "workers": len(workers)}


def _percent(done: int, total: int) -> float:
    return 100.0 * done / total if total else 100.0


def task_runner(params: EmbeddingParams):
    """Prefect's Dask task runner for these settings (``None`` with ``dask_workers: 0``)."""
    from prefect_dask import DaskTaskRunner

    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    if params.dask_workers == 0:
        return None
    # Processes, not threads: the GIL and torch's intra-op pool would serialise threads.
    cluster = {"n_workers": params.dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)


def embed_planned_run(run: embedding.ShardedEmbedding, encoder_dir: str, params: EmbeddingParams):
    """Embed what ``run`` lacks: :func:`embed_catalogue` on Dask, or with ``dask_workers: 0`` one
    shard after another in this process (its torch threads untouched). Returns the summary.

    An ONNX runtime's graph is made here first, calibrated on the run's images, so that workers
    only read it.
    """
    from components.embedder import embedder_for
    from components.model import load_encoder

    encoder, preprocess, _ = load_encoder(encoder_dir)
    embedder, _ = embedder_for(encoder, preprocess, params, encoder_dir, calibration_paths=run.paths)
    runner = task_runner(params)
    if runner is not None:
        embed = embed_catalogue.with_options(task_runner=runner)
        environ = dict(os.environ)
        try:
            return embed(str(run.folder), str(encoder_dir), params, params.torch_threads_per_worker)
        finally:
            # Dask's LocalCluster sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) in this process for
            # its workers and leaves them: a bentoml serve started from here later ran on one thread.
            os.environ.clear()
            os.environ.update(environ)
    todo = len(run.remaining())
    embedding.embed_in_shards(embedder, run, progress=True)
    return {"shards": run.count, "resumed": run.count - todo, "embedded": todo, "workers": 1 if todo else 0}
