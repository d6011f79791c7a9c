"""The Partial FC benchmark end to end at small sizes: real heads, real optimisation steps, one process each."""

from __future__ import annotations

from pathlib import Path

from benchmarks import partial_fc

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_each_head_is_timed_at_each_sku_count_against_its_own_smallest(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "partial_fc.md"
    argv = ["--params", str(PARAMS), "--skus", "50", "3000", "--steps", "3", "--warmup", "1", "--repeats", "1"]
    argv += ["--out", str(out)]
    assert partial_fc.main(argv + ["--set", "train.loss.sampled_classes=200"]) == 0
    parts = results_file_parts(out.read_text(), "benchmarks.partial_fc")
    assert parts.command.endswith("--skus 50 3000 --steps 3 --warmup 1 --repeats 1")
    rows = table_rows(parts.headline)
    assert set(rows) == {f"{head}, {count} SKUs" for head in partial_fc.HEADS for count in ("50", "3,000")}
    # Fewer SKUs than sampled_classes: the full softmax either way; more: Partial FC samples.
    assert rows["Partial FC, 50 SKUs"][0] == "no (all SKUs)" and rows["Partial FC, 3,000 SKUs"][0] == "yes"
    assert rows["full softmax, 3,000 SKUs"][0] == "no (all SKUs)"
    for ratio_column in (2, 5):  # the recipe step with its anchors, and the head alone
        assert rows["Partial FC, 50 SKUs"][ratio_column] == "×1.00" == rows["full softmax, 50 SKUs"][ratio_column]
    assert all(float(row[1]) > 0 and float(row[3]) > 0 and float(row[6]) > 0 for row in rows.values())
    # The head's state: the full softmax's weight and AdamW moments (3x), Partial FC's weight and its own moments
    # (3x, plus a step count per row): 3,000 SKUs x 256-d.
    weight_mib = 3000 * 256 * 4 / 2**20
    assert 3 * weight_mib <= float(rows["full softmax, 3,000 SKUs"][7]) < 3.1 * weight_mib
    assert 3 * weight_mib <= float(rows["Partial FC, 3,000 SKUs"][7]) < 3.1 * weight_mib


def test_a_round_median_takes_each_ratio_within_its_round():
    def figures(ms: float) -> dict:
        return {"partial": True, "recipe_ms": ms, "step_ms": ms / 2, "p90_ms": ms, "draw_ms": 0.1, "peak_mib": ms}

    # A machine twice as fast in the second round and three times in the third: the ratio stays x1.5.
    rounds = [{1: figures(10.0 / speed), 2: figures(15.0 / speed)} for speed in (1, 2, 3)]
    merged = partial_fc.median_round(rounds, [1, 2])
    assert merged[2]["recipe_ms_ratio"] == merged[2]["step_ms_ratio"] == 1.5 and merged[1]["recipe_ms_ratio"] == 1.0
    assert merged[2]["recipe_ms"] == 7.5 and merged[2]["peak_mib"] == 15.0 and merged[2]["rounds"] == 3
