"""The rules data validation checks, as Great Expectations expectations over one table.

Rules, by the names reports use:

- ``image_exists``: the file is there and readable.
- ``image_decodes``: Pillow opens and fully loads it, so a truncated file fails.
- ``image_convertible_to_rgb``: it converts to RGB, as training and serving do.
- ``min_width`` / ``min_height``: at least ``min_width`` x ``min_height`` pixels.
- ``unique_image_path``: no image is listed twice.
- ``sku_id_present``: every row names its SKU (blank counts as missing).
- ``split_valid``: a split from ``allowed_splits``, or a plain ``[A-Za-z0-9_-]+`` name.
- ``role_valid``: a role from ``allowed_roles``.
- ``min_images_per_sku``: each SKU has at least ``min_images_per_sku`` query images.
- ``catalogue_image_present``: each SKU has a catalogue image, when required.
- ``no_cross_split_duplicate``: identical file content never appears in two splits.

The two SKU rules report once per SKU, with ``image_path`` None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from components.config import ValidationParams

SPLIT_PATTERN = r"^[A-Za-z0-9_-]+$"


def checks_table(manifest: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """The table the expectations run on: manifest, facts and derived per-SKU columns.

    Nulls mean "does not apply": GX skips nulls in column-value expectations, so a missing
    file fails ``image_exists`` only, not also every rule that needs its pixels.
    """
    checks = manifest.join(facts)
    checks.insert(0, "row", checks.index)
    sku = checks["sku_id"]
    # A blank sku_id is as useless as a null one; make it null so one expectation covers both.
    checks["sku_id"] = sku.where(sku.notna() & sku.astype(str).str.strip().ne(""), None)
    checks["decodes"] = facts["decodes"].where(facts["exists"], None)
    checks["convertible_to_rgb"] = facts["convertible_to_rgb"].where(facts["decodes"], None)
    # Rows without a SKU drop out of these groups (null counts); sku_id_present reports them.
    checks["sku_query_images"] = checks["role"].eq("query").groupby(checks["sku_id"]).transform("sum")
    checks["sku_has_catalogue_image"] = checks["role"].eq("catalogue").groupby(checks["sku_id"]).transform("any")
    checks["content_splits"] = checks["split"].groupby(checks["content_sha256"]).transform("nunique")
    return checks


@dataclass(frozen=True)
class Rule:
    """A named rule: the expectations that check it and how to word one failing row."""

    name: str
    expectations: list[Any]
    describe: Callable[[pd.Series], str]
    # Report once per SKU (image_path None) instead of once per row of that SKU.
    per_sku: bool = False

    def __post_init__(self) -> None:
        # Each GX result carries its expectation's meta, which is how a failure finds its rule.
        for expectation in self.expectations:
            expectation.meta = {"rule": self.name}


def validation_rules(params: ValidationParams, checks: pd.DataFrame) -> list[Rule]:
    """Every rule ``params`` asks for, over the table :func:`checks_table` made."""
    import great_expectations.expectations as gxe

    def file_error(row: pd.Series) -> str:
        return str(row["error"])

    def other_copies(row: pd.Series) -> str:
        same = checks[checks["content_sha256"].eq(row["content_sha256"]) & checks["split"].ne(row["split"])]
        return "same content as " + ", ".join(f"{p} (split {s})" for p, s in zip(same["image_path"], same["split"]))

    path_counts = checks["image_path"].value_counts()

    rules = _image_rules(params, file_error) + [
        Rule(
            "unique_image_path",
            [gxe.ExpectColumnValuesToBeUnique(column="image_path")],
            lambda row: f"listed {path_counts[row['image_path']]} times in the manifest",
        ),
        Rule(
            "sku_id_present",
            [gxe.ExpectColumnValuesToNotBeNull(column="sku_id")],
            lambda row: "no sku_id",
        ),
        _split_rule(params),
        Rule(
            "role_valid",
            [
                gxe.ExpectColumnValuesToNotBeNull(column="role"),
                gxe.ExpectColumnValuesToBeInSet(column="role", value_set=params.allowed_roles),
            ],
            lambda row: (
                "no role" if pd.isna(row["role"]) else f"role {row['role']!r} is not one of {params.allowed_roles}"
            ),
        ),
        Rule(
            "min_images_per_sku",
            [gxe.ExpectColumnValuesToBeBetween(column="sku_query_images", min_value=params.min_images_per_sku)],
            lambda row: (
                f"{int(row['sku_query_images'])} query images, fewer than the {params.min_images_per_sku} required"
            ),
            per_sku=True,
        ),
    ]
    if params.require_catalogue_image:
        rules.append(
            Rule(
                "catalogue_image_present",
                [gxe.ExpectColumnValuesToBeInSet(column="sku_has_catalogue_image", value_set=[True])],
                lambda row: "no catalogue image",
                per_sku=True,
            )
        )
    rules.append(
        Rule(
            "no_cross_split_duplicate",
            [gxe.ExpectColumnValuesToBeBetween(column="content_splits", max_value=1)],
            other_copies,
        )
    )
    return rules


def _image_rules(params: ValidationParams, file_error: Callable[[pd.Series], str]) -> list[Rule]:
    """The rules on each image file: it exists, decodes, converts to RGB and is large enough."""
    import great_expectations.expectations as gxe

    return [
        Rule("image_exists", [gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True])], file_error),
        Rule("image_decodes", [gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True])], file_error),
        Rule(
            "image_convertible_to_rgb",
            [gxe.ExpectColumnValuesToBeInSet(column="convertible_to_rgb", value_set=[True])],
            file_error,
        ),
        Rule(
            "min_width",
            [gxe.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_width)],
            lambda row: f"width {row['width']} px is below the minimum {params.min_width}",
        ),
        Rule(
            "min_height",
            [gxe.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_height)],
            lambda row: f"height {row['height']} px is below the minimum {params.min_height}",
        ),
    ]


def _split_rule(params: ValidationParams) -> Rule:
    """Every row names a split: one of ``allowed_splits``, or a plain name when none are given."""
    import great_expectations.expectations as gxe

    if params.allowed_splits is None:
        split_expectation = gxe.ExpectColumnValuesToMatchRegex(column="split", regex=SPLIT_PATTERN)
        split_rule = f"does not match {SPLIT_PATTERN}"
    else:
        split_expectation = gxe.ExpectColumnValuesToBeInSet(column="split", value_set=params.allowed_splits)
        split_rule = f"is not one of {params.allowed_splits}"
    # Null values skip the set and regex checks, hence the not-null expectation beside them.
    return Rule(
        "split_valid",
        [gxe.ExpectColumnValuesToNotBeNull(column="split"), split_expectation],
        lambda row: "no split" if pd.isna(row["split"]) else f"split {row['split']!r} {split_rule}",
    )
