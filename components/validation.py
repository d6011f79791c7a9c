"""Data validation: a Great Expectations checkpoint over the manifest and the image files.

A broken dataset should stop the pipeline before training, not in the middle of it: a
truncated JPEG crashes epoch three, and a photo that sits both in the gallery and among the
queries inflates every accuracy number. So the manifest is joined with facts read from each
file (does it exist, does it decode fully, its size, its content hash), a few per-SKU counts
are derived in pandas, and a GX 1.x checkpoint runs one expectation per rule over that table.
The report names every failing image (or SKU), and the checkpoint can build GX data docs.

The rules, one per failure a report names, are in :mod:`components.validation_rules`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.config import ValidationParams
from components.data import MANIFEST_COLUMNS
from components.validation_rules import Rule, checks_table, validation_rules

LOGGER = logging.getLogger(__name__)

FACT_COLUMNS = ["exists", "decodes", "width", "height", "mode", "convertible_to_rgb", "content_sha256", "error"]
# A badly broken dataset can fail thousands of rows; error messages list this many per rule.
MAX_ROWS_PER_RULE = 20
_DOCS_SITE = "skumatch"
# GX names each failing row by these columns; "row" keeps duplicated or missing paths apart.
_INDEX_COLUMNS = ["row", "image_path"]


@dataclass(frozen=True)
class ValidationFailure:
    """One broken rule on one image, or on one SKU (then ``image_path`` is None)."""

    rule: str
    image_path: str | None
    sku_id: str | None
    detail: str


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`."""

    success: bool
    failures: list[ValidationFailure]
    n_images: int
    n_skus: int
    data_docs_path: Path | None = None

    def failures_by_rule(self) -> dict[str, list[ValidationFailure]]:
        """Failures grouped by rule, rules in the order the checkpoint ran them."""
        grouped: dict[str, list[ValidationFailure]] = {}
        for failure in self.failures:
            grouped.setdefault(failure.rule, []).append(failure)
        return grouped

    def to_markdown(self, max_rows_per_rule: int = 50) -> str:
        """A summary and one table of failures per rule, for a Prefect artifact or a console.

        Args:
            max_rows_per_rule: rows shown per rule; the rest are counted.
        """
        status = "passed" if self.success else f"FAILED ({len(self.failures)} failures)"
        lines = [f"## Data validation {status}", "", f"{self.n_images} images of {self.n_skus} SKUs."]
        if self.data_docs_path is not None:
            lines += ["", f"Great Expectations data docs: `{self.data_docs_path}`"]
        for rule, failures in self.failures_by_rule().items():
            lines += ["", f"### `{rule}` ({len(failures)})", "", "| image | SKU | detail |", "| --- | --- | --- |"]
            lines += [
                f"| {_cell(f.image_path)} | {_cell(f.sku_id)} | {_cell(f.detail)} |"
                for f in failures[:max_rows_per_rule]
            ]
            if len(failures) > max_rows_per_rule:
                lines += ["", f"... and {len(failures) - max_rows_per_rule} more."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, with failure counts per rule."""
        return {
            "success": self.success,
            "n_images": self.n_images,
            "n_skus": self.n_skus,
            "data_docs_path": None if self.data_docs_path is None else str(self.data_docs_path),
            "failure_counts": {rule: len(f) for rule, f in self.failures_by_rule().items()},
            "failures": [asdict(f) for f in self.failures],
        }


class DataValidationError(RuntimeError):
    """The dataset broke validation rules; ``report`` holds the full :class:`ValidationReport`.

    The message names every failing rule and, per rule, the first ``MAX_ROWS_PER_RULE``
    images or SKUs, then a count of the rest.
    """

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        grouped = report.failures_by_rule()
        lines = [
            f"data validation failed: {len(report.failures)} failures of {len(grouped)} rules "
            f"over {report.n_images} images of {report.n_skus} SKUs"
        ]
        for rule, failures in grouped.items():
            lines.append(f"{rule} ({len(failures)}):")
            for failure in failures[:MAX_ROWS_PER_RULE]:
                where = f"SKU {failure.sku_id}" if failure.image_path is None else failure.image_path
                if failure.image_path is not None and failure.sku_id is not None:
                    where += f" (SKU {failure.sku_id})"
                lines.append(f"  - {where}: {failure.detail}")
            if len(failures) > MAX_ROWS_PER_RULE:
                lines.append(f"  ... and {len(failures) - MAX_ROWS_PER_RULE} more")
        super().__init__("\n".join(lines))


def compute_image_facts(manifest: pd.DataFrame, max_workers: int = 4) -> pd.DataFrame:
    """Read every image of the manifest and record what it holds; never raises for a bad file.

    Args:
        manifest: a table with an ``image_path`` column.
        max_workers: threads reading and decoding images (Pillow and hashlib release the GIL).

    Returns:
        One row per manifest row, on the manifest's index, with columns ``exists`` (a readable
        file), ``decodes`` (opens and loads fully: a truncated file does not), ``width``,
        ``height``, ``mode`` (null when it does not decode), ``convertible_to_rgb``,
        ``content_sha256`` (of the file bytes; null when unreadable) and ``error`` (why it
        failed; null when nothing did).
    """
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        rows = list(pool.map(_image_facts, manifest["image_path"]))
    facts = pd.DataFrame(rows, index=manifest.index, columns=FACT_COLUMNS)
    return facts.astype(
        {"exists": bool, "decodes": bool, "convertible_to_rgb": bool, "width": "Int64", "height": "Int64"}
    )


def _image_facts(path: object) -> dict[str, Any]:
    facts: dict[str, Any] = {"exists": False, "decodes": False, "convertible_to_rgb": False}
    if not isinstance(path, str) or not path:
        facts["error"] = "the manifest row has no image_path"
        return facts
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        facts["error"] = "no such file"
        return facts
    except OSError as err:
        facts["error"] = f"cannot read the file: {err.strerror or err}"
        return facts
    facts["exists"] = True
    facts["content_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            # open() reads only the header; load() decodes every pixel, which is what fails on a
            # truncated file (with Pillow's default LOAD_TRUNCATED_IMAGES=False).
            image.load()
            facts.update(decodes=True, width=image.width, height=image.height, mode=image.mode)
            image.convert("RGB")
    except UnidentifiedImageError:
        facts["error"] = "not an image format Pillow recognises"
        return facts
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        stage = f"cannot convert mode {facts['mode']} to RGB" if facts["decodes"] else "does not decode"
        facts["error"] = f"{stage}: {err or type(err).__name__}"
        return facts
    facts["convertible_to_rgb"] = True
    return facts


def validate_dataset(
    manifest: pd.DataFrame, params: ValidationParams, report_dir: Path | None = None
) -> ValidationReport:
    """Check a dataset against the validation rules with a Great Expectations checkpoint.

    Args:
        manifest: the manifest table (``image_path, sku_id, split, role``).
        params: the rules' thresholds and allowed values.
        report_dir: when given, GX data docs (HTML) are built in this folder.

    Returns:
        The report; ``success`` is False when any rule failed, and ``failures`` names each
        failing image (or SKU).

    Raises:
        ValueError: the manifest lacks one of the four columns.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; expected {MANIFEST_COLUMNS}")
    start = time.perf_counter()
    manifest = manifest[MANIFEST_COLUMNS].reset_index(drop=True)
    checks = checks_table(manifest, compute_image_facts(manifest))
    LOGGER.info("read %d images in %.1fs", len(checks), time.perf_counter() - start)

    rules = validation_rules(params, checks)
    docs_dir = None if report_dir is None else Path(report_dir).expanduser().resolve()
    outcome = _run_checkpoint(checks, rules, docs_dir)
    report = ValidationReport(
        success=bool(outcome.success),
        failures=_failures(outcome, checks, rules),
        n_images=len(checks),
        n_skus=int(checks["sku_id"].nunique()),
        # The GX SiteBuilder writes its index page at the root of the site's folder.
        data_docs_path=None if docs_dir is None else docs_dir / "index.html",
    )
    counts = {rule: len(f) for rule, f in report.failures_by_rule().items()}
    LOGGER.log(
        logging.INFO if report.success else logging.WARNING,
        "validated %d images of %d SKUs in %.1fs: %s",
        report.n_images,
        report.n_skus,
        time.perf_counter() - start,
        "all rules pass" if report.success else f"failures per rule {counts}",
    )
    return report


def raise_for_failures(report: ValidationReport) -> None:
    """Raise :class:`DataValidationError` when the report holds failures; else do nothing."""
    if not report.success:
        raise DataValidationError(report)


def _run_checkpoint(checks: pd.DataFrame, rules: list[Rule], docs_dir: Path | None) -> Any:
    """Run one GX checkpoint over ``checks``; returns its suite validation result."""
    # Imported here: GX takes seconds to import, and the report types and image facts do not need it.
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    docs_sites = {}
    if docs_dir is not None:
        docs_sites[_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # Ephemeral: stores live in memory, so nothing is written but the data docs.
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            data_docs_sites=docs_sites,
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    batch_definition = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("images")
        .add_batch_definition_whole_dataframe("whole manifest")
    )
    suite = context.suites.add(
        gx.ExpectationSuite(name="skumatch-dataset", expectations=[e for rule in rules for e in rule.expectations])
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="skumatch-dataset", data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="skumatch-dataset",
            validation_definitions=[definition],
            actions=[] if docs_dir is None else [UpdateDataDocsAction(name="data docs", site_names=[_DOCS_SITE])],
            # COMPLETE lists every failing row, named by _INDEX_COLUMNS, not just a sample.
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": _INDEX_COLUMNS},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": checks})
    (outcome,) = result.run_results.values()
    return outcome


def _failures(outcome: Any, checks: pd.DataFrame, rules: list[Rule]) -> list[ValidationFailure]:
    """One failure per failing row (per SKU for SKU rules), in the order the rules ran."""
    by_name = {rule.name: rule for rule in rules}
    failures: list[ValidationFailure] = []
    for result in outcome.results:
        if result.success:
            continue
        rule = by_name[result.expectation_config.meta["rule"]]
        if "unexpected_index_list" not in result.result:
            # Every rule checks column values this module computed, so a failure without failing
            # rows means GX itself could not evaluate it: a bug to surface, not bad data.
            raise RuntimeError(f"GX could not evaluate rule {rule.name}: {_gx_errors(result.exception_info)}")
        rows = checks.loc[[entry["row"] for entry in result.result["unexpected_index_list"]]]
        if rule.per_sku:
            rows = rows.drop_duplicates("sku_id")
        failures += [
            ValidationFailure(
                rule=rule.name,
                image_path=None if rule.per_sku else _present(row["image_path"]),
                sku_id=_present(row["sku_id"]),
                detail=rule.describe(row),
            )
            for _, row in rows.iterrows()
        ]
    return failures


def _gx_errors(exception_info: dict[str, Any]) -> str:
    # GX reports one exception flat, or several keyed by the metric that raised them.
    entries = [exception_info] if "exception_message" in exception_info else list(exception_info.values())
    return "; ".join(dict.fromkeys(str(entry.get("exception_message")) for entry in entries))


def _present(value: Any) -> str | None:
    return None if pd.isna(value) else str(value)


def _cell(value: str | None) -> str:
    # A "|" inside a cell would end it early in a Markdown table.
    return "-" if value is None else value.replace("|", "\\|")
