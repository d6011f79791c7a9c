"""The batch-size benchmark end to end on a small untrained EfficientNet-Lite0: real embeddings, real timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import batch_size

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY = [
    "model.backbone=efficientnet-lite0",
    "model.pretrained=false",
    "model.image_size=32",
    "model.embed_dim=16",
    "evaluate.batch_size=3",
]


def run(out: Path, *args: str) -> int:
    return batch_size.main(
        ["--params", str(PARAMS), "--out", str(out), *args, *[arg for override in TINY for arg in ("--set", override)]]
    )


def test_every_workload_is_timed_at_every_size_with_the_baseline_added(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "batch_size.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    assert run(out, "--batch-sizes", "1", "2", "--images", "5", "--repeats", "2") == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.batch_size")
    assert "--batch-sizes 1 2 3 --images 5 --repeats 2" in parts.command
    assert "Baseline: batches of 3 (`evaluate.batch_size`)" in parts.setup[-1]
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    sections = text.split("## ")[1:-1]  # the three workloads; the last section is the notes
    assert [section.splitlines()[0] for section in sections] == [
        "gallery (image + mirror, 2 passes)",
        "queries (every zoom + mirror, 6 passes)",
        "backbone features (1 pass, the feature cache)",
    ]
    for section in sections:
        rows = table_rows(section)
        # The sizes asked for, and the baseline's, which was not among them.
        assert list(rows) == ["1", "2", "3 (baseline)"]
        assert rows["3 (baseline)"][1:] == ["×1.00", "0.0e+00"]
        for ms, ratio, difference in rows.values():
            assert float(ms) > 0 and float(ratio.removeprefix("×")) > 0
            assert float(difference) < 1e-4  # the batch changes speed, not embeddings
    # The headline: a row per batch size, a column per workload, each its table's ratio to the baseline.
    headline = table_rows(parts.headline)
    workloads = [section.splitlines()[0] for section in sections]
    assert parts.headline.splitlines()[0] == "| batch size | " + " | ".join(workloads) + " |"
    assert list(headline) == ["1", "2", "3 (baseline)"]
    for column, section in enumerate(sections):
        assert {size: cells[column] for size, cells in headline.items()} == {
            size: cells[1] for size, cells in table_rows(section).items()
        }


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--images", "0"], ["--batch-sizes", "4", "0"]])
def test_counts_below_one_are_refused(tmp_path, args):
    with pytest.raises(SystemExit):
        run(tmp_path / "out.md", *args)
    assert not (tmp_path / "out.md").exists()
