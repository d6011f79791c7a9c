"""The Partial FC benchmark end to end at small sizes: real heads, real optimisation steps, SKU counts interleaved."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import partial_fc

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_each_head_is_timed_at_each_sku_count_against_its_own_smallest(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "partial_fc.md"
    argv = ["--params", str(PARAMS), "--skus", "50", "3000", "--steps", "4", "--warmup", "1", "--blocks", "2"]
    argv += ["--out", str(out)]
    assert partial_fc.main(argv + ["--set", "train.loss.sampled_classes=200"]) == 0
    parts = results_file_parts(out.read_text(), "benchmarks.partial_fc")
    assert parts.command.endswith("--skus 50 3000 --steps 4 --warmup 1 --blocks 2")
    assert "runs 4 steps of each in 2 blocks" in out.read_text()
    rows = table_rows(parts.headline)
    assert set(rows) == {f"{head}, {count} SKUs" for head in partial_fc.HEADS for count in ("50", "3,000")}
    # Fewer SKUs than sampled_classes: the full softmax either way; more: Partial FC samples.
    assert rows["Partial FC, 50 SKUs"][0] == "no (all SKUs)" and rows["Partial FC, 3,000 SKUs"][0] == "yes"
    assert rows["full softmax, 3,000 SKUs"][0] == "no (all SKUs)"
    for ratio_column in (2, 6):  # the recipe step with its anchors, and the head alone
        assert rows["Partial FC, 50 SKUs"][ratio_column] == "×1.00" == rows["full softmax, 50 SKUs"][ratio_column]
    assert rows["Partial FC, 50 SKUs"][3] == "×1.00–1.00"
    assert all(float(row[1]) > 0 and float(row[4]) > 0 and float(row[7]) > 0 for row in rows.values())
    # The head's state: the full softmax's weight and AdamW moments (3x), Partial FC's weight and its own moments
    # (3x, plus a step count per row): 3,000 SKUs x 256-d.
    weight_mib = 3000 * 256 * 4 / 2**20
    assert 3 * weight_mib <= float(rows["full softmax, 3,000 SKUs"][8]) < 3.1 * weight_mib
    assert 3 * weight_mib <= float(rows["Partial FC, 3,000 SKUs"][8]) < 3.1 * weight_mib


def test_each_ratio_is_taken_within_its_block_so_a_drifting_machine_moves_both_sides():
    # The machine twice as fast in the second block and three times in the third: every block's ratio is x1.5.
    speeds = (1, 2, 3)
    timed = {
        count: {
            "recipe_blocks": [base / speed for speed in speeds],
            "head_blocks": [[base / 2 / speed, base / 2 / speed] for speed in speeds],
            "draw_ms": 0.1,
        }
        for count, base in ((1, 10.0), (2, 15.0))
    }
    summary = partial_fc.summarise(timed, [1, 2])
    assert summary[2]["recipe_ms_ratio"] == pytest.approx(1.5) == summary[2]["step_ms_ratio"]
    assert summary[2]["recipe_ratio_range"] == pytest.approx((1.5, 1.5)) and summary[1]["recipe_ms_ratio"] == 1.0
    assert summary[2]["recipe_ms"] == 7.5 and summary[2]["blocks"] == 3


@pytest.mark.parametrize("bad", [["--blocks", "0"], ["--warmup", "0"], ["--steps", "2", "--blocks", "3"]])
def test_a_block_layout_that_cannot_run_is_refused_before_anything_is_built(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        partial_fc.main(["--params", str(PARAMS), "--out", str(tmp_path / "out.md"), *bad])
    assert refused.value.code == 2 and "--blocks" in capsys.readouterr().err
    assert not (tmp_path / "out.md").exists()
