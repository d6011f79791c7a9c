"""Shared reading of the benchmarks' results files."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def parse_table_rows(text: str) -> dict[str, list[str]]:
    """Body rows of the markdown tables in ``text``: first cell -> the other cells (headers are skipped)."""
    rows, in_body = {}, False
    for line in text.splitlines():
        if line.startswith("|---"):
            in_body = True
        elif line.startswith("| ") and in_body:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        else:
            in_body = False
    return rows


@pytest.fixture
def table_rows() -> Callable[[str], dict[str, list[str]]]:
    """:func:`parse_table_rows`, for the benchmark tests."""
    return parse_table_rows
