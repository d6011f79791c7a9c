"""The evaluation memory benchmark end to end at a small size: real metrics, one process per way."""

from __future__ import annotations

from benchmarks import evaluation


def test_both_ways_are_measured_and_agree_on_top1(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "evaluation.md"
    argv = ["--gallery", "3000", "--dense-up-to", "3000", "--queries", "40", "--dim", "16", "--out", str(out)]
    assert evaluation.main(argv) == 0
    parts = results_file_parts(out.read_text(), "benchmarks.evaluation")
    assert parts.command.endswith("--gallery 3000 --dense-up-to 3000 --queries 40 --dim 16")
    rows = table_rows(parts.headline)
    assert set(rows) == {"dense, 3,000 gallery vectors", "neighbours, 3,000 gallery vectors"}
    assert rows["dense, 3,000 gallery vectors"][2] == "×1.00"
    # The same ranking either way: top-1 agrees (mAP may not: mAP@1000 against the full mAP).
    assert (
        rows["dense, 3,000 gallery vectors"][4].split(" / ")[0]
        == rows["neighbours, 3,000 gallery vectors"][4].split(" / ")[0]
    )
