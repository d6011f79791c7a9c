"""Serving without a server: loading a verified model, decoding uploads, build helpers."""

from __future__ import annotations

import io
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import flip_byte

from components.config import ServeParams, UploadLimits
from components.index import IndexMismatchError
from components.index.catalogue_map import ITEMS_FILE, CatalogueMap
from components.matcher import load_served_model
from components.registry import ResolvedModel
from serving.build import package_model, serve_command, serving_requirements
from serving.uploads import BadImage, decode_image


def _copy(files, tmp_path: Path) -> tuple[Path, Path]:
    encoder_dir = shutil.copytree(files.encoder_dir, tmp_path / "encoder")
    index_dir = shutil.copytree(files.index_dir, tmp_path / "index")
    return encoder_dir, index_dir


# --- load_served_model: the check the service runs at start-up ---------------------------------


def test_load_served_model_matches_catalogue_images(served_files):
    served = load_served_model(served_files.encoder_dir, served_files.index_dir, "tiny", "7", served_files.checksum)
    images = [Image.open(p) for p in served_files.iconic.values()]
    results = served.match(images, top_k=3)
    assert [hits[0]["sku_id"] for hits in results] == list(served_files.iconic)
    assert all(hits[0]["score"] == pytest.approx(1.0, abs=1e-4) for hits in results)
    assert all(len({h["sku_id"] for h in hits}) == 3 for hits in results)
    vectors = served.embed(images[:2])
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_load_served_model_refuses_a_flipped_byte(served_files, tmp_path):
    encoder_dir, index_dir = _copy(served_files, tmp_path)
    flip_byte(index_dir / "index.faiss")
    with pytest.raises(IndexMismatchError, match="corrupt: checksum"):
        load_served_model(encoder_dir, index_dir, "tiny", "7", served_files.checksum)


def test_load_served_model_refuses_edited_items(served_files, tmp_path):
    encoder_dir, index_dir = _copy(served_files, tmp_path)
    rows = list(CatalogueMap.read(index_dir).rows())
    rows[0], rows[1] = rows[1], rows[0]
    CatalogueMap.from_lists([sku for sku, _ in rows], [path for _, path in rows]).write(index_dir / ITEMS_FILE)
    with pytest.raises(IndexMismatchError, match="checksum"):
        load_served_model(encoder_dir, index_dir, "tiny", "7", served_files.checksum)


def test_load_served_model_refuses_a_checksum_the_version_does_not_record(served_files):
    with pytest.raises(IndexMismatchError, match="records 0{64}"):
        load_served_model(served_files.encoder_dir, served_files.index_dir, "tiny", "7", "0" * 64)


def test_load_served_model_refuses_an_index_of_another_version(served_files):
    with pytest.raises(IndexMismatchError, match="built from model version 7, not the served version 8"):
        load_served_model(served_files.encoder_dir, served_files.index_dir, "tiny", "8", served_files.checksum)


def test_load_served_model_refuses_a_missing_index_file(served_files, tmp_path):
    encoder_dir, index_dir = _copy(served_files, tmp_path)
    (index_dir / "index.faiss").unlink()
    with pytest.raises(IndexMismatchError, match="lacks index.faiss"):
        load_served_model(encoder_dir, index_dir, "tiny", "7", served_files.checksum)


def test_package_model_verifies_before_storing(served_files):
    # Verification comes first, so a bad version never reaches the BentoML store.
    resolved = ResolvedModel("tiny", "7", served_files.encoder_dir, served_files.index_dir, "f" * 64, {})
    with pytest.raises(IndexMismatchError, match="records f{64}"):
        package_model(resolved, ServeParams(bento_model_name="never-created"))
    without_index = ResolvedModel("tiny", "7", served_files.encoder_dir, None, None, {})
    with pytest.raises(ValueError, match="without an index"):
        package_model(without_index, ServeParams(bento_model_name="never-created"))
    resolved_ok = ResolvedModel(
        "tiny", "7", served_files.encoder_dir, served_files.index_dir, served_files.checksum, {}
    )
    with pytest.raises(ValueError, match="serve.top_k must be within 1..100"):
        package_model(resolved_ok, ServeParams(top_k=101, bento_model_name="never-created"))


# --- decoding uploads ----------------------------------------------------------------------------


def _jpeg_bytes(size=(24, 20), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP")])
def test_decode_image_returns_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (9, 7)).save(path, format=fmt)
    image = decode_image(path, UploadLimits(formats=["JPEG", "PNG", "GIF", "WEBP"]))
    assert image.mode == "RGB" and image.size == (9, 7)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)), "not an image"),
        (b"just some text\n", "not an image"),
        (_jpeg_bytes()[:200], "truncated or corrupt"),
    ],
    ids=["empty", "random-bytes", "text", "truncated-jpeg"],
)
def test_decode_image_rejects_bad_uploads(tmp_path, content, message):
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=message):
        decode_image(path)


# --- build helpers -------------------------------------------------------------------------------


def test_serving_requirements_pin_installed_versions():
    requirements = serving_requirements()
    names = [r.split("==")[0] for r in requirements]
    assert len(names) == len(set(names)) and "bentoml" not in names  # BentoML adds its own pin
    torch_version = metadata.version("torch").split("+")[0]
    assert f"torch=={torch_version}" in requirements
    assert {"transformers", "faiss-cpu", "pillow", "safetensors", "numpy"} <= set(names)


def test_serve_command():
    assert serve_command("skumatch:abc", 3001) == [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "skumatch:abc",
        "--port",
        "3001",
    ]
    assert serve_command("skumatch:abc", 3001, host="127.0.0.1")[-2:] == ["--host", "127.0.0.1"]
    assert serve_command(None, 3000)[4] == "skumatch:latest"


# --- upload limits --------------------------------------------------------------------------------


def _saved(tmp_path: Path, size, fmt="PNG", **save) -> Path:
    path = tmp_path / f"upload.{fmt.lower()}"
    Image.new("RGB", size, (10, 200, 30)).save(path, format=fmt, **save)
    return path


@pytest.mark.parametrize(
    ("size", "limits", "reason", "status"),
    [
        ((1, 500), UploadLimits(), "max_aspect_ratio", 400),
        ((400, 10), UploadLimits(max_aspect_ratio=20), "max_aspect_ratio", 400),
        ((100, 100), UploadLimits(max_pixels=9_999), "max_pixels", 413),
        ((64, 64), UploadLimits(formats=["JPEG"]), "format", 400),
        ((64, 64), UploadLimits(max_upload_bytes=10), "max_upload_bytes", 413),
    ],
    ids=["thin", "wide", "pixels", "format", "bytes"],
)
def test_decode_image_enforces_each_limit_and_names_it(tmp_path, size, limits, reason, status):
    with pytest.raises(BadImage) as refused:
        decode_image(_saved(tmp_path, size), limits)
    assert (refused.value.reason, refused.value.status) == (reason, status)
    assert reason in str(refused.value) or reason == "format"


def test_decode_image_accepts_what_is_within_the_limits(tmp_path):
    assert decode_image(_saved(tmp_path, (400, 20)), UploadLimits(max_aspect_ratio=20)).size == (400, 20)
    assert decode_image(_saved(tmp_path, (100, 100)), UploadLimits(max_pixels=10_000)).size == (100, 100)


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
    # The header claims 12000 x 12000 pixels and the data holds almost none: had the pixels been
    # decoded first, this would be refused as truncated, not for its size.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(BadImage, match="12000 x 12000 = 144000000 pixels, over the limit max_pixels=50000000"):
        decode_image(path)


def test_decode_image_turns_a_photo_upright_by_its_exif_orientation(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, as the sensor wrote it
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    upright = decode_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[2] > 200  # the blue half is now on top


def test_decode_errors_do_not_echo_pillow(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes((64, 64))[:300])
    with pytest.raises(BadImage) as refused:
        decode_image(path)
    assert str(refused.value) == "the uploaded image is truncated or corrupt and could not be decoded"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_a_served_model_matches_on_cuda_as_on_the_cpu(served_files):
    """``serve.device: auto`` puts the served encoder on the GPU; its answers stay the CPU's."""
    args = (served_files.encoder_dir, served_files.index_dir, "tiny", "7", served_files.checksum)
    on_gpu, on_cpu = load_served_model(*args, device="auto"), load_served_model(*args, device="cpu")
    assert next(on_gpu.encoder.parameters()).device.type == "cuda"
    images = [Image.open(path).convert("RGB") for path in served_files.iconic.values()]
    assert [hits[0]["sku_id"] for hits in on_gpu.match(images, 1)] == list(served_files.iconic)
    np.testing.assert_allclose(on_gpu.embed(images), on_cpu.embed(images), atol=2e-2)  # bf16 on the GPU


# --- the upload guard's reading of multipart bodies ----------------------------------------------


def _multipart(*parts: bytes, boundary: bytes = b"xyz", close: bool = True) -> bytes:
    """A multipart body of ``parts`` (header lines, blank line, data)."""
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


FILE_PART = (
    b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + b"J" * 300
)
TEXT_PART = b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'


def test_multipart_parts_names_files_and_their_sizes():
    from serving.uploads import FormPart, multipart_parts

    parts = multipart_parts("multipart/form-data; boundary=xyz", _multipart(FILE_PART, TEXT_PART, FILE_PART))
    assert parts == [FormPart("image", True, 300), FormPart("top_k", False, 1), FormPart("image", True, 300)]
    # A browser's boundary is mixed case, and must be matched as sent.
    browser = b"----WebKitFormBoundaryQx7Zk"
    assert multipart_parts(
        f"Multipart/Form-Data; boundary={browser.decode()}", _multipart(FILE_PART, boundary=browser)
    ) == [FormPart("image", True, 300)]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", _multipart(FILE_PART)),  # no boundary
        ("multipart/form-data; boundary=xyz", _multipart(FILE_PART, close=False)),  # cut before the end
        ("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="image"'),
        ("multipart/form-data; boundary=xyz", b"no boundary anywhere"),
    ],
    ids=["no-boundary", "unterminated", "cut-in-headers", "no-parts"],
)
def test_multipart_parts_refuses_malformed_bodies(content_type, body):
    from serving.uploads import multipart_parts

    with pytest.raises(ValueError):
        multipart_parts(content_type, body)


def test_workers_share_torch_threads_out_unless_omp_num_threads_is_set():
    from serving.service import worker_torch_threads

    # Two workers that each took torch's thread-per-core default served 0.37 times one worker's
    # requests per second on 2 cores (benchmarks/results/serving.md).
    assert worker_torch_threads(8, 2, {}) == 4 and worker_torch_threads(2, 4, {}) == 1
    assert worker_torch_threads(2, 2, {"OMP_NUM_THREADS": "2"}) == 2  # torch caps the explicit value; it wins


def test_lanes_are_one_per_torch_thread_on_a_cpu_and_one_on_a_gpu():
    from serving.inference import lane_count

    assert lane_count("auto", 2, "cpu") == 2 and lane_count("auto", 8, "cuda:0") == 1
    assert lane_count(3, 8, "cpu") == 3  # an explicit count wins
    assert ServeParams.model_validate({"lanes": 2}).lanes == 2 and ServeParams().lanes == "auto"
    for bad in (0, "many"):
        with pytest.raises(ValueError):
            ServeParams.model_validate({"lanes": bad})
