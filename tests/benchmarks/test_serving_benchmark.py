"""The serving benchmark end to end: real ``bentoml serve`` processes under closed-loop load, a hostile
mix, a soak and a hot swap, against the same packaged model matched in-process, on a small
untrained EfficientNet-Lite0. The figures are not checked, the results file's structure is.

It runs as ``python -m benchmarks.serving`` in a subprocess because BentoML reads its home
folder once per process, and the benchmark points it at a throwaway folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.backbone=efficientnet-lite0", "model.pretrained=false", "model.image_size=32", "model.embed_dim=16"]
SMALL_RUN = [
    "--concurrency",
    "1",
    "2",
    "--requests-per-caller",
    "3",
    "--min-requests",
    "4",
    "--warm-up",
    "2",
    "--baseline-matches",
    "4",
    "--queries",
    "4",
    "--catalogue",
    "6",
    "--skus-of",
    "2",
    "--top-k",
    "2",
    "--probe-callers",
    "3",
    "--hostile-callers",
    "2",
    "--hostile-share",
    "0.5",
    "--swap-callers",
    "2",
    "--swap-requests-per-caller",
    "8",
    "--soak-minutes",
    "0.05",
    "--soak-callers",
    "2",
]
HOSTILE = [
    "1×5000 PNG",
    "JSON body naming /etc/passwd",
    "truncated JPEG",
    "PNG header claiming 12000×12000",
    "URL as a text value in the file field",
    "GIF",
]


def run_benchmark(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "benchmarks.serving",
        "--params",
        str(REPO_ROOT / "params.yaml"),
        "--out",
        str(out),
        *args,
        *[arg for override in TINY for arg in ("--set", override)],
    ]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


PASSES = ("before the servers", "between the servers", "after the servers")


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_one_run_writes_the_targets_then_every_part(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "serving.md"
    out.write_text(
        "# an earlier run\n\n| target | measured | met |\n|---|---|---|\n| old | 1 | yes |\n\n"
        "## Notes (by hand)\n\n- kept across runs\n"
    )
    result = run_benchmark(out, *SMALL_RUN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "an earlier run" not in text and "| old |" not in text
    assert text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    # The file opens with the targets table, the command, the machine and how to read it; no clock times.
    parts = results_file_parts(text, "benchmarks.serving")
    assert parts.title.startswith("Serving benchmark")
    assert parts.headline.startswith("| target | measured | met |\n|---|---|---|\n")
    headline = table_rows(parts.headline)
    assert list(headline) == [
        "throughput at concurrency 2 ≥ 0.9× in-process rate (lanes)",
        "p99 at concurrency 1 ≤ 1.3× in-process single-match time (lanes), same percentile",
        "/readyz p99 under 3 callers ≤ 50 ms",
        "0 non-4xx answers to hostile input",
        "0 failed requests across a hot swap under load",
        "soak: 0 errors and RSS growth < 10%",
    ]
    assert all(met in {"yes", "no"} for _, met in headline.values())

    for option in (
        "--concurrency 1 2",
        "--requests-per-caller 3",
        "--catalogue 6",
        "--hostile-share 0.5",
        "--soak-minutes 0.05",
        "--set model.image_size=32",
    ):
        assert option in parts.command
    assert [line.split(":")[0] for line in parts.setup] == ["Server", "Model", "Catalogue"]

    sections = dict(part.split("\n", 1) for part in text.split("\n## ")[1:])
    names = [name.split(":")[0] for name in sections]
    assert names == [
        "In-process baseline",
        "Closed-loop load",
        "One caller, in blocks of 20 requests, each followed by 20 in-process matches",
        "Health probes under 3 callers",
        "Hostile mix at concurrency 2",
        "Soak",
        "Hot swap under load",
        "Notes (by hand)",
    ]
    by_name = dict(zip(names, sections.values()))
    assert list(table_rows(by_name["In-process baseline"])) == [
        *(f"{name}, {kind}" for name in PASSES for kind in ("lanes", "without lanes")),
        "all passes, lanes (the baseline)",
        "all passes, without lanes",
    ]
    assert "Lanes against one call on torch's threads: ×" in by_name["In-process baseline"]
    load = table_rows(by_name["Closed-loop load"])
    assert list(load) == [
        "batching off, 1 caller",
        "batching off, 2 callers",
        "batching on, 1 caller",
        "batching on, 2 callers",
    ]
    assert all(len(cells) == 9 and cells[6].startswith("×") and cells[7].startswith("×") for cells in load.values())
    # The single caller's requests and the in-process matches beside them: as many of each.
    single = table_rows(by_name["One caller, in blocks of 20 requests, each followed by 20 in-process matches"])
    assert list(single) == ["batching off", "batching on"]
    assert all(cells[0] == cells[4] == "4" and cells[-1].startswith("×") for cells in single.values())
    assert (
        "alternating blocks"
        in headline["p99 at concurrency 1 ≤ 1.3× in-process single-match time (lanes), same percentile"][0]
    )
    assert list(table_rows(by_name["Health probes under 3 callers"])) == ["GET /readyz", "GET /metrics"]
    assert list(table_rows(by_name["Hostile mix at concurrency 2"])) == ["good photo", *HOSTILE]
    soak = table_rows(by_name["Soak"])
    assert len(soak) == 1 and next(iter(soak.values()))[-1].endswith("%")
    swap = table_rows(by_name["Hot swap under load"])
    assert {
        "requests sent",
        "failed (not 200 with matches, or no answer)",
        "reload: status, outcome",
        "reload duration (the admin request's round trip)",
        "latency over the run: p50, p99",
    } <= set(swap)
    assert any(name.startswith("answered by version ") for name in swap)


def test_a_run_without_a_soak_says_so():
    from benchmarks import serving

    figures = {
        "n": 4,
        "failed": 0,
        "per_s": 2.0,
        "p50": 10.0,
        "p95": 12.0,
        "p99": 13.0,
        "max": 14.0,
        "planned": 4,
        "timed_out": False,
        "per_call": 1.0,
    }
    results = {
        "baseline": {**figures, "per_s": 4.0},
        "batched": {"levels": {1: {**figures, "beside": figures}, 8: figures}},
        "health": {"probes": {"/readyz": figures}},
        "hostile": {"bad_not_4xx": 0, "bad": 1, "bad_json_4xx": 1, "good_not_200": 0, "good": 9},
        "swap": {**figures, "versions": {"1": 2, "2": 2}, "reload": {"body": {"outcome": "swapped"}}},
    }
    args, _ = serving.parse_args([])
    rows = serving.headline(results, args)
    assert "×1.00: p99 13.0 ms against in-process p99 13.0 ms" in rows[3]
    assert rows[-1] == "| soak: 0 errors and RSS growth < 10% | not run (--soak-minutes 0) | — |"
    assert serving.soak_section(results, args)[:3] == ["## Soak", "", "Not run: `--soak-minutes 0`."]


def test_bad_options_are_refused_before_anything_starts(tmp_path, capsys):
    # Refused while parsing, before a store, a model or a server exists (in-process: a process per
    # case cost 18 s of imports).
    from benchmarks import serving

    for args, message in (
        (["--requests-per-caller", "0"], "must be at least 1"),
        (["--concurrency", "1", "0"], "must be at least 1"),
        (["--hostile-share", "0"], "--hostile-share must be within (0, 1]"),
        (["--swap-after", "1"], "--swap-after within (0, 1)"),
        (["--soak-minutes", "-1"], "--soak-minutes must be at least 0"),
        (["--catalogue", "4", "--skus-of", "2", "--top-k", "3"], "more than the catalogue's 2 SKUs"),
    ):
        with pytest.raises(SystemExit) as refused:
            serving.parse_args(["--out", str(tmp_path / "serving.md"), *args])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "serving.md").exists()


def test_a_process_that_already_imported_bentoml_is_refused(tmp_path):
    # BentoML would keep its home from the first import, and the benchmark would write into the
    # user's model store instead of its throwaway one.
    import bentoml  # noqa: F401

    from benchmarks import serving

    out = tmp_path / "serving.md"
    with pytest.raises(RuntimeError, match="BENTOML_HOME before bentoml is imported"):
        serving.main(["--params", str(REPO_ROOT / "params.yaml"), "--out", str(out)])
    assert not out.exists()


def test_the_hostile_plan_spreads_and_rotates_the_bad_requests():
    from benchmarks.serving import GOOD, hostile_plan

    plan = hostile_plan(40, 0.1, ["a", "b", "c"])
    assert [kind for kind in plan if kind != GOOD] == ["a", "b", "c", "a"]
    bad_at = [position for position, kind in enumerate(plan) if kind != GOOD]
    assert bad_at == [5, 15, 25, 35]


def test_rss_counts_descendants_in_sessions_of_their_own():
    # BentoML's workers are started by circus with os.setsid: the server's process group would miss them.
    from benchmarks.serving import tree_rss

    alone, processes = tree_rss(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; data = bytearray(64 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10  # the child needs a moment to allocate
        while time.monotonic() < deadline and tree_rss(os.getpid())[0] < alone + (48 << 20):
            time.sleep(0.1)
        total, with_child = tree_rss(os.getpid())
        assert with_child == processes + 1 and total >= alone + (48 << 20)
    finally:
        child.communicate(b"", timeout=30)


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


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"error": "model failed"}'),
        (200, b'{"matches": [{"sku_id": "a"}]}'),  # fewer matches than top_k
        (200, b"not json"),
    ],
)
def test_a_wrong_answer_to_a_good_photo_is_a_failure_not_throughput(fake_server, status, body):
    # A benchmark that counted error pages would report a fast service that matches nothing.
    from benchmarks.serving import Load, good_request

    fake_server.answer = (status, body)
    url = f"http://127.0.0.1:{fake_server.server_port}"
    phase = Load(url, 2, 3, 30, good_request([("q.jpg", b"not looked at")], 2, 2), top_k=2).start().join()
    figures = phase.figures()
    assert (figures["n"], figures["failed"], figures["per_s"]) == (6, 6, 0.0)
    assert all(answer.detail.startswith(str(status)) for answer in phase.failed())


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, b'{"error": "bad", "reason": "corrupt"}', True),
        (413, b"not json", False),  # a refusal must be JSON
        (500, b'{"error": "crashed"}', False),
        (200, b'{"matches": []}', False),
    ],
)
def test_a_bad_request_counts_as_refused_only_with_a_json_4xx(fake_server, status, body, expected):
    import httpx

    from benchmarks.serving import send

    fake_server.answer = (status, body)
    with httpx.Client(timeout=10) as client:
        answer = send(
            client,
            f"http://127.0.0.1:{fake_server.server_port}",
            "GIF",
            {"files": {"image": ("a.gif", b"GIF89a", "image/gif")}},
            top_k=2,
        )
    assert (answer.status, answer.ok) == (status, expected)
