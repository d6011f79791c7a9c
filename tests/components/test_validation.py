"""The GX validation checkpoint on small synthetic datasets built in tmp_path (real GX, real files)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import ValidationParams
from components.validation import (
    DataValidationError,
    ValidationReport,
    compute_image_facts,
    raise_for_failures,
    validate_dataset,
)

SKUS = ["apple", "milk", "soda"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> str:
    """Noise, so no two images share bytes unless a test copies one on purpose."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def make_dataset(root: Path, skus: list[str] = SKUS, train_per_sku: int = 2, val_per_sku: int = 1) -> pd.DataFrame:
    """A clean manifest: one catalogue PNG per SKU, JPEG queries in train and val."""
    rows = []
    seed = 0
    for sku in skus:
        seed += 1
        rows.append((write_image(root / "catalogue" / f"{sku}.png", seed), sku, "catalogue", "catalogue"))
        for split, count in (("train", train_per_sku), ("val", val_per_sku)):
            for i in range(count):
                seed += 1
                rows.append((write_image(root / split / sku / f"{i}.jpg", seed), sku, split, "query"))
    return pd.DataFrame(rows, columns=["image_path", "sku_id", "split", "role"])


def first_path(manifest: pd.DataFrame, split: str, sku: str) -> str:
    return manifest.loc[(manifest["split"] == split) & (manifest["sku_id"] == sku), "image_path"].iloc[0]


def add_row(manifest: pd.DataFrame, image_path: str | None, sku_id: str | None, split: str, role: str) -> pd.DataFrame:
    row = pd.DataFrame([[image_path, sku_id, split, role]], columns=manifest.columns)
    return pd.concat([manifest, row], ignore_index=True)


def found(report: ValidationReport) -> set[tuple[str, str | None, str | None]]:
    return {(f.rule, f.image_path, f.sku_id) for f in report.failures}


def test_clean_dataset_passes_and_builds_data_docs(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")

    report = validate_dataset(manifest, ValidationParams(), report_dir=tmp_path / "docs")

    assert report.success, report.to_markdown()
    assert report.failures == []
    assert (report.n_images, report.n_skus) == (len(manifest), len(SKUS))
    assert report.data_docs_path == (tmp_path / "docs" / "index.html").resolve()
    assert report.data_docs_path.is_file()
    raise_for_failures(report)  # no error
    assert json.loads(json.dumps(report.to_dict()))["success"] is True
    assert "passed" in report.to_markdown()


def test_image_facts_read_size_mode_hash_and_errors(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg", seed=1, size=(30, 20))
    truncated = tmp_path / "truncated.jpg"
    data = Path(write_image(tmp_path / "whole.jpg", seed=2)).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(3).bytes(500))
    manifest = pd.DataFrame({"image_path": [good, str(truncated), str(corrupt), str(tmp_path / "missing.png"), None]})

    facts = compute_image_facts(manifest, max_workers=2)

    assert list(facts.index) == list(manifest.index)
    assert facts.loc[0, ["exists", "decodes", "convertible_to_rgb", "width", "height", "mode"]].tolist() == [
        True,
        True,
        True,
        30,
        20,
        "RGB",
    ]
    assert facts.loc[0, "content_sha256"] == hashlib.sha256(Path(good).read_bytes()).hexdigest()
    assert pd.isna(facts.loc[0, "error"])
    assert facts["exists"].tolist() == [True, True, True, False, False]
    assert facts["decodes"].tolist() == [True, False, False, False, False]
    assert "truncated" in facts.loc[1, "error"]
    assert facts.loc[2, "error"] == "not an image format Pillow recognises"
    assert facts.loc[3, "error"] == "no such file"
    assert pd.isna(facts.loc[3, "content_sha256"]) and pd.isna(facts.loc[3, "width"])


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ValidationReport, dict[str, str]]:
    """One dataset with one planted fault of each kind, validated once for the tests below."""
    root = tmp_path_factory.mktemp("planted")
    manifest = make_dataset(root)
    paths: dict[str, str] = {}

    paths["corrupt"] = str(root / "train" / "apple" / "corrupt.jpg")
    Path(paths["corrupt"]).write_bytes(np.random.default_rng(7).bytes(2000))
    manifest = add_row(manifest, paths["corrupt"], "apple", "train", "query")

    paths["truncated"] = str(root / "train" / "milk" / "truncated.jpg")
    data = Path(write_image(root / "scratch" / "whole.jpg", seed=100)).read_bytes()
    Path(paths["truncated"]).write_bytes(data[: len(data) // 2])
    manifest = add_row(manifest, paths["truncated"], "milk", "train", "query")

    # A train photo copied into val under another name: the same picture on both sides.
    paths["leaked_train"] = first_path(manifest, "train", "soda")
    paths["leaked_val"] = str(root / "val" / "soda" / "copy.jpg")
    shutil.copyfile(paths["leaked_train"], paths["leaked_val"])
    manifest = add_row(manifest, paths["leaked_val"], "soda", "val", "query")

    # A SKU with query images but no catalogue image.
    for split in ("train", "val"):
        bread = write_image(root / split / "bread" / "0.jpg", seed=200 + len(split))
        manifest = add_row(manifest, bread, "bread", split, "query")

    paths["small"] = write_image(root / "train" / "apple" / "small.png", seed=300, size=(16, 16))
    manifest = add_row(manifest, paths["small"], "apple", "train", "query")

    paths["duplicated"] = first_path(manifest, "val", "milk")
    manifest = add_row(manifest, paths["duplicated"], "milk", "val", "query")

    paths["no_sku"] = write_image(root / "train" / "unknown.jpg", seed=400)
    manifest = add_row(manifest, paths["no_sku"], None, "train", "query")
    paths["blank_sku"] = write_image(root / "train" / "blank.jpg", seed=401)
    manifest = add_row(manifest, paths["blank_sku"], "  ", "train", "query")

    paths["bad_role"] = write_image(root / "train" / "apple" / "bad_role.jpg", seed=500)
    manifest = add_row(manifest, paths["bad_role"], "apple", "train", "gallery")

    paths["bad_split"] = write_image(root / "val set" / "apple" / "0.jpg", seed=600)
    manifest = add_row(manifest, paths["bad_split"], "apple", "val set", "query")

    paths["missing"] = str(root / "train" / "milk" / "missing.jpg")
    manifest = add_row(manifest, paths["missing"], "milk", "train", "query")

    return validate_dataset(manifest, ValidationParams()), paths


def test_planted_faults_are_each_reported_and_nothing_else(planted) -> None:
    report, paths = planted
    expected = {
        ("image_decodes", paths["corrupt"], "apple"),
        ("image_decodes", paths["truncated"], "milk"),
        ("no_cross_split_duplicate", paths["leaked_train"], "soda"),
        ("no_cross_split_duplicate", paths["leaked_val"], "soda"),
        ("catalogue_image_present", None, "bread"),
        ("min_width", paths["small"], "apple"),
        ("min_height", paths["small"], "apple"),
        ("unique_image_path", paths["duplicated"], "milk"),
        ("sku_id_present", paths["no_sku"], None),
        ("sku_id_present", paths["blank_sku"], None),
        ("role_valid", paths["bad_role"], "apple"),
        ("split_valid", paths["bad_split"], "apple"),
        ("image_exists", paths["missing"], "milk"),
    }

    assert not report.success
    assert found(report) == expected
    # Both rows of the duplicated path are reported; the SKU rule once, not once per row.
    assert sum(f.rule == "unique_image_path" for f in report.failures) == 2
    assert sum(f.rule == "catalogue_image_present" for f in report.failures) == 1


def test_failure_details_explain_the_fault(planted) -> None:
    report, paths = planted
    detail = {(f.rule, f.image_path): f.detail for f in report.failures}

    assert "truncated" in detail["image_decodes", paths["truncated"]]
    leaked_train, leaked_val = paths["leaked_train"], paths["leaked_val"]
    assert detail["no_cross_split_duplicate", leaked_val] == f"same content as {leaked_train} (split train)"
    assert detail["no_cross_split_duplicate", leaked_train] == f"same content as {leaked_val} (split val)"
    assert detail["min_width", paths["small"]] == "width 16 px is below the minimum 32"
    assert detail["unique_image_path", paths["duplicated"]] == "listed 2 times in the manifest"
    assert detail["role_valid", paths["bad_role"]] == "role 'gallery' is not one of ['catalogue', 'query']"
    assert detail["catalogue_image_present", None] == "no catalogue image"


def test_raise_for_failures_names_every_rule_and_row(planted) -> None:
    report, paths = planted

    with pytest.raises(DataValidationError) as caught:
        raise_for_failures(report)

    assert caught.value.report is report
    message = str(caught.value)
    for failure in report.failures:
        assert failure.rule in message
    for path in paths.values():
        assert path in message
    assert "SKU bread" in message


def test_report_renders_markdown_and_json(planted) -> None:
    report, paths = planted

    markdown = report.to_markdown()
    as_dict = json.loads(json.dumps(report.to_dict()))

    assert "FAILED" in markdown and "### `image_decodes` (2)" in markdown and paths["truncated"] in markdown
    assert as_dict["failure_counts"]["sku_id_present"] == 2
    assert len(as_dict["failures"]) == len(report.failures)


def test_min_images_per_sku_counts_query_images(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, train_per_sku=2, val_per_sku=1)
    # Only a catalogue image: no query image at all.
    tea = write_image(tmp_path / "catalogue" / "tea.png", seed=900)
    manifest = add_row(manifest, tea, "tea", "catalogue", "catalogue")

    assert found(validate_dataset(manifest, ValidationParams())) == {("min_images_per_sku", None, "tea")}
    strict = validate_dataset(manifest, ValidationParams(min_images_per_sku=4))
    assert found(strict) == {("min_images_per_sku", None, sku) for sku in [*SKUS, "tea"]}
    assert strict.failures[0].detail == "3 query images, fewer than the 4 required"


def test_split_and_catalogue_rules_follow_params(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    manifest = manifest[~((manifest["role"] == "catalogue") & (manifest["sku_id"] == "milk"))]
    val_rows = manifest.loc[manifest["split"] == "val", ["image_path", "sku_id"]].itertuples(index=False)

    report = validate_dataset(
        manifest, ValidationParams(allowed_splits=["catalogue", "train"], require_catalogue_image=False)
    )

    assert found(report) == {("split_valid", path, sku) for path, sku in val_rows}


def test_error_message_lists_twenty_rows_per_rule_then_counts(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    for i in range(25):
        manifest = add_row(manifest, str(tmp_path / f"gone-{i:02d}.jpg"), "apple", "train", "query")

    with pytest.raises(DataValidationError) as caught:
        raise_for_failures(validate_dataset(manifest, ValidationParams()))

    message = str(caught.value)
    assert "image_exists (25):" in message
    assert "gone-19.jpg" in message and "gone-20.jpg" not in message
    assert "... and 5 more" in message
