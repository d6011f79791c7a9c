"""The production embedder: the plain loop's embeddings, with decode overlapped and ONNX Runtime (fp32, int8)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.config import EmbeddingParams, load_params
from components.data import load_manifest
from components.embedder import build_embedder, embedder_for, prepare_runtime, runtime_model_path
from components.model import build_encoder, embed_batch, embed_images, save_encoder


@pytest.fixture(scope="module")
def images(synthetic_dataset) -> list[str]:
    return sorted(load_manifest(synthetic_dataset)["image_path"])[:24]


@pytest.fixture(scope="module")
def saved_encoder(tiny_model_overrides, tmp_path_factory):
    """The tiny encoder with flip averaging and three query zooms, saved (ONNX graphs go beside it)."""
    params = load_params(None, [*tiny_model_overrides, "model.flip_tta=true", "model.query_zooms=[1.0,0.875,0.78]"])
    encoder, preprocess = build_encoder(params.model)
    folder = save_encoder(encoder, preprocess, params.model, tmp_path_factory.mktemp("encoder") / "model")
    return encoder, preprocess, folder


@pytest.mark.parametrize("as_queries", [False, True])
@pytest.mark.parametrize("decode_threads", [0, 2])
def test_torch_embedder_gives_the_plain_loops_embeddings_in_order(
    saved_encoder, images, as_queries, decode_threads, tmp_path
):
    encoder, preprocess, _ = saved_encoder
    plain = embed_images(encoder, preprocess, images, 5, as_queries=as_queries)
    embedder = build_embedder(encoder, preprocess, "torch", batch_size=5, decode_threads=decode_threads)
    produced = embedder.embed_paths(images, as_queries=as_queries)
    np.testing.assert_allclose(produced, plain, atol=1e-5)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float32, (len(images), encoder.embed_dim))
    assert embedder.embed_paths(images, as_queries=as_queries, out=out) is out
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_embed_images_pools_views_as_embed_batch(saved_encoder, images):
    encoder, preprocess, _ = saved_encoder
    photos = [Image.open(path).convert("RGB") for path in images[:4]]
    embedder = build_embedder(encoder, preprocess, "torch")
    for as_queries in (False, True):
        expected = embed_batch(encoder, preprocess, photos, as_queries=as_queries).numpy()
        np.testing.assert_allclose(embedder.embed_images(photos, as_queries), expected, atol=1e-5)
    assert embedder.embed_images([]).shape == (0, encoder.embed_dim)


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
@pytest.mark.parametrize("photos_per_call", [1, 3, 100])
def test_query_rows_embedded_alone_pool_to_the_query_embedding(tiny_model_overrides, images, flip, photos_per_call):
    """What the service's lanes do: rows cut anywhere, embedded apart, pooled to embed_batch's queries."""
    params = load_params(None, tiny_model_overrides).model
    encoder, preprocess = build_encoder(params.model_copy(update={"query_zooms": [1.0, 0.7], "flip_tta": flip}))
    photos = [Image.open(path).convert("RGB") for path in images[:5]]
    embedder = build_embedder(encoder, preprocess, batch_size=photos_per_call)
    rows = np.concatenate([embedder.pixel_rows(photo, as_queries=True) for photo in photos])
    assert rows.dtype == np.uint8 and len(rows) == len(photos) * 2 * (2 if flip else 1)
    embedded = np.concatenate([embedder.embed_rows(rows[:3]), embedder.embed_rows(rows[3:])])
    expected = embed_batch(encoder, preprocess, photos, as_queries=True).numpy()
    np.testing.assert_allclose(embedder.pool(embedded, as_queries=True), expected, atol=1e-6)
    # Each row alone: the first photo's rows give its embedding whatever else was embedded with them.
    own = embedder.embed_rows(embedder.pixel_rows(photos[0], as_queries=True))
    np.testing.assert_allclose(embedded[: len(own)], own, atol=1e-6)


def test_onnx_runtimes_export_beside_the_weights_and_agree_with_torch(saved_encoder, images):
    encoder, preprocess, folder = saved_encoder
    plain = embed_images(encoder, preprocess, images, 8, as_queries=True)
    graphs = folder.parent / "graphs"
    settings = EmbeddingParams(runtime="onnx", batch_size=8, graph_dir=str(graphs))
    fp32, graph = embedder_for(encoder, preprocess, settings, folder, threads=1)
    assert graph == runtime_model_path(graphs, folder, "onnx") and graph.exists()
    np.testing.assert_allclose(fp32.embed_paths(images, as_queries=True), plain, atol=1e-4)

    with pytest.raises(ValueError, match="no int8 graph and no calibration images"):
        prepare_runtime(encoder, preprocess, folder, "onnx-int8", graph_dir=graphs)
    int8_params = EmbeddingParams(runtime="onnx-int8", calibration_images=8, graph_dir=str(graphs))
    int8, graph = embedder_for(encoder, preprocess, int8_params, folder, calibration_paths=images, threads=1)
    assert graph == runtime_model_path(graphs, folder, "onnx-int8") and graph.exists()
    cosine = np.sum(int8.embed_paths(images, as_queries=True) * plain, axis=1)
    assert cosine.min() > 0.95, cosine  # int8: close, not equal; accuracy is measured on val by the benchmark
    # Made once: a second embedder reads the graph without calibration images.
    again = build_embedder(encoder, preprocess, "onnx-int8", graph, threads=1)
    np.testing.assert_allclose(again.embed_paths(images[:3]), int8.embed_paths(images[:3]), atol=1e-6)


def test_unknown_runtime_and_onnx_without_its_graph_are_refused(saved_encoder, tmp_path):
    encoder, preprocess, _ = saved_encoder
    with pytest.raises(ValueError, match="unknown embedding runtime 'tensorrt'"):
        build_embedder(encoder, preprocess, "tensorrt")
    with pytest.raises(ValueError, match="unknown embedding runtime 'tensorrt'"):
        prepare_runtime(encoder, preprocess, tmp_path, "tensorrt")
    with pytest.raises(ValueError, match="needs its ONNX graph"):
        build_embedder(encoder, preprocess, "onnx", tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="needs the encoder's folder"):
        embedder_for(encoder, preprocess, EmbeddingParams(runtime="onnx"))


def test_a_truncated_file_fails_the_run_with_the_decoders_error(saved_encoder, images, tmp_path):
    encoder, preprocess, _ = saved_encoder
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(images[0], "rb").read()[:300])
    embedder = build_embedder(encoder, preprocess, "torch", batch_size=2)
    with pytest.raises(OSError):
        embedder.embed_paths([images[1], str(truncated), images[2]])
