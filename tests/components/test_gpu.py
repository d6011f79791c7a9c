"""CUDA checks: bf16 training, GPU embedding and GPU FAISS. Run with ``pytest -m gpu`` on a GPU host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.config import load_params
from components.data import load_manifest
from components.index import build_index, load_index, save_index
from components.model import autocast_for, build_encoder, load_encoder
from components.training import train_encoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_runs_on_cuda_with_bf16_and_loads_on_cpu(tmp_path, tiny_model_overrides, synthetic_dataset):
    params = load_params(
        None,
        tiny_model_overrides
        + [
            "train.device=cuda",
            "train.schedule.epochs=3",
            "train.schedule.frozen_epochs=1",
            "train.sampler.batch_size=12",
            "train.sampler.images_per_sku=2",
            "train.schedule.lr=0.02",
            f"train.io.checkpoint_dir={tmp_path / 'ckpt'}",
            f"train.io.output_dir={tmp_path / 'model'}",
        ],
    )
    result = train_encoder(params, load_manifest(synthetic_dataset), progress=False)
    assert result.device == "cuda"
    assert result.history[-1]["train.loss"] < result.history[0]["train.loss"]
    encoder, preprocess, _ = load_encoder(result.model_dir, device="cpu")  # saved weights load on a CPU host
    assert next(encoder.parameters()).device.type == "cpu"


def test_autocast_is_bf16_on_cuda(tiny_clip_dir):
    params = load_params(None, ["model.backbone=hf-clip", f"model.hf_model_id={tiny_clip_dir}", "model.image_size=16"])
    encoder, _ = build_encoder(params.model)
    encoder.to("cuda")
    with autocast_for(torch.device("cuda")):
        features = encoder.features(torch.randn(2, 3, 16, 16, device="cuda"))
    assert features.dtype == torch.bfloat16


def test_gpu_faiss_builds_an_index_a_cpu_host_loads(tmp_path):
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("FAISS build without GPU support (install faiss-gpu to run this check)")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    skus = [f"sku{i}" for i in range(500)]
    gpu_built = build_index(vectors, skus, skus, "Flat", use_gpu="auto")
    save_index(gpu_built, tmp_path / "index")
    reloaded = load_index(tmp_path / "index")
    assert type(reloaded.index).__name__.startswith("Index") and "Gpu" not in type(reloaded.index).__name__
    assert [hits[0][0] for hits in reloaded.search(vectors[:20], 1)] == skus[:20]
