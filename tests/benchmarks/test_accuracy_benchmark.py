"""The accuracy benchmark end to end on the synthetic dataset and the tiny CLIP: one real run."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import accuracy

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, tiny_clip_dir, synthetic_dataset) -> Path:
    out = tmp_path_factory.mktemp("bench") / "accuracy.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    overrides = [
        "model.backbone=hf-clip",
        f"model.hf_model_id={tiny_clip_dir}",
        "model.embed_dim=16",
        "model.image_size=16",
        "model.query_zooms=[1.0,0.8]",
        "train.augment.image_size=null",
        "train.schedule.epochs=3",
        "train.schedule.frozen_epochs=2",
        "train.sampler.batch_size=12",
        "train.sampler.images_per_sku=2",
        "train.sampler.unfrozen_batch_size=12",
        "train.schedule.lr=0.02",
    ]
    argv = ["--data", str(synthetic_dataset), "--queries", "val", "--params", str(PARAMS), "--out", str(out)]
    assert accuracy.main(argv + [arg for override in overrides for arg in ("--set", override)]) == 0
    return out


def rows(text: str) -> dict[str, list[float]]:
    table = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[1].replace(".", "").isdigit():
            table[cells[0]] = [float(cell) for cell in cells[1:]]
    return table


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_results_file_compares_zero_shot_with_the_fine_tuned_model(results_file, results_file_parts):
    text = results_file.read_text()
    parts = results_file_parts(text, "benchmarks.accuracy")
    # The comparison is the headline; the ablation rows come after how to read it.
    assert list(rows(parts.headline)) == ["zero-shot backbone", "fine-tuned (default recipe)"]
    assert "--queries val" in parts.command and "--set model.embed_dim=16" in parts.command
    assert any(line.startswith("Test time (every row):") and "query zooms [1.0, 0.8]" in line for line in parts.setup)
    assert "Fine-tuned vs zero-shot in this run: catalogue top-1 ×" in parts.rest
    assert set(rows(parts.rest.split("\n## Ablation")[1])) >= set(accuracy.INFERENCE_ABLATION)
    table = rows(text)
    assert text.endswith("## Notes (by hand)\n\n- kept across runs\n")  # hand-written notes survive a rerun
    # The fine-tuned row measures the trained model, not the backbone again (column 3: catalogue Δsim).
    assert table["fine-tuned (default recipe)"][3] > table["zero-shot backbone"][3] + 0.1


@pytest.mark.slow
def test_test_time_rows_re_evaluate_the_default_model_without_training(results_file):
    table = rows(results_file.read_text())
    default = table["fine-tuned (default recipe)"]
    for name in accuracy.INFERENCE_ABLATION:
        assert table[name][10] == 0.0  # no training
    # Without query zooms the same weights score differently (Δsim, column 4 and 9).
    plain = table["queries at zoom 1 only (model.query_zooms=[1.0])"]
    assert (plain[3], plain[8]) != (default[3], default[8])


@pytest.mark.parametrize("changes", [["train.schedule.epochs=4"], ["model.embed_dim=8"], ["data.train_split=val"]])
def test_a_test_time_row_that_changes_more_is_refused(changes):
    from components.config import load_params

    params = load_params(PARAMS)
    accuracy.check_inference_only(
        "fine", params, load_params(PARAMS, ["model.query_zooms=[1.0]", "model.flip_tta=false"])
    )
    with pytest.raises(ValueError, match="training run of its own"):
        accuracy.check_inference_only("sneaky", params, load_params(PARAMS, changes))
