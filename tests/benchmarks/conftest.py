"""Shared reading of the benchmarks' results files."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class ResultsFile:
    """The parts of a results file, in the order every benchmark writes them."""

    title: str
    headline: str  # the headline table
    command: str  # what stands between the backquotes of the command line
    setup: list[str]  # the bullets after the machine's, without "- "
    rest: str  # from "How to read it:" to the end


def split_results_file(text: str, module: str) -> ResultsFile:
    """Check that ``text`` opens as every results file does and return its parts.

    The layout: ``# title``, the headline table, ``- Command: `python -m <module> ...```, ``- Machine: ...``,
    other setup bullets, then ``How to read it: ...``; no clock time anywhere.
    """
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", lines[:2]
    table_end = lines.index("", 2)
    headline = lines[2:table_end]
    assert len(headline) >= 3 and headline[1].startswith("|---"), headline
    assert all(line.startswith("| ") or line.startswith("|---") for line in headline), headline
    bullets_end = lines.index("", table_end + 1)
    bullets = lines[table_end + 1 : bullets_end]
    assert bullets[0].startswith(f"- Command: `python -m {module} ") and bullets[0].endswith("`"), bullets[0]
    assert bullets[1].startswith("- Machine: ") and " cores" in bullets[1], bullets[1]
    assert all(line.startswith("- ") for line in bullets), bullets
    assert lines[bullets_end + 1].startswith("How to read it: "), lines[bullets_end + 1]
    # No clock times: a rerun changes the figures, not the file.
    assert not any(line.startswith("- Run:") for line in lines) and not re.search(r"\b\d{1,2}:\d{2}\b", text)
    return ResultsFile(
        title=lines[0][2:],
        headline="\n".join(headline),
        command=bullets[0].removeprefix("- Command: `").removesuffix("`"),
        setup=[line[2:] for line in bullets[2:]],
        rest="\n".join(lines[bullets_end + 1 :]),
    )


@pytest.fixture
def table_rows() -> Callable[[str], dict[str, list[str]]]:
    """:func:`parse_table_rows`, for the benchmark tests."""
    return parse_table_rows


@pytest.fixture
def results_file_parts() -> Callable[[str, str], ResultsFile]:
    """:func:`split_results_file`, for the benchmark tests."""
    return split_results_file
