"""What operators see: labelled Prometheus series at /metrics, and a request id in answers and logs."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def _series(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in a Prometheus text exposition."""
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.index("}")]
            found.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return found


def test_metrics_carry_the_labelled_series(server, packaged, tmp_path):
    champion = packaged.champion
    sku, paths = next(iter(champion.catalogue.items()))
    for _ in range(3):
        assert (
            httpx.post(
                f"{server.url}/match", files={"image": ("a.jpg", paths[0].read_bytes(), "image/jpeg")}, timeout=30
            ).status_code
            == 200
        )
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 500)).save(thin)
    assert (
        httpx.post(
            f"{server.url}/match", files={"image": ("t.png", thin.read_bytes(), "image/png")}, timeout=30
        ).status_code
        == 400
    )
    assert httpx.post(f"{server.url}/match", json={"image": "/etc/passwd"}, timeout=30).status_code == 415

    text = ""
    deadline = time.monotonic() + 10
    while "max_aspect_ratio" not in text and time.monotonic() < deadline:  # written as the answer goes out
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        time.sleep(0.2)
    model = {"model_version": champion.version, "index_checksum": champion.index_checksum}
    latency = _series(text, "skumatch_request_duration_seconds_count")
    assert {"route": "/match", "status": "200", **model} in latency
    rejections = _series(text, "skumatch_rejections_total")
    assert {"route": "/match", "reason": "max_aspect_ratio", **model} in rejections
    assert {"route": "/match", "reason": "content_type", **model} in rejections
    assert model in _series(text, "skumatch_inference_batch_images_count")
    assert model in _series(text, "skumatch_top1_score_count")
    assert {"confident": "true", **model} in _series(text, "skumatch_match_answers_total")
    # Probes are not counted as traffic.
    assert not [labels for labels in latency if labels.get("route") in ("/readyz", "/metrics")]


def test_request_id_is_echoed_and_logged(server, packaged):
    path = next(iter(packaged.champion.catalogue.values()))[0]
    mine = httpx.post(
        f"{server.url}/match",
        files={"image": ("a.jpg", path.read_bytes(), "image/jpeg")},
        headers={"X-Request-ID": "shelf-42.a"},
        timeout=30,
    )
    assert mine.headers["x-request-id"] == "shelf-42.a"
    # An id that is not tame (spaces, over 64 characters) is replaced, not echoed into logs.
    theirs = httpx.post(f"{server.url}/match", json={}, headers={"X-Request-ID": "a b" * 40}, timeout=30)
    generated = theirs.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    deadline = time.monotonic() + 10
    while f"[request {generated}]" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.output()
    assert "[request shelf-42.a] POST /match -> 200" in log
    assert f"[request {generated}] POST /match -> 415" in log


def test_the_service_binds_loopback_unless_told_otherwise(server):
    # serving.local starts servers without --host, so this is the service's own default.
    port = server.url.rsplit(":", 1)[1]
    assert "--host" not in server.process.args
    assert f"listening on http://127.0.0.1:{port}" in server.output()
