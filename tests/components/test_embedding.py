"""Sharded embedding: whole shards on disk, a killed run resumed from them, the same vectors as one pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.config import load_params
from components.data import load_manifest
from components.embedder import build_embedder
from components.embedding import PLAN_FILE, ShardedEmbedding, embed_in_shards
from components.model import build_encoder, save_encoder

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(synthetic_dataset) -> list[str]:
    return sorted(load_manifest(synthetic_dataset)["image_path"])[:30]


@pytest.fixture(scope="module")
def encoder(tiny_model_overrides):
    params = load_params(None, tiny_model_overrides)
    return (*build_encoder(params.model), params)


@pytest.fixture(scope="module")
def embedder(encoder):
    model, preprocess, _ = encoder
    return build_embedder(model, preprocess, batch_size=4)


@pytest.fixture(scope="module")
def one_pass(embedder, images) -> np.ndarray:
    """The images embedded in one pass: what every sharded run must assemble to."""
    return embedder.embed_paths(images)


def test_shards_assemble_to_the_vectors_of_one_pass_and_a_resumed_plan_keeps_finished_shards(
    embedder, images, one_pass, tmp_path
):
    run = ShardedEmbedding.plan(tmp_path / "run", images, 7, "tiny v1")
    assert run.count == 5 and run.rows(4) == slice(28, 30)
    run.embed_shard(0, embedder)
    run.embed_shard(3, embedder)
    first_written = run.shard_path(0).stat().st_mtime_ns
    with pytest.raises(RuntimeError, match="3 of 5 shards"):
        run.assemble()

    again = ShardedEmbedding.plan(tmp_path / "run", images, 7, "tiny v1")
    assert again.finished() == [0, 3] and again.remaining() == [1, 2, 4]
    vectors = embed_in_shards(embedder, again)
    assert run.shard_path(0).stat().st_mtime_ns == first_written  # not embedded twice
    np.testing.assert_allclose(vectors, one_pass, atol=1e-5)
    assert ShardedEmbedding.open(tmp_path / "run").paths == images


def test_opening_a_folder_without_a_plan_or_with_edited_paths_is_refused(embedder, images, tmp_path):
    with pytest.raises(ValueError, match="holds no embedding plan"):
        ShardedEmbedding.open(tmp_path / "nothing")
    ShardedEmbedding.plan(tmp_path / "run", images, 7, "tiny v1")
    plan = json.loads((tmp_path / "run" / PLAN_FILE).read_text())
    (tmp_path / "run" / PLAN_FILE).write_text(json.dumps({**plan, "rows": plan["rows"] + 1}))
    with pytest.raises(ValueError, match="does not match"):
        ShardedEmbedding.open(tmp_path / "run")


@pytest.mark.parametrize(
    "change", [{"paths": "fewer"}, {"shard_size": 5}, {"model_key": "tiny v2"}, {"as_queries": True}]
)
def test_shards_of_another_run_are_never_reused(embedder, images, tmp_path, change):
    run = ShardedEmbedding.plan(tmp_path / "run", images, 7, "tiny v1")
    run.embed_shard(0, embedder)
    settings = {"paths": images, "shard_size": 7, "model_key": "tiny v1", "as_queries": False, **change}
    if settings["paths"] == "fewer":
        settings["paths"] = images[1:]
    other = ShardedEmbedding.plan(tmp_path / "run", **settings)
    assert other.finished() == []


def test_a_half_written_shard_is_not_taken_for_a_finished_one(embedder, images, one_pass, tmp_path):
    run = ShardedEmbedding.plan(tmp_path / "run", images, 10, "tiny v1")
    # What a writer killed mid-shard leaves: its side file, never the shard's own name.
    run.shard_path(1).with_name("shard-000001.partial-99999.npy").write_bytes(b"\x93NUMPY half")
    assert run.remaining() == [0, 1, 2]
    np.testing.assert_allclose(embed_in_shards(embedder, run), one_pass, atol=1e-5)


KILLED_RUN = """
import os, signal, sys
from components.embedder import build_embedder
from components.embedding import ShardedEmbedding
from components.model import load_encoder

encoder, preprocess, _ = load_encoder(sys.argv[1])
embedder = build_embedder(encoder, preprocess, batch_size=4)
run = ShardedEmbedding.plan(sys.argv[2], sys.argv[4:], 4, "tiny v1")
for done, number in enumerate(run.remaining(), 1):
    run.embed_shard(number, embedder)
    if done == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # dies as a killed worker does: no clean-up, no exit code
"""


def test_a_killed_embedding_run_resumes_from_its_finished_shards(encoder, embedder, images, one_pass, tmp_path):
    model, preprocess, params = encoder
    encoder_dir = save_encoder(model, preprocess, params.model, tmp_path / "encoder")
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    command = [sys.executable, str(script), str(encoder_dir), str(tmp_path / "run"), "3", *images]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]

    run = ShardedEmbedding.plan(tmp_path / "run", images, 4, "tiny v1")
    assert run.finished() == [0, 1, 2] and len(run.remaining()) == 5
    written = {number: run.shard_path(number).stat().st_mtime_ns for number in run.finished()}
    vectors = embed_in_shards(embedder, run)
    assert {number: run.shard_path(number).stat().st_mtime_ns for number in written} == written
    np.testing.assert_allclose(vectors, one_pass, atol=1e-5)
