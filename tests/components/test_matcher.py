"""The served model's matching: query embedding, batching and the open-set threshold, on real FAISS."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import ModelParams
from components.index import load_index, save_index
from components.index.indexing import build_catalogue_index
from components.matcher import ServedModel
from components.model import build_encoder, embed_batch, load_encoder, save_encoder


@pytest.fixture
def tiny_encoder(tiny_clip_dir):
    params = ModelParams(backbone="hf-clip", hf_model_id=str(tiny_clip_dir), embed_dim=16, image_size=16)
    return build_encoder(params)


def _catalogue_rows(synthetic_dataset) -> pd.DataFrame:
    rows = pd.DataFrame(
        {"image_path": [str(p) for p in sorted(synthetic_dataset.glob("iconic-images-and-descriptions/*/*.jpg"))]}
    )
    rows["sku_id"] = [p.split("/")[-2] for p in rows["image_path"]]
    return rows


def test_served_model_embeds_photos_as_queries_at_the_saved_query_zooms(tiny_clip_dir, synthetic_dataset, tmp_path):
    params = ModelParams(
        backbone="hf-clip", hf_model_id=str(tiny_clip_dir), embed_dim=16, image_size=16, query_zooms=[1.0, 0.5]
    )
    encoder, preprocess = build_encoder(params)
    encoder, preprocess, _ = load_encoder(save_encoder(encoder, preprocess, params, tmp_path / "encoder"))
    rows = _catalogue_rows(synthetic_dataset)
    checksum = save_index(
        build_catalogue_index(encoder, preprocess, rows, meta={"model_version": "1"}), tmp_path / "index"
    )
    served = ServedModel(encoder, preprocess, load_index(tmp_path / "index", checksum, "1"), "m", "1")
    photo = Image.open(rows["image_path"].iat[0])
    query = embed_batch(encoder, preprocess, [photo], as_queries=True).numpy()
    np.testing.assert_allclose(served.embed([photo]), query, atol=1e-6)
    # The index holds the catalogue image at zoom 1; the same image as a query is seen zoomed too.
    indexed = embed_batch(encoder, preprocess, [photo]).numpy()
    best = served.match([photo], top_k=1)[0][0]
    assert best["score"] == pytest.approx(float(query[0] @ indexed[0]), abs=1e-5) and best["score"] < 0.9999


def test_an_index_is_refused_vectors_that_do_not_match_its_rows(tiny_encoder, synthetic_dataset):
    encoder, preprocess = tiny_encoder
    rows = _catalogue_rows(synthetic_dataset)
    short = np.zeros((len(rows) - 1, 16), dtype="float32")
    with pytest.raises(ValueError, match=f"{len(rows) - 1} embeddings for {len(rows)} catalogue rows"):
        build_catalogue_index(encoder, preprocess, rows, vectors=short)
    with pytest.raises(ValueError, match="catalogue is empty"):
        build_catalogue_index(encoder, preprocess, rows.iloc[:0])


def test_served_model_embeds_batch_size_photos_worth_of_view_rows_per_pass(tiny_encoder, synthetic_dataset, tmp_path):
    encoder, preprocess = tiny_encoder
    rows = _catalogue_rows(synthetic_dataset)
    checksum = save_index(
        build_catalogue_index(encoder, preprocess, rows, meta={"model_version": "1"}), tmp_path / "index"
    )
    catalogue = load_index(tmp_path / "index", checksum, "1")
    photos = [Image.open(path) for path in rows["image_path"]][:5]
    passes: list[int] = []
    hook = encoder.backbone.register_forward_pre_hook(lambda _, inputs: passes.append(len(inputs[0])))
    try:
        whole = ServedModel(encoder, preprocess, catalogue, "m", "1", batch_size=len(photos)).embed(photos)
        passes_whole, passes[:] = list(passes), []
        in_twos = ServedModel(encoder, preprocess, catalogue, "m", "1", batch_size=2).embed(photos)
    finally:
        hook.remove()
    views = len(encoder.query_zooms) * (2 if encoder.flip_average else 1)
    flips = 2 if encoder.flip_average else 1
    total = len(photos) * views

    def passes_of(size: int) -> list[int]:
        return [min(size, total - start) for start in range(0, total, size)]

    assert passes_whole == passes_of(len(photos) * flips) and passes == passes_of(2 * flips)
    np.testing.assert_allclose(in_twos, whole, atol=1e-6)  # the same rows, whatever the pass
    np.testing.assert_allclose(whole, embed_batch(encoder, preprocess, photos, as_queries=True).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ServedModel(encoder, preprocess, catalogue, "m", "1", batch_size=0)


def test_matches_below_the_calibrated_threshold_are_not_confident(tiny_encoder, synthetic_dataset, tmp_path):
    encoder, preprocess = tiny_encoder
    rows = _catalogue_rows(synthetic_dataset)
    catalogue = build_catalogue_index(encoder, preprocess, rows, meta={"model_version": "1", "reject_below": 0.999})
    checksum = save_index(catalogue, tmp_path / "index")
    served = ServedModel(encoder, preprocess, load_index(tmp_path / "index", checksum, "1"), "m", "1")
    exact = served.match([Image.open(rows["image_path"].iat[0])], top_k=2)[0]
    assert exact[0]["confident"] and exact[0]["score"] >= 0.999
    assert not exact[1]["confident"]  # the runner-up SKU is another product
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert not served.match([noise], top_k=1)[0][0]["confident"]


def test_an_index_embedded_on_onnx_int8_keeps_its_graph_and_the_served_model_embeds_queries_with_it(
    tiny_clip_dir, synthetic_dataset, tmp_path
):
    from components.config import EmbeddingParams, IndexParams
    from components.embedder import build_embedder
    from components.index import IndexMismatchError
    from components.index.catalogue_index import EMBEDDER_FILE
    from components.index.indexing import add_to_index
    from components.matcher import load_served_model

    params = ModelParams(backbone="hf-clip", hf_model_id=str(tiny_clip_dir), embed_dim=16, image_size=16)
    encoder, preprocess = build_encoder(params)
    encoder_dir = save_encoder(encoder, preprocess, params, tmp_path / "encoder")
    rows = _catalogue_rows(synthetic_dataset)
    embedding = EmbeddingParams(runtime="onnx-int8", calibration_images=4, graph_dir=str(tmp_path / "graphs"))
    first, rest = rows.iloc[:-2], rows.iloc[-2:]
    catalogue = build_catalogue_index(
        encoder, preprocess, first, embedding=embedding, meta={"model_version": "1"}, model_dir=encoder_dir
    )
    checksum = save_index(catalogue, tmp_path / "index")
    assert catalogue.meta["embedding_runtime"] == "onnx-int8" and (tmp_path / "index" / EMBEDDER_FILE).exists()
    int8 = build_embedder(encoder, preprocess, "onnx-int8", tmp_path / "index" / EMBEDDER_FILE)
    torch_vectors = build_embedder(encoder, preprocess).embed_paths(list(first["image_path"]))
    stored = np.asarray(load_index(tmp_path / "index").vectors, dtype=np.float32)
    np.testing.assert_allclose(stored, int8.embed_paths(list(first["image_path"])), atol=2e-3)  # float16 rows
    assert not np.allclose(stored, torch_vectors, atol=2e-3)  # int8, not the torch vectors

    served = load_served_model(encoder_dir, tmp_path / "index", "m", "1", checksum)
    photo = Image.open(first["image_path"].iat[0])
    assert served.embedder.runtime == "onnx-int8"
    np.testing.assert_allclose(served.embed([photo]), int8.embed_images([photo], as_queries=True), atol=1e-6)
    assert served.match([photo], top_k=1)[0][0]["sku_id"] == first["sku_id"].iat[0]

    # Products added later are embedded by the index's own graph, which the next version keeps.
    added_checksum, added = add_to_index(
        encoder_dir, tmp_path / "index", rest, tmp_path / "added", IndexParams(), embedding, checksum, "1"
    )
    assert added.meta["embedding_runtime"] == "onnx-int8" and (tmp_path / "added" / EMBEDDER_FILE).exists()
    new_rows = np.asarray(load_index(tmp_path / "added", added_checksum).vectors[-2:], dtype=np.float32)
    np.testing.assert_allclose(new_rows, int8.embed_paths(list(rest["image_path"])), atol=2e-3)

    graph = tmp_path / "index" / EMBEDDER_FILE
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(IndexMismatchError, match="not the graph that embedded it"):
        load_index(tmp_path / "index", checksum)
