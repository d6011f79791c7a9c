"""Datasets: read any supported layout into one manifest, version it, and feed it to torch.

The manifest is the one contract every later stage reads: a table with columns
``image_path`` (absolute), ``sku_id`` (str), ``split`` (str) and ``role``
(``catalogue`` or ``query``). Three layouts are read out of the box:

- Grocery Store: ``classes.csv`` (fine class id, name, iconic image path) plus any number of
  ``<split>.txt`` files with lines ``path, fine_id, coarse_id``. Iconic images become the
  ``catalogue`` split; every ``<split>.txt`` becomes a query split of that name.
- ImageFolder: ``root/<sku>/<image>`` (one split, ``train``) or
  ``root/<split>/<sku>/<image>``, where a split folder named ``catalogue`` holds catalogue images.
- A manifest file (CSV or Parquet) with the four columns; relative paths are resolved
  against the file's folder.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

LOGGER = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_path", "sku_id", "split", "role"]
CATALOGUE_SPLIT = "catalogue"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that cannot be read into a manifest; the message names the file and line."""


def detect_layout(root: Path) -> str:
    """Tell which supported layout ``root`` is in.

    Raises:
        DatasetError: the path does not exist or matches no layout.
    """
    if not root.exists():
        raise DatasetError(f"dataset path {root} does not exist")
    if root.is_file():
        if root.suffix.lower() in {".csv", ".parquet", ".pq"}:
            return "manifest"
        raise DatasetError(f"{root} is a file but not a CSV or Parquet manifest")
    if (root / "classes.csv").exists() and any(root.glob("*.txt")):
        return "grocery"
    if any(p.is_dir() for p in root.iterdir()):
        return "imagefolder"
    raise DatasetError(
        f"{root} matches no known layout: expected classes.csv + <split>.txt (Grocery Store), "
        "<sku>/<image> folders (ImageFolder) or a .csv/.parquet manifest"
    )


def _read_grocery(root: Path) -> pd.DataFrame:
    classes_path = root / "classes.csv"
    names_by_id: dict[int, str] = {}
    rows: list[dict[str, str]] = []
    with classes_path.open(newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # header
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) < 5:
                raise DatasetError(f"{classes_path}:{line_no}: expected >= 5 columns, got {len(fields)}")
            name, fine_id, iconic = fields[0].strip(), fields[1].strip(), fields[4].strip()
            try:
                names_by_id[int(fine_id)] = name
            except ValueError as err:
                raise DatasetError(f"{classes_path}:{line_no}: class id {fine_id!r} is not an integer") from err
            if iconic:
                rows.append(
                    {
                        "image_path": str(root / iconic.lstrip("/")),
                        "sku_id": name,
                        "split": CATALOGUE_SPLIT,
                        "role": "catalogue",
                    }
                )
    for split_file in sorted(root.glob("*.txt")):
        split = split_file.stem
        for line_no, line in enumerate(split_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) < 2:
                raise DatasetError(f"{split_file}:{line_no}: expected 'path, fine_id, coarse_id', got {line!r}")
            try:
                fine_id = int(fields[1])
            except ValueError as err:
                raise DatasetError(f"{split_file}:{line_no}: class id {fields[1]!r} is not an integer") from err
            if fine_id not in names_by_id:
                raise DatasetError(f"{split_file}:{line_no}: class id {fine_id} is not in {classes_path.name}")
            rows.append(
                {
                    "image_path": str(root / fields[0]),
                    "sku_id": names_by_id[fine_id],
                    "split": split,
                    "role": "query",
                }
            )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_imagefolder(root: Path) -> pd.DataFrame:
    rows = []
    top = sorted(p for p in root.iterdir() if p.is_dir())
    # Two levels (root/<split>/<sku>/<image>) when the top folders hold folders, not images.
    nested = all(not _images_under(d) and any(c.is_dir() for c in d.iterdir()) for d in top)
    groups = (
        [(d.name, sku) for d in top for sku in sorted(c for c in d.iterdir() if c.is_dir())]
        if nested
        else [("train", d) for d in top]
    )
    for split, sku_dir in groups:
        role = "catalogue" if split == CATALOGUE_SPLIT else "query"
        for image in _images_under(sku_dir):
            rows.append({"image_path": str(image), "sku_id": sku_dir.name, "split": split, "role": role})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _read_manifest_file(path: Path) -> pd.DataFrame:
    try:
        frame = (
            pd.read_parquet(path)
            if path.suffix.lower() in {".parquet", ".pq"}
            # SKU ids are identifiers ("00123" is not 123): read every cell as text.
            else pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        )
    except Exception as err:  # pandas raises many types for unreadable files
        raise DatasetError(f"cannot read manifest {path}: {err}") from err
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"manifest {path} lacks columns {missing}; expected {MANIFEST_COLUMNS}")
    frame = frame[MANIFEST_COLUMNS].copy()
    # Keep missing values missing (validation reports them) but make the rest strings.
    for column in MANIFEST_COLUMNS:
        frame[column] = frame[column].map(lambda v: None if pd.isna(v) else str(v))
    frame["image_path"] = frame["image_path"].map(
        lambda p: p if p is None or Path(p).is_absolute() else str(path.parent / p)
    )
    return frame


def load_manifest(root: str | Path, layout: str = "auto", max_images_per_sku: int | None = None) -> pd.DataFrame:
    """Read a dataset in any supported layout into the manifest table.

    Args:
        root: dataset folder, or a manifest file.
        layout: ``auto`` to detect, or one of ``grocery``, ``imagefolder``, ``manifest``.
        max_images_per_sku: keep at most this many images per SKU in each split (the first
            ones in file order), for quick runs; catalogue images are always kept.

    Returns:
        A DataFrame with columns ``image_path, sku_id, split, role``.

    Raises:
        DatasetError: unreadable or empty dataset.
    """
    root = Path(root).expanduser().resolve()
    layout = detect_layout(root) if layout == "auto" else layout
    readers: dict[str, Callable[[Path], pd.DataFrame]] = {
        "grocery": _read_grocery,
        "imagefolder": _read_imagefolder,
        "manifest": _read_manifest_file,
    }
    if layout not in readers:
        raise DatasetError(f"unknown layout {layout!r}; expected one of {sorted(readers)}")
    if not root.exists():
        raise DatasetError(f"dataset path {root} does not exist")
    frame = readers[layout](root)
    if frame.empty:
        raise DatasetError(f"dataset {root} ({layout} layout) holds no images")
    if max_images_per_sku is not None:
        queries = frame[frame["role"] == "query"].groupby(["split", "sku_id"], sort=False).head(max_images_per_sku)
        frame = pd.concat([frame[frame["role"] == "catalogue"], queries]).sort_index()
    LOGGER.info("read %d images of %d SKUs from %s (%s layout)", len(frame), frame["sku_id"].nunique(), root, layout)
    return frame.reset_index(drop=True)


def split_names(manifest: pd.DataFrame) -> list[str]:
    """The query splits the manifest holds (every split but the catalogue)."""
    return sorted(s for s in manifest["split"].dropna().unique() if s != CATALOGUE_SPLIT)


def select(manifest: pd.DataFrame, *, split: str | None = None, role: str | None = None) -> pd.DataFrame:
    """Rows of one split and/or role, with a clear error when the split does not exist."""
    rows = manifest
    if split is not None:
        if split not in set(manifest["split"]):
            raise DatasetError(f"split {split!r} is not in the dataset; it has {sorted(set(manifest['split']))}")
        rows = rows[rows["split"] == split]
    if role is not None:
        rows = rows[rows["role"] == role]
    return rows.reset_index(drop=True)


def data_version(root: str | Path) -> str:
    """The DVC hash of a dataset: what ``dvc add`` would record for it.

    Hashed with DVC's own hashing (dvc-data) every time, without copying anything: a
    ``.dvc`` file may be stale when the folder changed after ``dvc add``, the files never are.
    For this dataset's 3,000 images it takes under half a second.
    """
    root = Path(root).expanduser().resolve()
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not root.exists():
        raise DatasetError(f"dataset path {root} does not exist")
    filesystem = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(filesystem, scratch), str(root), filesystem, "md5", dry_run=True)
    return str(obj.hash_info.value)


def load_rgb(path: str | Path):
    """Open an image file as RGB, fully decoded (so truncation surfaces here, not later)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")
