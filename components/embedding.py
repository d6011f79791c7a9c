"""Embedding a large image set in shards: each finished shard is a file, so a killed run resumes.

A :class:`ShardedEmbedding` is a folder: ``shards.json`` (which images, by which model, how many
a shard), ``paths.arrow`` (the images, in order, read memory-mapped) and one ``shard-NNNNNN.npy``
per finished shard, written to a side file
and renamed, so a shard on disk is always whole. Shards are independent: one process embeds them
in turn (:func:`embed_in_shards`), or Prefect's Dask task runner spreads them over workers
(``flows/embedding_flows.py``), as clip-retrieval spreads LAION over Spark or Slurm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

LOGGER = logging.getLogger(__name__)

PLAN_FILE = "shards.json"
PATHS_FILE = "paths.arrow"


def _paths_digest(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardedEmbedding:
    """Which images a sharded run embeds, and where its shards are."""

    folder: Path
    paths: list[str]
    shard_size: int
    model_key: str  # the encoder's identity (its folder, or a model version): shards of another are not reused
    as_queries: bool = False

    @classmethod
    def plan(
        cls, folder: str | Path, paths: list[str], shard_size: int, model_key: str, as_queries: bool = False
    ) -> ShardedEmbedding:
        """The run for these images in ``folder``, resuming the shards already there when they are of the
        same images, model and shard size; a folder holding another run's shards is cleared first."""
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        folder = Path(folder)
        plan = {
            "rows": len(paths),
            "paths_sha256": _paths_digest(paths),
            "shard_size": shard_size,
            "model_key": model_key,
            "as_queries": as_queries,
        }
        try:
            existing = json.loads((folder / PLAN_FILE).read_text())
        except (OSError, ValueError):
            existing = None
        if existing != plan:
            if existing is not None:
                LOGGER.warning("%s held shards of another embedding run; starting afresh", folder)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            table = pa.table({"image_path": pa.array([str(path) for path in paths], pa.large_string())})
            with pa.OSFile(str(folder / PATHS_FILE), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            (folder / PLAN_FILE).write_text(json.dumps(plan, indent=2))  # last: a plan on disk has its paths
        return cls(folder, list(paths), shard_size, model_key, as_queries)

    @classmethod
    def open(cls, folder: str | Path) -> ShardedEmbedding:
        """A planned run from its folder alone (what a flow is handed: a folder, not ten million paths).

        Raises:
            ValueError: the folder holds no plan, or paths that do not match it.
        """
        folder = Path(folder)
        try:
            plan = json.loads((folder / PLAN_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder} holds no embedding plan ({PLAN_FILE})") from err
        column = pa.ipc.open_file(pa.memory_map(str(folder / PATHS_FILE), "r")).read_all().column("image_path")
        paths = column.to_pylist()
        if len(paths) != plan["rows"] or _paths_digest(paths) != plan["paths_sha256"]:
            raise ValueError(f"{folder}: {PATHS_FILE} does not match {PLAN_FILE}")
        return cls(folder, paths, plan["shard_size"], plan["model_key"], plan["as_queries"])

    @property
    def count(self) -> int:
        """How many shards."""
        return -(-len(self.paths) // self.shard_size)

    def shard_path(self, number: int) -> Path:
        return self.folder / f"shard-{number:06d}.npy"

    def rows(self, number: int) -> slice:
        """The rows (positions in ``paths``) shard ``number`` holds."""
        return slice(number * self.shard_size, min(len(self.paths), (number + 1) * self.shard_size))

    def finished(self) -> list[int]:
        """Shards already on disk."""
        return [number for number in range(self.count) if self.shard_path(number).exists()]

    def remaining(self) -> list[int]:
        """Shards still to embed."""
        return [number for number in range(self.count) if not self.shard_path(number).exists()]

    def shard_paths(self, number: int) -> list[str]:
        """The images of shard ``number``: what a worker is handed with it."""
        return self.paths[self.rows(number)]

    def embed_shard(self, number: int, embedder) -> Path:
        """Embed one shard in this process with ``embedder`` (see :func:`embed_shard`)."""
        return embed_shard(self.shard_path(number), self.shard_paths(number), embedder, self.as_queries)

    def assemble(self, out: np.ndarray | None = None) -> np.ndarray:
        """Every shard's rows in order, in one array (or into ``out``, such as a memory map).

        Raises:
            RuntimeError: a shard is not finished.
        """
        if self.remaining():
            raise RuntimeError(f"{len(self.remaining())} of {self.count} shards in {self.folder} are not embedded")
        shards = [np.load(self.shard_path(number), mmap_mode="r") for number in range(self.count)]
        if out is None:
            return np.concatenate(shards) if shards else np.zeros((0, 0), dtype=np.float32)
        for number, shard in enumerate(shards):
            out[self.rows(number)] = shard
        return out


def embed_shard(target: str | Path, paths: list[str], embedder, as_queries: bool = False) -> Path:
    """Embed one shard's images into ``target`` with an :class:`components.embedder.ImageEmbedder`,
    written whole (a side file, then a rename); a shard already there is left as it is, so a task
    retried after its write changes nothing."""
    target = Path(target)
    if target.exists():
        return target
    vectors = embedder.embed_paths(paths, as_queries=as_queries)
    partial = target.with_name(f"{target.stem}.partial-{os.getpid()}.npy")
    np.save(partial, vectors.astype(np.float32))
    os.replace(partial, target)
    return target


def embed_in_shards(embedder, run: ShardedEmbedding, progress: bool = False) -> np.ndarray:
    """Embed the shards ``run`` still lacks, one after another in this process, then assemble them."""
    from tqdm.auto import tqdm

    todo = run.remaining()
    if len(todo) < run.count:
        LOGGER.info("%s: %d of %d shards already embedded, resuming", run.folder, run.count - len(todo), run.count)
    for number in tqdm(todo, desc="embedding shards", disable=None if progress else True):
        run.embed_shard(number, embedder)
    return run.assemble()
