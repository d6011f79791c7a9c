"""The decoded-image store benchmark end to end on the synthetic dataset: real processes, real steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import decoded_images

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY = [
    "model.backbone=efficientnet-lite0",
    "model.pretrained=false",
    "model.image_size=32",
    "model.embed_dim=16",
    "train.augment.image_size=null",
    "train.sampler.unfrozen_batch_size=12",
    "train.sampler.images_per_sku=2",
]


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_every_way_is_measured_in_its_own_process_against_the_kept_baseline(
    tmp_path, synthetic_dataset, table_rows, results_file_parts
):
    out = tmp_path / "decoded_images.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    argv = ["--data", str(synthetic_dataset), "--params", str(PARAMS), "--steps", "2", "--out", str(out)]
    assert decoded_images.main(argv + [arg for override in TINY for arg in ("--set", override)]) == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.decoded_images")
    assert f"--data {synthetic_dataset}" in parts.command and parts.command.endswith("--steps 2")
    assert "2 fine-tuning steps" in parts.setup[1]
    assert "keeping a million training images would take" in parts.rest
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    table = table_rows(parts.headline)
    assert set(table) == set(decoded_images.WAYS)
    images = int(table[decoded_images.BASELINE][0])
    assert images > 0  # the baseline keeps every image; the other ways keep none
    assert [int(row[0]) for name, row in table.items() if name != decoded_images.BASELINE] == [0, 0]
    assert table[decoded_images.BASELINE][6] == "×1.00"
    # Only the way with a loader worker has a worker process whose memory is counted.
    assert float(table["none kept, decoded by 1 loader worker"][4]) > 0
    assert float(table["none kept, decoded in the training loop"][4]) == 0


def test_a_failing_way_says_which_and_why(tmp_path, synthetic_dataset):
    import pytest

    argv = [
        "--data",
        str(synthetic_dataset / "missing"),
        "--params",
        str(PARAMS),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out.md"),
    ]
    with pytest.raises(RuntimeError, match="all decoded images kept .*the measuring process failed"):
        decoded_images.main(argv + [arg for override in TINY for arg in ("--set", override)])
    assert not (tmp_path / "out.md").exists()  # no half-written results file
