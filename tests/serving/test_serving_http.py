"""The packaged @champion served by a real ``bentoml serve`` process, over real HTTP."""

from __future__ import annotations

import io
import json
import os
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import private_home, running

from components.config import ServeParams
from serving import SERVICE_NAME

MAX_BATCH_IMAGES = ServeParams().limits.max_images_per_request

pytestmark = pytest.mark.integration


def _post(server, route: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", timeout=30, **kwargs)


def _upload(path, name: str | None = None, content_type: str = "image/jpeg") -> dict:
    return {"image": (name or path.name, path.read_bytes(), content_type)}


def test_health_endpoints(server):
    for route in ("/livez", "/readyz", "/healthz"):
        assert httpx.get(f"{server.url}{route}", timeout=10).status_code == 200, route


def test_info_describes_the_packaged_version(server, packaged):
    champion = packaged.champion
    response = _post(server, "/info", json={})
    assert response.status_code == 200, response.text
    info = response.json()
    assert {
        key: info[key]
        for key in (
            "model_name",
            "model_version",
            "index_checksum",
            "catalogue_size",
            "catalogue_skus",
            "embed_dim",
            "default_top_k",
            "batch_size",
            "bento_model",
            "workers",
            "torch_threads",
            "lanes",
            "device",
            "embedding_runtime",
            "thumbnails",
        )
    } == {
        "model_name": "skumatch-serving-test",
        "model_version": champion.version,
        "index_checksum": champion.index_checksum,
        "catalogue_size": sum(len(paths) for paths in champion.catalogue.values()),
        "catalogue_skus": len(champion.catalogue),
        "embed_dim": 16,
        "default_top_k": 3,  # serve.top_k of the params the Bento was packaged with
        "batch_size": 3,  # and their serve.batch_size
        "bento_model": packaged.model_tag,
        "workers": 1,
        # One worker keeps torch's own choice (nothing in the tests changes this process's).
        "torch_threads": torch.get_num_threads(),
        "lanes": torch.get_num_threads(),  # serve.lanes auto: one per torch thread on a CPU
        "device": "cpu",
        "embedding_runtime": "torch",  # the runtime the champion's index was embedded on
        "thumbnails": len(champion.catalogue),  # one per SKU, packed with the model
    }
    # The limits in force are the packaged serve.limits, so a client can size its requests.
    assert info["limits"] == ServeParams().limits.model_dump()
    assert info["api_keys_required"] is False and info["admin_enabled"] is False


def test_match_returns_the_catalogue_sku_first(server, packaged):
    champion = packaged.champion
    for sku, paths in champion.catalogue.items():
        response = _post(server, "/match", files=_upload(paths[0]))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == "skumatch-serving-test" and body["model_version"] == champion.version
        assert body["index_checksum"] == champion.index_checksum  # the pair that answered
        matches = body["matches"]
        assert len(matches) == 3  # the packaged default top_k
        assert matches[0]["sku_id"] == sku
        assert matches[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len({m["sku_id"] for m in matches}) == 3  # distinct SKUs, never one SKU twice
        assert [m["score"] for m in matches] == sorted((m["score"] for m in matches), reverse=True)


def test_match_top_k_and_formats(server, packaged):
    sku, paths = next(iter(packaged.champion.catalogue.items()))
    everything = _post(server, "/match", files=_upload(paths[0]), data={"top_k": "100"})
    assert everything.status_code == 200, everything.text
    assert len(everything.json()["matches"]) == len(packaged.champion.catalogue)  # all SKUs, each once
    # The same picture as PNG: a lossless re-encoding still finds its SKU first.
    png = io.BytesIO()
    Image.open(paths[0]).save(png, format="PNG")
    one = _post(server, "/match", files={"image": ("q.png", png.getvalue(), "image/png")}, data={"top_k": "1"})
    assert one.status_code == 200, one.text
    assert [m["sku_id"] for m in one.json()["matches"]] == [sku]


def test_embed_returns_a_unit_vector(server, packaged):
    path = next(iter(packaged.champion.catalogue.values()))[0]
    response = _post(server, "/embed", files=_upload(path))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == packaged.champion.version
    vector = np.asarray(body["embedding"])
    assert vector.shape == (16,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def _batch(paths) -> list:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]


def test_match_batch_answers_each_image_in_upload_order(server, packaged):
    champion = packaged.champion
    skus, paths = zip(*((sku, sku_paths[0]) for sku, sku_paths in champion.catalogue.items()))
    # Reversed, so an answer in any order other than the upload's would fail.
    skus, paths = skus[::-1], paths[::-1]
    response = _post(server, "/match_batch", files=_batch(paths), data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == champion.version and body["reject_below"] == pytest.approx(
        _post(server, "/match", files=_upload(paths[0])).json()["reject_below"]
    )
    assert [result["matches"][0]["sku_id"] for result in body["results"]] == list(skus)
    assert all(len(result["matches"]) == 2 for result in body["results"])
    # The same answers as one /match request per image: batching changes nothing matched.
    for path, result in zip(paths, body["results"]):
        single = _post(server, "/match", files=_upload(path), data={"top_k": "2"}).json()
        assert [m["sku_id"] for m in single["matches"]] == [m["sku_id"] for m in result["matches"]]
        assert [m["score"] for m in single["matches"]] == pytest.approx(
            [m["score"] for m in result["matches"]], abs=1e-5
        )
        assert single["no_confident_match"] == result["no_confident_match"]


def test_match_batch_refuses_the_request_and_names_every_bad_image(server, packaged):
    good = next(iter(packaged.champion.catalogue.values()))[0]
    files = _batch([good]) + [
        ("images", ("cut.jpg", _jpeg()[:300], "image/jpeg")),
        *_batch([good]),
        ("images", ("notes.txt", b"not an image\n", "text/plain")),
    ]
    response = _post(server, "/match_batch", files=files)
    assert response.status_code == 400, response.text
    body = response.json()
    assert "2 of 4 images" in body["error"]
    assert [bad["index"] for bad in body["bad_images"]] == [1, 3]
    assert "truncated or corrupt" in body["bad_images"][0]["error"]
    assert "not an image" in body["bad_images"][1]["error"]


@pytest.mark.parametrize("case", ["none", "too-many", "text-value", "wrong-field"])
def test_match_batch_refuses_bad_image_lists(server, packaged, case):
    good = next(iter(packaged.champion.catalogue.values()))[0]
    request = {
        "none": dict(data={"top_k": "3"}),
        "too-many": dict(files=_batch([good] * (MAX_BATCH_IMAGES + 1))),
        "text-value": dict(data={"images": "http://example.com/photo.jpg"}),
        "wrong-field": dict(files=_upload(good)),
    }[case]
    response = _post(server, "/match_batch", **request)
    # No file at all, or only text, is not a multipart upload: 415, as a JSON body would be.
    expected = {"too-many": 413, "none": 415, "text-value": 415}.get(case, 400)
    assert response.status_code == expected, response.text
    assert response.json()["error"]


def _jpeg(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "empty-file": dict(files={"image": ("empty.jpg", b"", "image/jpeg")}),
    "random-bytes": dict(
        files={
            "image": ("noise.jpg", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "image/jpeg")
        }
    ),
    "truncated-jpeg": dict(files={"image": ("cut.jpg", _jpeg()[:300], "image/jpeg")}),
    "text-file": dict(files={"image": ("notes.txt", b"not an image at all\n", "text/plain")}),
    "missing-field": dict(data={"top_k": "3"}),
    # BentoML parses a file under a field name its API lacks as JSON: a 500 without the guard.
    "file-under-another-field": dict(files={"photo": ("p.jpg", _jpeg(), "image/jpeg")}),
    "no-body": dict(),
    "text-value-instead-of-file": dict(files={"image": (None, "http://example.com/photo.jpg")}),
    "url-encoded-form": dict(data={"image": "http://example.com/photo.jpg"}),
    "json-body": dict(json={"image": "/etc/passwd"}),
    "raw-jpeg-body": dict(content=_jpeg(), headers={"content-type": "image/jpeg"}),
    "broken-multipart": dict(
        content=b'--xyz\r\nContent-Disposition: form-data; name="image"',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    ),
}
BAD_TOP_K = {"top_k-0": "0", "top_k-101": "101", "top_k-negative": "-3", "top_k-not-a-number": "five"}


@pytest.mark.parametrize("route", ["/match", "/embed"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_uploads_are_4xx_with_a_json_error(server, route, case):
    response = _post(server, route, **BAD_REQUESTS[case])
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict) and body["error"], body


@pytest.mark.parametrize("case", list(BAD_TOP_K))
def test_top_k_out_of_range_is_400(server, packaged, case):
    path = next(iter(packaged.champion.catalogue.values()))[0]
    response = _post(server, "/match", files=_upload(path), data={"top_k": BAD_TOP_K[case]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] and body["detail"][0]["loc"] == ["top_k"]


def test_bad_upload_messages_say_what_is_wrong(server):
    def error(**kwargs) -> str:
        return _post(server, "/match", **kwargs).json()["error"]

    assert "empty" in error(**BAD_REQUESTS["empty-file"])
    assert "not an image" in error(**BAD_REQUESTS["text-file"])
    assert "truncated or corrupt" in error(**BAD_REQUESTS["truncated-jpeg"])
    assert "must be a file upload" in error(**BAD_REQUESTS["text-value-instead-of-file"])
    assert "only as multipart/form-data file uploads" in error(**BAD_REQUESTS["url-encoded-form"])
    assert "only as multipart/form-data file uploads" in error(**BAD_REQUESTS["json-body"])
    assert "only in the form field 'image', not 'photo'" in error(**BAD_REQUESTS["file-under-another-field"])


def test_server_still_answers_after_bad_requests(server, packaged):
    path = next(iter(packaged.champion.catalogue.values()))[0]
    assert _post(server, "/match", files=_upload(path)).status_code == 200
    assert server.process.poll() is None


CPUS = len(os.sched_getaffinity(0))


def test_workers_share_torch_threads_out(packaged, tmp_path):
    # The worker count comes from a deploy-time override, as an operator would set it, not from
    # the service's code; how the threads are shared is worker_torch_threads's (unit-tested).
    overrides = {"services": {SERVICE_NAME: {"workers": "cpu_count"}}}
    env = {**private_home(packaged.champion.env, tmp_path), "BENTOML_CONFIG_OVERRIDES": json.dumps(overrides)}
    env.pop("OMP_NUM_THREADS", None)
    threads_each = max(1, torch.get_num_threads() // CPUS)
    with running(packaged.bento_tag, env, tmp_path / "serve.log") as server:
        answers = [_post(server, "/info", json={}) for _ in range(6)]
        # serve.lanes auto on a CPU: one lane per torch thread of the worker.
        assert {tuple(answer.json()[key] for key in ("workers", "torch_threads", "lanes")) for answer in answers} == {
            (CPUS, threads_each, threads_each)
        }


def test_cli_match_sends_several_photos_as_one_batch(server, packaged, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    catalogue = packaged.champion.catalogue
    paths = [sku_paths[0] for sku_paths in catalogue.values()]

    def requests_to(route: str) -> int:  # BentoML's access log: "... path=/match_batch,type=..."
        return server.output().count(f"path={route},")

    before = {route: requests_to(route) for route in ("/match", "/match_batch")}
    result = CliRunner().invoke(app, ["match", *map(str, paths), "--url", server.url, "--top-k", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # Each photo's line, then its one match: the photo's own SKU.
    for sku, path in zip(catalogue, paths):
        at = lines.index(next(line for line in lines if line.startswith(f"{path} -> ")))
        assert lines[at + 1].split()[1] == sku, result.output
    # The access log line is written as the response goes out, so give it a moment to land.
    deadline = time.monotonic() + 10
    while requests_to("/match_batch") == before["/match_batch"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {route: requests_to(route) - count for route, count in before.items()} == {"/match": 0, "/match_batch": 1}

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_jpeg()[:300])
    refused = CliRunner().invoke(app, ["match", str(paths[0]), str(broken), "--url", server.url])
    assert refused.exit_code == 1
    assert f"{broken}: the uploaded image is truncated or corrupt" in refused.output


def test_a_mixed_case_boundary_is_matched_as_sent(server, packaged):
    """Browsers send boundaries such as ----WebKitFormBoundaryQx7Zk: case matters in them."""
    sku, paths = next(iter(packaged.champion.catalogue.items()))
    boundary = "----WebKitFormBoundaryQx7Zk"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + paths[0].read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = _post(
        server, "/match", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["matches"][0]["sku_id"] == sku
