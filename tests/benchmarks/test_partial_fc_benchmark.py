"""The Partial FC benchmark end to end at small sizes: real heads, real optimisation steps, one process each."""

from __future__ import annotations

from pathlib import Path

from benchmarks import partial_fc

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_each_head_is_timed_at_each_sku_count_against_its_own_smallest(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "partial_fc.md"
    argv = ["--params", str(PARAMS), "--skus", "50", "3000", "--steps", "3", "--warmup", "1", "--out", str(out)]
    assert partial_fc.main(argv + ["--set", "train.loss.sampled_classes=200"]) == 0
    parts = results_file_parts(out.read_text(), "benchmarks.partial_fc")
    assert parts.command.endswith("--skus 50 3000 --steps 3 --warmup 1")
    rows = table_rows(parts.headline)
    assert set(rows) == {f"{head}, {count} SKUs" for head in partial_fc.HEADS for count in ("50", "3,000")}
    # Fewer SKUs than sampled_classes: the full softmax either way; more: Partial FC samples.
    assert rows["Partial FC, 50 SKUs"][0] == "no (all SKUs)" and rows["Partial FC, 3,000 SKUs"][0] == "yes"
    assert rows["full softmax, 3,000 SKUs"][0] == "no (all SKUs)"
    assert rows["Partial FC, 50 SKUs"][3] == "×1.00" == rows["full softmax, 50 SKUs"][3]
    # The head's state: the full softmax's weight and AdamW moments, Partial FC's weight and its own moments.
    assert float(rows["Partial FC, 3,000 SKUs"][4]) > 0 and float(rows["full softmax, 3,000 SKUs"][4]) > 0
