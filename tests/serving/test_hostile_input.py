"""Hostile requests against a real ``bentoml serve``: named cases, then a generated fuzz run of 1000+.

What must hold for every request: no 5xx, every answer JSON, no server path opened and no URL
fetched (a FIFO planted where the requests point, and a canary HTTP server on loopback, both
watched), and the service still matching correctly afterwards.
"""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import struct
import threading
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.integration

FUZZ_REQUESTS = 1000


def _image_bytes(size=(32, 32), fmt="JPEG", colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny compressed row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class Watch:
    """A FIFO and a canary HTTP server: where hostile requests point, and proof that nothing went there."""

    def __init__(self, folder) -> None:
        self.fifo = folder / "marker-never-open-me"
        os.mkfifo(self.fifo)
        self.opened = threading.Event()
        self.fetched: list[str] = []
        self._stop = threading.Event()
        watch = self

        class Canary(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                watch.fetched.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(_image_bytes())

            def log_message(self, *_):
                pass

        self.canary = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canary)
        self.canary_url = f"http://127.0.0.1:{self.canary.server_address[1]}/photo.jpg"
        self._threads = [
            threading.Thread(target=self.canary.serve_forever, daemon=True),
            threading.Thread(target=self._watch_fifo, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _watch_fifo(self) -> None:
        # Opening a FIFO for writing without blocking succeeds only while someone has it open for
        # reading, and a reader's open blocks until a writer comes: so any open by the server is seen.
        while not self._stop.wait(0.005):
            try:
                handle = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                continue
            self.opened.set()
            os.close(handle)

    def close(self) -> None:
        self._stop.set()
        self.canary.shutdown()


@pytest.fixture(scope="module")
def watch(tmp_path_factory):
    watching = Watch(tmp_path_factory.mktemp("watched"))
    yield watching
    watching.close()


def test_the_watch_sees_a_read_of_the_marker_and_a_fetch(tmp_path):
    """The fuzz run's proof of 'nothing opened, nothing fetched' must itself be able to fail."""
    probe = Watch(tmp_path)
    try:
        reader = os.open(probe.fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert probe.opened.wait(5)
        finally:
            os.close(reader)
        httpx.get(probe.canary_url, timeout=5)
        assert probe.fetched == ["/photo.jpg"]
    finally:
        probe.close()


def _named_cases(watch: Watch) -> dict[str, dict]:
    marker, url = str(watch.fifo), watch.canary_url
    return {
        "json-path": dict(json={"image": marker}),
        "json-url": dict(json={"image": url}),
        "json-file-url": dict(json={"image": f"file://{marker}"}),
        "form-text-path": dict(data={"image": marker}),
        "form-text-url": dict(data={"image": url}),
        "multipart-text-path": dict(files={"image": (None, marker)}),
        "multipart-text-url": dict(files={"image": (None, url)}),
        "thin-1x5000": dict(files={"image": ("thin.png", _image_bytes((1, 5000), "PNG"), "image/png")}),
        "thin-60000x1": dict(files={"image": ("wide.png", _png_claiming(60000, 1), "image/png")}),
        "144-megapixels": dict(files={"image": ("huge.png", _png_claiming(12000, 12000), "image/png")}),
        "gif-not-allowed": dict(files={"image": ("a.gif", _image_bytes((8, 8), "GIF"), "image/gif")}),
    }


@pytest.mark.parametrize(
    "case",
    [
        "json-path",
        "json-url",
        "json-file-url",
        "form-text-path",
        "form-text-url",
        "multipart-text-path",
        "multipart-text-url",
        "thin-1x5000",
        "thin-60000x1",
        "144-megapixels",
        "gif-not-allowed",
    ],
)
@pytest.mark.parametrize("route", ["/match", "/match_batch", "/embed"])
def test_named_hostile_requests_are_refused_as_json(server, watch, route, case):
    request = _named_cases(watch)[case]
    if route == "/match_batch" and "files" in request:
        request = {"files": [("images", value) for value in request["files"].values()]}
    response = httpx.post(f"{server.url}{route}", timeout=30, **request)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    body = response.json()
    assert body["error"] and body["reason"], body
    limit_reasons = {
        "thin-1x5000": "max_aspect_ratio",
        "thin-60000x1": "max_aspect_ratio",
        "144-megapixels": "max_pixels",
        "gif-not-allowed": "format",
    }
    if case in limit_reasons:
        assert body["reason"] == limit_reasons[case] or (route == "/match_batch" and body["bad_images"]), body
        assert "limit" in body["error"] or "format" in body["error"] or "could not be decoded" in body["error"]
    assert not watch.opened.is_set() and not watch.fetched


def test_a_chunked_body_without_length_is_refused(server):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        yield _image_bytes()
        yield b"\r\n--b--\r\n"

    response = httpx.post(
        f"{server.url}/match", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=30
    )
    assert response.status_code == 411 and response.json()["reason"] == "length_required"


def test_a_rotated_phone_photo_is_matched_upright(server, packaged):
    """A catalogue image stored on its side with EXIF orientation 6 must match as the upright one does."""
    sku, paths = next(iter(packaged.champion.catalogue.items()))
    upright = Image.open(paths[0]).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote; EXIF 6 turns it back
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    response = httpx.post(
        f"{server.url}/match", files={"image": ("phone.jpg", buffer.getvalue(), "image/jpeg")}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["matches"][0]["sku_id"] == sku
    assert response.json()["matches"][0]["score"] > 0.99


# --- the generated fuzz run ----------------------------------------------------------------------

VALID_JPEG, VALID_PNG = _image_bytes(), _image_bytes(fmt="PNG")
CONTENT_TYPES = [
    "image/jpeg",
    "image/png",
    "text/plain",
    "application/json",
    "application/octet-stream",
    "text/html",
    "",
    "image/svg+xml",
]


def _payloads(watch: Watch):
    """File contents: random, truncated, huge-dimension, thin, polyglot, and a few valid images."""
    marker, url = str(watch.fifo), watch.canary_url
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(VALID_JPEG)).map(lambda cut: VALID_JPEG[:cut]),
        st.integers(0, len(VALID_PNG)).map(lambda cut: VALID_PNG[:cut]),
        st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda size: _png_claiming(*size)),
        st.tuples(st.integers(1, 3), st.integers(50, 3000), st.booleans()).map(
            lambda thin: _image_bytes((thin[0], thin[1]) if thin[2] else (thin[1], thin[0]), "PNG")
        ),
        st.sampled_from(
            [
                VALID_JPEG + b"<html><script>alert(1)</script></html>",
                b"GIF89a/*" + b"\x00" * 20 + b"*/=alert(1);",
                VALID_PNG + b"PK\x03\x04" + b"\x00" * 26,
                b"%PDF-1.4\n" + VALID_JPEG,
                b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                marker.encode(),
                url.encode(),
                f"file://{marker}".encode(),
            ]
        ),
        st.binary(min_size=1, max_size=64).map(lambda noise: VALID_JPEG[:200] + noise + VALID_JPEG[200:]),
        st.just(VALID_JPEG),
        st.just(VALID_PNG),
    )


def _requests(watch: Watch):
    marker, url = str(watch.fifo), watch.canary_url
    routes = st.sampled_from(["/match", "/match_batch", "/embed"])
    # The real field names twice as often, so that many requests reach the decoder.
    field_names = st.sampled_from(["image", "images", "image", "images", "photo", "file", "image[]", "", "img\x00"])
    text_values = st.sampled_from([marker, url, f"file://{marker}", "../../etc/passwd", "5", "", "x" * 300])
    top_k = st.one_of(st.none(), st.sampled_from(["0", "1", "3", "101", "-1", "nan", "1e9", "\u0661", "[]"]))
    multipart = st.fixed_dictionaries(
        {
            "kind": st.just("multipart"),
            "route": routes,
            "parts": st.lists(
                st.tuples(
                    field_names,
                    _payloads(watch),
                    st.sampled_from(CONTENT_TYPES),
                    st.sampled_from(["a.jpg", "a.png", "../../x.jpg", "", "é.jpg"]),
                ),
                min_size=0,
                max_size=4,
            ),
            "texts": st.lists(st.tuples(field_names, text_values), max_size=2),
            "top_k": top_k,
        }
    )
    json_body = st.fixed_dictionaries(
        {
            "kind": st.just("json"),
            "route": routes,
            "body": st.dictionaries(
                st.sampled_from(["image", "images", "path", "url", "top_k"]),
                st.one_of(text_values, st.lists(text_values, max_size=3), st.integers()),
                max_size=3,
            ),
        }
    )
    raw = st.fixed_dictionaries(
        {
            "kind": st.just("raw"),
            "route": routes,
            "body": _payloads(watch),
            "content_type": st.sampled_from(
                [
                    *CONTENT_TYPES,
                    "multipart/form-data",
                    "multipart/form-data; boundary=zz",
                    "application/x-www-form-urlencoded",
                ]
            ),
        }
    )
    return st.one_of(multipart, json_body, raw)


def _send(server, request: dict, client: httpx.Client | None = None) -> httpx.Response:
    post = client.post if client else httpx.post
    target = f"{server.url}{request['route']}"
    if request["kind"] == "json":
        return post(target, json=request["body"], timeout=30)
    if request["kind"] == "raw":
        return post(target, content=request["body"], headers={"content-type": request["content_type"]}, timeout=30)
    files = [(name, (filename, payload, content_type)) for name, payload, content_type, filename in request["parts"]]
    data = dict(request["texts"])
    if request["top_k"] is not None:
        data["top_k"] = request["top_k"]
    if not files:
        return post(target, data=data, timeout=30)
    return post(target, files=files, data=data, timeout=30)


def test_fuzz_run_gets_no_5xx_opens_nothing_and_leaves_the_service_matching(server, packaged, watch):
    statuses: list[int] = []
    # Valid requests among the generated ones whatever the seed (any edit of this test changes it):
    # the run must show the service matching between the refusals.
    photo = next(iter(packaged.champion.catalogue.values()))[0].read_bytes()
    valid = {"kind": "multipart", "route": "/match", "texts": [], "top_k": "3"}

    @example({**valid, "parts": [("image", photo, "image/jpeg", "a.jpg")]})
    @example({**valid, "route": "/match_batch", "parts": [("images", photo, "image/jpeg", "a.jpg")] * 2})
    @settings(
        max_examples=FUZZ_REQUESTS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_requests(watch))
    def one_request(request):
        response = _send(server, request, client)
        statuses.append(response.status_code)
        assert response.status_code < 500, (request, response.status_code, response.text[:500])
        assert response.headers["content-type"].startswith("application/json"), (request, response.text[:200])
        json.loads(response.content)

    # One client for the run (building one per request cost about a fifth of the run), and a new
    # connection per request, as separate callers would send them.
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        one_request()
    print("fuzz answers by status:", {status: statuses.count(status) for status in sorted(set(statuses))})
    assert len(statuses) >= FUZZ_REQUESTS
    # A real mix: most requests refused, some valid images matched.
    assert any(status == 200 for status in statuses) and sum(400 <= s < 500 for s in statuses) > FUZZ_REQUESTS / 2
    assert not watch.opened.is_set(), "the service opened the planted FIFO"
    assert watch.fetched == [], f"the service fetched {watch.fetched}"
    assert server.process.poll() is None
    for sku, paths in packaged.champion.catalogue.items():
        answer = httpx.post(
            f"{server.url}/match", files={"image": ("q.jpg", paths[0].read_bytes(), "image/jpeg")}, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["matches"][0]["sku_id"] == sku
