"""The serving benchmark end to end: a real ``bentoml serve`` answering /match over HTTP, timed
against the same packaged model matched in-process, on a small untrained EfficientNet-Lite0.

It runs as ``python -m benchmarks.serving`` in a subprocess because BentoML reads its home
folder once per process, and the benchmark points it at a throwaway folder.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.backbone=efficientnet-lite0", "model.pretrained=false", "model.image_size=32", "model.embed_dim=16"]


def run_benchmark(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.serving", "--params", str(REPO_ROOT / "params.yaml"),
               "--out", str(out), *args, *[arg for override in TINY for arg in ("--set", override)]]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_match_is_timed_over_http_and_in_process(tmp_path, table_rows):
    out = tmp_path / "serving.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    result = run_benchmark(out, "--requests", "3", "--catalogue", "6", "--skus-of", "2", "--repeats", "2",
                           "--top-k", "2", "--clients", "2", "--workers", "1", "2", "--batch", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text and "6 images of 3 SKUs" in text
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    latency_text, throughput_text = text.split("## Throughput")
    throughput_text, batch_text = throughput_text.split("## Batches")
    sides = {"in-process: decode_image + ServedModel.match (baseline)",
             "HTTP POST /match to bentoml serve, 1 worker", "HTTP POST /match to bentoml serve, 2 workers"}

    latency = table_rows(latency_text)
    assert set(latency) == sides
    # 3 timed requests in each of 2 passes, the warm-up not counted; the baseline passes beside each server.
    assert [int(row[0]) for row in latency.values()] == [12, 6, 6]
    for _, p50, p95, mean, ratio in latency.values():
        assert 0 < float(p50) <= float(p95) and float(mean) > 0
        assert ratio.startswith("×") and float(ratio.removeprefix("×")) > 0

    throughput = table_rows(throughput_text)
    assert set(throughput) == sides
    # The baseline matches the 3 queries once; each server gets them from each of the 2 callers.
    assert [int(row[0]) for row in throughput.values()] == [3, 6, 6]
    for _, per_second, p50, p95, ratio in throughput.values():
        assert float(per_second) > 0 and 0 < float(p50) <= float(p95)
        assert ratio.startswith("×") and float(ratio.removeprefix("×")) > 0
    assert throughput["in-process: decode_image + ServedModel.match (baseline)"][-1] == "×1.00"

    batched = table_rows(batch_text.split("## Notes")[0])
    baseline = "in-process: decode_image + ServedModel.match (baseline)"
    assert list(batched) == [baseline, "in-process: ServedModel.match over batches of 2",
                             "HTTP POST /match_batch (2 photos a request) to bentoml serve, 1 worker",
                             "HTTP POST /match_batch (2 photos a request) to bentoml serve, 2 workers"]
    assert batched[baseline] == throughput[baseline]  # one baseline for both rates
    # Images: the 3 queries once in-process; each server gets them from each of the 2 callers.
    assert [int(row[0]) for row in batched.values()] == [3, 3, 6, 6]
    for _, per_second, p50, p95, ratio in batched.values():
        assert float(per_second) > 0 and 0 < float(p50) <= float(p95)
        # Over the one-after-another rate (both figures are printed rounded, hence the tolerance).
        assert float(ratio.removeprefix("×")) == pytest.approx(float(per_second) / float(batched[baseline][1]), rel=0.05, abs=0.02)


def test_bad_counts_are_refused_before_anything_starts(tmp_path):
    out = tmp_path / "serving.md"
    for args, message in ((["--requests", "0"], "must be at least 1"), (["--clients", "0"], "must be at least 1"),
                          (["--workers", "1", "0"], "must be at least 1"), (["--batch", "0"], "must be at least 1"),
                          (["--batch", "65"], "more than /match_batch takes (64)"),
                          (["--catalogue", "4", "--skus-of", "2", "--top-k", "3"], "more than the catalogue's 2 SKUs")):
        result = run_benchmark(out, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not out.exists()


def test_a_process_that_already_imported_bentoml_is_refused(tmp_path):
    # BentoML would keep its home from the first import, and the benchmark would write into the
    # user's model store instead of its throwaway one.
    import bentoml  # noqa: F401

    from benchmarks import serving

    out = tmp_path / "serving.md"
    with pytest.raises(RuntimeError, match="BENTOML_HOME before bentoml is imported"):
        serving.main(["--params", str(REPO_ROOT / "params.yaml"), "--out", str(out)])
    assert not out.exists()


class _Answer(BaseHTTPRequestHandler):
    """Answers every POST with the status and body the test puts on the server."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "body", "message"), [
    (500, b'{"error": "model failed"}', "/match answered 500"),
    (200, b'{"matches": [{"sku_id": "a"}]}', "/match answered 200"),  # fewer matches than top_k
])
def test_a_wrong_answer_stops_the_timing(tmp_path, status, body, message):
    # A benchmark that timed error pages would report a fast service that matches nothing.
    import httpx

    from benchmarks.serving import http_ms

    photo = tmp_path / "query.jpg"
    photo.write_bytes(b"not looked at by this server")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.answer = (status, body)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=10) as client, pytest.raises(RuntimeError, match=message):
            http_ms(client, f"http://127.0.0.1:{server.server_port}", [photo], top_k=2)
    finally:
        server.shutdown()
        server.server_close()
