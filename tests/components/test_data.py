"""Reading every supported layout into the manifest, its errors, and the data version."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data import (
    CATALOGUE_SPLIT,
    MANIFEST_COLUMNS,
    DatasetError,
    data_version,
    detect_layout,
    load_manifest,
    load_rgb,
    select,
    split_names,
)

SKU_NAMES = sorted(["Red-Circle", "Green-Square", "Blue-Triangle", "Yellow-Stripes", "Magenta-Cross", "Cyan-Ring"])


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --- Grocery Store layout ---------------------------------------------------------------------


def test_grocery_layout_is_detected(synthetic_dataset, synthetic_skus):
    assert detect_layout(synthetic_dataset) == "grocery"
    assert sorted(spec.name for spec in synthetic_skus) == SKU_NAMES


def test_grocery_manifest_roles_splits_and_skus(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 6 * (1 + 8 + 4)
    assert split_names(manifest) == ["train", "val"]
    assert set(manifest["split"]) == {"catalogue", "train", "val"}

    catalogue = select(manifest, split=CATALOGUE_SPLIT)
    assert sorted(catalogue["sku_id"]) == SKU_NAMES  # one iconic image per SKU
    assert set(catalogue["role"]) == {"catalogue"}
    for row in catalogue.itertuples():
        assert (
            Path(row.image_path)
            == synthetic_dataset / "iconic-images-and-descriptions" / row.sku_id / f"{row.sku_id}_Iconic.jpg"
        )

    for split, per_sku in (("train", 8), ("val", 4)):
        rows = select(manifest, split=split)
        assert set(rows["role"]) == {"query"}
        assert rows["sku_id"].value_counts().to_dict() == {sku: per_sku for sku in SKU_NAMES}
        # Class ids in the split file map to the names in classes.csv: the file name says which SKU.
        assert all(Path(p).name.startswith(f"{sku}_") for p, sku in zip(rows["image_path"], rows["sku_id"]))

    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["image_path"])
    assert manifest["sku_id"].map(type).eq(str).all()


def test_grocery_manifest_resolves_a_relative_root(synthetic_dataset, monkeypatch):
    monkeypatch.chdir(synthetic_dataset.parent)
    manifest = load_manifest(synthetic_dataset.name)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["image_path"])


def test_max_images_per_sku_caps_query_splits_but_keeps_catalogue(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset, max_images_per_sku=2)
    counts = manifest.groupby(["split", "sku_id"]).size()
    assert (counts.loc["train"] == 2).all() and (counts.loc["val"] == 2).all()
    assert (counts.loc["catalogue"] == 1).all()
    assert len(manifest) == 6 * (1 + 2 + 2)
    # The first images in file order are kept.
    train = select(manifest, split="train")
    assert sorted(Path(p).name for p in train["image_path"] if "Red-Circle" in p) == [
        "Red-Circle_001.jpg",
        "Red-Circle_002.jpg",
    ]


def _grocery_copy(synthetic_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "grocery"
    shutil.copytree(synthetic_dataset, root)
    return root


def test_unknown_class_id_in_a_split_file_names_file_and_line(synthetic_dataset, tmp_path):
    root = _grocery_copy(synthetic_dataset, tmp_path)
    lines = (root / "val.txt").read_text().splitlines()
    lines[2] = "val/Red-Circle/Red-Circle_003.jpg, 99, 0"
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_manifest(root)
    message = str(info.value)
    assert f"{root / 'val.txt'}:3" in message
    assert "99" in message


def test_non_integer_class_id_names_file_and_line(synthetic_dataset, tmp_path):
    root = _grocery_copy(synthetic_dataset, tmp_path)
    (root / "test.txt").write_text("val/Red-Circle/Red-Circle_001.jpg, 0, 0\nval/x.jpg, red, 0\n")
    with pytest.raises(DatasetError, match=r"test\.txt:2: class id 'red'"):
        load_manifest(root)


def test_any_split_file_is_a_usable_split(synthetic_dataset, tmp_path):
    root = _grocery_copy(synthetic_dataset, tmp_path)
    (root / "holdout.txt").write_text("val/Red-Circle/Red-Circle_001.jpg, 0, 0\n")
    manifest = load_manifest(root)
    assert split_names(manifest) == ["holdout", "train", "val"]
    assert select(manifest, split="holdout")["sku_id"].tolist() == ["Red-Circle"]


# --- ImageFolder -------------------------------------------------------------------------------


def test_imagefolder_one_level_is_a_train_split(tmp_path):
    root = tmp_path / "folder"
    for i, sku in enumerate(["milk", "soda"]):
        for j in range(3):
            write_image(root / sku / f"{j}.png", seed=10 * i + j)
    (root / "milk" / "notes.txt").write_text("not an image")
    assert detect_layout(root) == "imagefolder"
    manifest = load_manifest(root)
    assert len(manifest) == 6
    assert set(manifest["split"]) == {"train"}
    assert set(manifest["role"]) == {"query"}
    assert manifest["sku_id"].value_counts().to_dict() == {"milk": 3, "soda": 3}
    assert all(Path(p).is_absolute() for p in manifest["image_path"])


def test_imagefolder_two_levels_with_a_catalogue_split(tmp_path):
    root = tmp_path / "folder"
    seed = 0
    for split, count in (("catalogue", 1), ("train", 2), ("test", 1)):
        for sku in ("milk", "soda", "tea"):
            for j in range(count):
                seed += 1
                write_image(root / split / sku / f"{j}.jpg", seed)
    manifest = load_manifest(root)
    assert len(manifest) == 3 * 4
    assert split_names(manifest) == ["test", "train"]
    catalogue = select(manifest, split="catalogue")
    assert sorted(catalogue["sku_id"]) == ["milk", "soda", "tea"]
    assert set(catalogue["role"]) == {"catalogue"}
    assert set(select(manifest, split="train")["role"]) == {"query"}
    assert select(manifest, role="catalogue").equals(catalogue)


def test_empty_imagefolder_is_an_error(tmp_path):
    root = tmp_path / "folder"
    (root / "milk").mkdir(parents=True)
    (root / "soda").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_manifest(root)


def test_empty_directory_matches_no_layout(tmp_path):
    with pytest.raises(DatasetError, match="matches no known layout"):
        load_manifest(tmp_path)


# --- Manifest files ----------------------------------------------------------------------------


def _manifest_frame(root: Path) -> pd.DataFrame:
    rows = []
    for i, sku in enumerate(["milk", "soda"]):
        write_image(root / "images" / f"{sku}-cat.jpg", 100 + i)
        rows.append((f"images/{sku}-cat.jpg", sku, "catalogue", "catalogue"))
        for j in range(2):
            write_image(root / "images" / f"{sku}-{j}.jpg", 10 * i + j)
            rows.append((f"images/{sku}-{j}.jpg", sku, "train", "query"))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest_file_with_relative_paths(tmp_path, suffix):
    frame = _manifest_frame(tmp_path / "data")
    # An extra column is dropped; columns may come in any order.
    frame = frame.assign(note="x")[["note", "role", "split", "sku_id", "image_path"]]
    path = tmp_path / "data" / f"manifest.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path, index=False)

    assert detect_layout(path) == "manifest"
    manifest = load_manifest(path)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 6
    for row in manifest.itertuples():
        assert Path(row.image_path).is_absolute() and Path(row.image_path).is_file()
        assert Path(row.image_path).parent == (tmp_path / "data" / "images").resolve()
    assert select(manifest, role="catalogue")["sku_id"].tolist() == ["milk", "soda"]
    assert load_rgb(manifest["image_path"][0]).mode == "RGB"


def test_manifest_keeps_absolute_paths(tmp_path):
    frame = _manifest_frame(tmp_path / "data")
    frame["image_path"] = [str(tmp_path / "data" / p) for p in frame["image_path"]]
    frame.to_csv(tmp_path / "elsewhere.csv", index=False)
    manifest = load_manifest(tmp_path / "elsewhere.csv")
    assert manifest["image_path"].tolist() == frame["image_path"].tolist()


def test_manifest_lacking_a_column_is_an_error(tmp_path):
    frame = _manifest_frame(tmp_path / "data").drop(columns=["role"])
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match=r"lacks columns \['role'\]"):
        load_manifest(tmp_path / "manifest.csv")


def test_unreadable_manifest_is_an_error(tmp_path):
    (tmp_path / "manifest.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="cannot read manifest"):
        load_manifest(tmp_path / "manifest.parquet")


def test_csv_manifest_keeps_sku_ids_verbatim(tmp_path):
    frame = _manifest_frame(tmp_path / "data")
    frame["sku_id"] = frame["sku_id"].map({"milk": "00123", "soda": "0456"})
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    manifest = load_manifest(tmp_path / "manifest.csv")
    assert sorted(set(manifest["sku_id"])) == ["00123", "0456"]


# --- errors and helpers ------------------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="does not exist"):
        load_manifest(tmp_path / "nowhere", layout="grocery")


def test_unknown_layout_is_an_error(synthetic_dataset):
    with pytest.raises(DatasetError, match="unknown layout"):
        load_manifest(synthetic_dataset, layout="coco")


def test_non_manifest_file_is_an_error(tmp_path):
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a CSV or Parquet"):
        load_manifest(tmp_path / "data.json")


def test_select_missing_split_is_an_error(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset)
    with pytest.raises(DatasetError) as info:
        select(manifest, split="test")
    assert "'test'" in str(info.value) and "train" in str(info.value)


def test_select_filters_and_reindexes(synthetic_dataset):
    manifest = load_manifest(synthetic_dataset)
    rows = select(manifest, split="val", role="query")
    assert len(rows) == 24 and list(rows.index) == list(range(24))
    assert select(manifest, split="val", role="catalogue").empty


def test_data_version_is_stable_and_content_sensitive(synthetic_dataset, tmp_path):
    root = _grocery_copy(synthetic_dataset, tmp_path)
    version = data_version(root)
    assert isinstance(version, str) and version.endswith(".dir")  # DVC's hash of a directory
    assert data_version(root) == version
    assert data_version(synthetic_dataset) == version  # same content, other place

    image = root / "train" / "Red-Circle" / "Red-Circle_001.jpg"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    changed = data_version(root)
    assert changed != version
    assert data_version(root) == changed


def test_data_version_of_missing_path_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data_version(tmp_path / "nowhere")
