"""Shared fixtures: a tiny CLIP vision tower built in code and a learnable synthetic dataset.

As in open_clip's tests, models are tiny and random (hidden size 32, one layer, 16 px images)
and data is drawn in code, so the whole suite runs on a CPU without any download. The
synthetic dataset is in the Grocery Store layout (``classes.csv``, ``train.txt``/``val.txt``,
one iconic catalogue image per SKU) and is *learnable*: every SKU is its own colour and shape,
drawn on a noisy background with position and scale jitter, so a short fine-tune measurably
improves retrieval. Flow, serving and integration tests reuse it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Tiny CLIP
# ---------------------------------------------------------------------------------------------

TINY_CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
    projection_dim=16,
)
TINY_EMBED_DIM = 16
TINY_IMAGE_SIZE = 16


def save_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPVisionModelWithProjection`` with ``save_pretrained``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local folder holding a tiny random CLIP vision model (what ``model.hf_model_id`` may name)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="session")
def other_tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny random CLIP (another seed): a model version whose embeddings differ."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip-2") / "clip", seed=1)


@pytest.fixture(scope="session")
def tiny_model_overrides(tiny_clip_dir: Path) -> list[str]:
    """``load_params(None, overrides)`` strings that select the tiny CLIP encoder (shared: extend a copy)."""
    return [
        "model.backbone=hf-clip",
        f"model.hf_model_id={tiny_clip_dir}",
        f"model.embed_dim={TINY_EMBED_DIM}",
        f"model.image_size={TINY_IMAGE_SIZE}",
    ]


@pytest.fixture
def quick_retrain_overrides(tiny_model_overrides: list[str]) -> list[str]:
    """A retrain that only has to run end to end: the tiny model, one epoch on cached features,
    the gate's thresholds at zero, no run plots."""
    return tiny_model_overrides + [
        "train.schedule.epochs=1",
        "train.schedule.frozen_epochs=1",
        "train.sampler.batch_size=12",
        "train.sampler.images_per_sku=2",
        "evaluate.min_top1=0",
        "evaluate.min_top3=0",
        "evaluate.plots=false",
    ]


# ---------------------------------------------------------------------------------------------
# Synthetic Grocery Store dataset
# ---------------------------------------------------------------------------------------------

GROCERY_HEADER = (
    "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
    "Iconic Image Path (str),Product Description Path (str)"
)


@dataclass(frozen=True)
class SkuSpec:
    """How one synthetic SKU looks: a shape in a colour."""

    name: str
    coarse: str
    shape: str
    colour: tuple[int, int, int]


SYNTHETIC_SKUS: tuple[SkuSpec, ...] = (
    SkuSpec("Red-Circle", "Round", "circle", (220, 30, 30)),
    SkuSpec("Green-Square", "Boxy", "square", (30, 190, 40)),
    SkuSpec("Blue-Triangle", "Pointy", "triangle", (30, 60, 220)),
    SkuSpec("Yellow-Stripes", "Boxy", "hstripes", (235, 215, 20)),
    SkuSpec("Magenta-Cross", "Pointy", "cross", (210, 30, 200)),
    SkuSpec("Cyan-Ring", "Round", "ring", (20, 200, 210)),
)


def draw_sku_image(spec: SkuSpec, rng: np.random.Generator | None = None, size: int = 32) -> Image.Image:
    """Draw one image of a SKU.

    The nuisance is chosen so that a random encoder is confused but a short fine-tune is not:
    shelf photos sit on a noisy *grey* background of random brightness (the catalogue image on
    an off-white one), while SKU identity lives in the object's saturated colour. Brightness
    dominates a random tiny CLIP's features; learning to ignore it is a near-linear job, so the
    projection head alone measurably improves catalogue top-1 within a few optimiser steps.

    Args:
        spec: the SKU's shape and colour.
        rng: ``None`` draws the clean, centred catalogue (iconic) image on off-white; a generator
            draws a "shelf photo": noisy grey background, jittered position, scale and colour.
        size: side of the square image in pixels.
    """
    clean = rng is None
    if clean:
        canvas = np.full((size, size, 3), 240, dtype=np.uint8)
        scale, cx, cy, colour = 0.7, size / 2, size / 2, np.array(spec.colour, dtype=float)
    else:
        base = rng.integers(20, 236)
        noise = rng.normal(0, 20, size=(size, size, 3))
        canvas = np.clip(base + noise, 0, 255).astype(np.uint8)
        scale = rng.uniform(0.6, 0.9)
        cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
        colour = np.clip(np.array(spec.colour, dtype=float) + rng.normal(0, 12, size=3), 0, 255)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in colour)
    half = scale * size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(half / 2.5)))
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    elif spec.shape == "hstripes":
        band = max(1, int(math.ceil(2 * half / 5)))
        for i, top in enumerate(range(int(cy - half), int(cy + half), band)):
            if i % 2 == 0:
                draw.rectangle((cx - half, top, cx + half, top + band - 1), fill=fill)
    elif spec.shape == "cross":
        arm = half / 3
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return image


def make_grocery_dataset(
    root: Path,
    skus: tuple[SkuSpec, ...] = SYNTHETIC_SKUS,
    train_per_sku: int = 8,
    val_per_sku: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the Grocery Store layout under ``root`` and return it.

    Layout: ``classes.csv`` (real header; iconic path ``/iconic-images-and-descriptions/<sku>/<sku>_Iconic.jpg``),
    ``train.txt`` / ``val.txt`` with lines ``<split>/<sku>/<sku>_NNN.jpg, <id>, <coarse id>``
    and the JPEGs themselves.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse_ids: dict[str, int] = {}
    class_lines = [GROCERY_HEADER]
    split_lines: dict[str, list[str]] = {"train": [], "val": []}
    for class_id, spec in enumerate(skus):
        coarse_id = coarse_ids.setdefault(spec.coarse, len(coarse_ids))
        iconic_rel = f"iconic-images-and-descriptions/{spec.name}/{spec.name}_Iconic.jpg"
        description_rel = f"iconic-images-and-descriptions/{spec.name}/{spec.name}_Description.txt"
        (root / iconic_rel).parent.mkdir(parents=True, exist_ok=True)
        draw_sku_image(spec, None, size).save(root / iconic_rel, quality=95)
        (root / description_rel).write_text(f"A synthetic {spec.colour} {spec.shape}.\n")
        class_lines.append(f"{spec.name},{class_id},{spec.coarse},{coarse_id},/{iconic_rel},/{description_rel}")
        for split, count in (("train", train_per_sku), ("val", val_per_sku)):
            for number in range(1, count + 1):
                rel = f"{split}/{spec.name}/{spec.name}_{number:03d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                draw_sku_image(spec, rng, size).save(root / rel, quality=95)
                split_lines[split].append(f"{rel}, {class_id}, {coarse_id}")
    (root / "classes.csv").write_text("\n".join(class_lines) + "\n")
    for split, lines in split_lines.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a learnable synthetic Grocery Store dataset: 6 SKUs, 1 iconic + 8 train + 4 val each.

    Session-scoped and shared: tests that modify files must copy it first.
    """
    return make_grocery_dataset(tmp_path_factory.mktemp("grocery") / "synthetic-grocery")


@pytest.fixture(scope="session")
def synthetic_skus() -> tuple[SkuSpec, ...]:
    """The SKUs of ``synthetic_dataset`` (name, coarse class, shape, colour), in class-id order."""
    return SYNTHETIC_SKUS


@pytest.fixture(scope="session")
def make_synthetic_dataset():
    """The factory behind ``synthetic_dataset``, for tests that need another size or seed.

    Call it as ``make_synthetic_dataset(root, train_per_sku=..., val_per_sku=..., seed=...)``.
    """
    return make_grocery_dataset


@pytest.fixture(scope="session")
def draw_sku():
    """``draw_sku_image(spec, rng=None, size=32)``: one synthetic image of a SKU (``rng=None`` = catalogue)."""
    return draw_sku_image


def _start_prefect_server():
    """Start ``prefect server start`` on a free port with its own home; (server, environment) at once."""
    import subprocess
    import sys
    import tempfile

    from serving.local import LocalServer, free_port

    home = Path(tempfile.mkdtemp(prefix="skumatch-prefect-home-"))
    port = str(free_port())
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = home / "server.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LocalServer(url, process, log), env


_PREFECT_SERVER = pytest.StashKey[tuple]()


def pytest_collection_modifyitems(session, config, items):
    """Start the session's Prefect server as soon as a collected test needs it.

    Starting one takes about 20 s on 2 cores, mostly its own imports and migrations; begun here, it
    overlaps the tests that run before the first flow test instead of stalling that test.
    """
    if any("prefect_api" in getattr(item, "fixturenames", ()) for item in items):
        config.stash[_PREFECT_SERVER] = _start_prefect_server()


def pytest_sessionfinish(session, exitstatus):
    """Stop a Prefect server started at collection that no test came to use (a run stopped early)."""
    from serving.local import stop_server

    started = session.config.stash.get(_PREFECT_SERVER, None)
    if started and started[0].process.poll() is None:
        stop_server(started[0])


@pytest.fixture(scope="session")
def prefect_api(request) -> dict[str, str]:
    """A real ``prefect server start`` on a free port of 127.0.0.1 for the whole session, with its
    own home and SQLite database (started at collection, see ``pytest_collection_modifyitems``).

    Flows run in this process reach it through Prefect's settings; the environment returned lets a
    ``prefect`` CLI call or a worker reach it too. One server for every flow test.
    """
    import shutil

    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from serving.local import stop_server, wait_ready

    server, env = request.config.stash.get(_PREFECT_SERVER, None) or _start_prefect_server()
    try:
        if not wait_ready(server, timeout=180, path="/health"):
            raise RuntimeError(f"prefect server start did not answer /api/health:\n{server.output()[-3000:]}")
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            yield env
            # Flow-run logs still queued go to the server before it stops, not to an error line.
            APILogWorker.drain_all(timeout=5)
    finally:
        stop_server(server)
        shutil.rmtree(env["PREFECT_HOME"], ignore_errors=True)
