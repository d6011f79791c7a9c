"""The backbone benchmark end to end on the synthetic dataset and a tiny CLIP: real embeddings, real steps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks import backbones
from components.config import load_params

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY = [
    "model.pretrained=false",
    "model.image_size=32",
    "model.embed_dim=16",
    "train.augment.image_size=null",
    "train.sampler.unfrozen_batch_size=12",
    "evaluate.batch_size=3",
]


def run(out: Path, data: Path, *args: str) -> int:
    return backbones.main(
        [
            "--params",
            str(PARAMS),
            "--data",
            str(data),
            "--out",
            str(out),
            *args,
            *[arg for override in TINY for arg in ("--set", override)],
        ]
    )


def test_each_variant_is_timed_and_projected_against_the_baseline(
    tmp_path, synthetic_dataset, table_rows, results_file_parts
):
    from transformers import CLIPVisionConfig

    # A CLIP config only (the variants build random weights): small, with layers enough that
    # "the last 4" leaves some frozen.
    clip_config = tmp_path / "clip-config"
    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    ).save_pretrained(clip_config)
    out = tmp_path / "backbones.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    assert (
        run(
            out,
            synthetic_dataset,
            "--variants",
            "clip-b32",
            "clip-b32-last4",
            "--clip-config",
            str(clip_config),
            "--images",
            "3",
            "--steps",
            "2",
            "--repeats",
            "2",
        )
        == 0
    )
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.backbones")
    assert "device cpu" in text and str(clip_config) in parts.command
    assert "--variants lite0 clip-b32 clip-b32-last4 --images 3 --steps 2 --repeats 2" in parts.command
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    # The projected minutes are the headline; the unit times they come from follow.
    minutes, units = table_rows(parts.headline), table_rows(parts.rest.split("\n## Unit times\n")[1])
    labels = [backbones.VARIANTS[name][0] for name in ("lite0", "clip-b32", "clip-b32-last4")]
    assert list(units) == labels and list(minutes) == labels  # the baseline was added, first
    lite0, clip_all, clip_last4 = (units[label] for label in labels)
    assert lite0[-3:] == ["×1.00", "×1.00", "×1.00"]
    assert lite0[1] == "32 / 32" and clip_all[1] == "16 / 16"  # the tiny CLIP takes only its own size
    # Training the last stages only leaves most of the tower frozen.
    total, trained = clip_last4[0].removesuffix("M)").split("M (")
    assert float(trained) < float(total) and clip_all[0].split(" (")[0] == clip_last4[0].split(" (")[0]
    for row in units.values():
        assert all(float(cell) > 0 for cell in row[2:5])
    for row in minutes.values():
        caching, epochs, gates, train, _, evaluation, both = row
        assert float(train) == pytest.approx(float(caching) + float(epochs) + float(gates), abs=0.15)
        assert float(both) == pytest.approx(float(train) + float(evaluation), abs=0.15)


def gallery(folder: str, images: int) -> pd.DataFrame:
    return pd.DataFrame({"image_path": [f"{folder}/{number}.jpg" for number in range(images)]})


def test_recipe_counts_follow_the_params():
    params = load_params(PARAMS, [])  # 18 epochs, 10 on cached features, a gate evaluation every 2
    galleries = {"catalogue": gallery("iconic", 81), "nn": gallery("train", 2640)}
    counts = backbones.recipe_counts(
        params, rows=2721, catalogue=81, galleries=galleries, queries=296, steps_per_epoch=85
    )
    assert counts.features == 2721 * 2 + 81 * 15 + 296
    assert counts.backbone_steps == 8 * 85
    assert counts.gate_evaluations == 4 and counts.gate_gallery == 81  # epochs 12, 14, 16, 18; the catalogue
    assert counts.full_gallery == 81 + 2640
    every_third = load_params(PARAMS, ["train.schedule.eval_every_epochs=3"])
    assert backbones.recipe_counts(every_third, 2721, 81, galleries, 296, 85).gate_evaluations == 3  # 12, 15, 18 (last)
    units = backbones.UnitTimes(
        feature_s=0.01, gallery_s=0.02, query_s=0.06, step_s=1.5, steps_per_epoch=85, eval_px=224, train_px=192
    )
    minutes = backbones.projected_minutes(units, counts)
    assert minutes["backbone epochs"] == pytest.approx(680 * 1.5 / 60)
    assert minutes["gate evaluations"] == pytest.approx(4 * (81 * 0.02 + 296 * 0.06) / 60)
    assert minutes["train"] == pytest.approx(
        minutes["caching"] + minutes["backbone epochs"] + minutes["gate evaluations"]
    )


def test_a_recipe_without_cached_features_is_refused():
    params = load_params(PARAMS, ["train.schedule.frozen_stage=crops"])
    with pytest.raises(ValueError, match="frozen_stage='crops'"):
        backbones.recipe_counts(params, 10, 2, {"catalogue": gallery("iconic", 2)}, 4, 1)


@pytest.mark.parametrize("args", [["--images", "0"], ["--steps", "0"], ["--repeats", "0"], ["--variants", "resnet"]])
def test_bad_arguments_are_refused(tmp_path, synthetic_dataset, args):
    with pytest.raises(SystemExit):
        run(tmp_path / "out.md", synthetic_dataset, *args)
    assert not (tmp_path / "out.md").exists()
