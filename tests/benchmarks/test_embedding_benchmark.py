"""The embedding benchmark end to end at small sizes: every way in its own process, on the real evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import embedding

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_each_way_is_timed_and_scored_against_the_plain_loop(
    tmp_path, synthetic_dataset, tiny_model_overrides, table_rows, results_file_parts
):
    out = tmp_path / "embedding.md"
    overrides = [*tiny_model_overrides, "embedding.calibration_images=4", "evaluate.leak_max_distance=null"]
    argv = ["--params", str(PARAMS), "--data-root", str(synthetic_dataset), "--dask-images", "0", "--out", str(out)]
    argv += ["--ways", "torch, decode ahead", "ONNX Runtime int8, decode ahead"]  # the fp32 graph is made on the way
    assert embedding.main(argv + [arg for override in overrides for arg in ("--set", override)]) == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.embedding")
    assert parts.command.endswith(f"--data-root {synthetic_dataset} --dask-images 0")
    rows = table_rows(text)
    ways = ["plain loop", "torch, decode ahead", "ONNX Runtime int8, decode ahead"]
    assert set(ways) <= set(rows) and "ONNX Runtime fp32, decode ahead" not in rows
    assert rows["plain loop"][1] == "×1.00"
    for way in ways:
        rate, top1 = float(rows[way][0]), rows[way][3]
        assert rate > 0 and top1.split()[0].replace(".", "").isdigit()
    assert rows["plain loop"][3].endswith("(+0.00)") and rows["plain loop"][4].endswith("(+0.00)")
    target = table_rows(parts.headline)
    measured = [cells for name, cells in target.items() if name.startswith("gallery images/s")]
    assert len(measured) == 2  # the default runtime's, and the fastest that holds top-1
    assert all(cells[1] in ("yes", "no") and "points of the plain loop" in cells[0] for cells in measured)
    assert "## Shards on local Dask workers" not in text  # --dask-images 0
