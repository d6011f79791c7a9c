"""The cached-features benchmark end to end at a small scale: real files, real processes, real head batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import cached_features
from components.config import ParamsError

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY = [
    "model.backbone=efficientnet-lite0",
    "model.pretrained=false",
    "model.embed_dim=16",
    "train.augment.cached_views=2",
    "train.augment.catalogue_views=3",
]


def run(tmp_path: Path, *extra: str) -> int:
    argv = [
        "--params",
        str(PARAMS),
        "--skus",
        "12",
        "--images-per-sku",
        "4",
        "--batches",
        "3",
        "--out",
        str(tmp_path / "cached_features.md"),
        "--work",
        str(tmp_path),
        *extra,
    ]
    return cached_features.main(argv + [arg for override in TINY for arg in ("--set", override)])


@pytest.mark.slow  # the benchmark end to end: pytest -m slow (README)
def test_every_way_runs_the_head_batches_in_its_own_process(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "cached_features.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    # Batches of 2 SKUs x 4 photos; each ranks against 4 of the 12 catalogue images.
    assert run(tmp_path, "--set", "train.sampler.batch_size=8", "--set", "train.sampler.anchor_sample=4") == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.cached_features")
    assert "--set train.sampler.anchor_sample=4" in parts.command
    assert parts.command.endswith("--skus 12 --images-per-sku 4 --batches 3")
    assert parts.setup[0].startswith("Features: 60 training rows (12 SKUs x 4 photos + 1 catalogue image)")
    assert "`train.sampler.anchor_sample` 4 in the default way" in parts.setup[1]
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    table = table_rows(parts.headline)
    assert set(table) == set(cached_features.WAYS)
    baseline, all_anchors = table[cached_features.BASELINE], table[cached_features.MAPPED_ALL_ANCHORS]
    sampled = table[cached_features.MAPPED]
    assert baseline[6] == all_anchors[6]  # the same losses: how the features are held changes nothing learned
    assert sampled[6] != baseline[6]  # sampled anchors are a different loss
    assert baseline[7] == "×1.00"
    assert not any(p.name != "cached_features.md" for p in tmp_path.iterdir())  # the features folder is removed


def test_bad_arguments_and_bad_params_are_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--skus", "1")
    assert "--skus must be at least 2" in capsys.readouterr().err
    with pytest.raises(ParamsError, match="train.sampler.images_per_sku"):
        run(tmp_path, "--set", "train.sampler.images_per_sku=0")
    assert list(tmp_path.iterdir()) == []  # no results file, no features folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_measuring_process_says_which_way_and_why(tmp_path):
    with pytest.raises(
        RuntimeError,
        match=r"(?s)read whole into memory, all anchors \(before\): the measuring process failed.*"
        r"torch sees no CUDA device",
    ):
        run(tmp_path, "--set", "train.device=cuda")
    assert list(tmp_path.iterdir()) == []  # no half-written results file; the features folder is removed
