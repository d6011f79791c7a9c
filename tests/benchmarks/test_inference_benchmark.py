"""The inference layout benchmark end to end on a small untrained EfficientNet-Lite0: real embeddings, real timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import inference

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY = ["model.backbone=efficientnet-lite0", "model.pretrained=false", "model.image_size=32", "model.embed_dim=16"]


def test_both_layouts_are_timed_on_both_workloads_and_embed_alike(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "inference.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    argv = ["--params", str(PARAMS), "--queries", "2", "--gallery-batches", "1", "--repeats", "1", "--out", str(out)]
    assert inference.main(argv + [arg for override in TINY for arg in ("--set", override)]) == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.inference")
    assert parts.command.endswith("--queries 2 --gallery-batches 1 --repeats 1")
    assert "torch threads" in text and "`efficientnet-lite0` (pretrained False)" in parts.setup[0]
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    table = table_rows(parts.headline)
    # The default params' three query zooms, each with its mirror: 6 passes per /match photo.
    assert set(table) == {"/match query (1 photo, 6 passes)", "gallery (batches of 4, 2 passes each)"}
    assert [int(row[0]) for row in table.values()] == [2, 4]  # one batch of evaluate.batch_size
    for _images, baseline_ms, built_ms, ratio, difference in table.values():
        assert float(baseline_ms) > 0 and float(built_ms) > 0
        assert ratio.startswith("×") and float(ratio.removeprefix("×")) > 0
        assert float(difference) < 1e-4  # the layout changes speed, not embeddings


def test_counts_below_one_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        inference.main(["--params", str(PARAMS), "--repeats", "0", "--out", str(tmp_path / "out.md")])
    assert not (tmp_path / "out.md").exists()
