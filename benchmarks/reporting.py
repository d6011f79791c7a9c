"""What every benchmark shares: its command line, the machine line, the results file and the child processes.

A results file reads the same whatever the benchmark (:func:`results_page`)::

    # <title>

    <the headline table>

    - Command: `python -m benchmarks.<name> <every option that shapes the figures>`
    - Machine: <machine()>
    - <other setup>

    How to read it: <a few lines>

    ## <further tables>

    ## Notes            <- written by hand, kept across runs (write_results)

It carries no clock time: a rerun changes the figures, not the file's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

NOTES_HEADING = "\n## Notes"


def machine() -> str:
    """One line naming the hardware and software the figures come from."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def torch_threads() -> str:
    """``torch threads N``: the intra-op threads of this process, which set CPU timings."""
    import torch

    return f"torch threads {torch.get_num_threads()}"


def benchmark_parser(description: str, results: Path) -> argparse.ArgumentParser:
    """A benchmark's parser with the options every benchmark has: ``--params``, ``--set`` and ``--out``."""
    made = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--params", default="params.yaml")
    made.add_argument("--set", "-S", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    made.add_argument("--out", default=str(results))
    return made


def _option(name: str, value: Any) -> list[str]:
    flag = f"--{name.replace('_', '-')}"
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    values = value if isinstance(value, list) else [value]
    return [flag, *(f"{item:g}" if isinstance(item, float) else shlex.quote(str(item)) for item in values)]


def command_line(
    module: str,
    args: argparse.Namespace,
    measured: Iterable[str],
    parser: argparse.ArgumentParser | None = None,
    optional: Iterable[str] = ("params", "out"),
) -> str:
    """The command that repeats a run: ``python -m <module>``, then the options as ``args`` holds them.

    Args:
        module: the benchmark's module, ``benchmarks.<name>``.
        args: the parsed (and completed) options.
        measured: the options that shape the figures, always written out (a false flag is left out).
        parser: the parser, for the defaults of ``optional``; without it every ``optional`` that is set is written.
        optional: options written only where they differ from the default (the params file, the output).
    """
    parts = [f"python -m {module}"]
    for name in optional:
        value = getattr(args, name)
        if value != (parser.get_default(name) if parser is not None else None):
            parts += _option(name, value)
    parts += [f"--set {shlex.quote(override)}" for override in getattr(args, "overrides", [])]
    for name in measured:
        parts += _option(name, getattr(args, name))
    return " ".join(parts)


def results_page(
    title: str,
    headline: Sequence[str],
    command: str,
    setup: Sequence[str],
    how_to_read: str | Sequence[str],
    details: Sequence[str] = (),
    machine_note: str = "",
) -> str:
    """A results file's text: the title, the headline table, the command, the machine, the setup, how to read it.

    Args:
        title: the heading, without ``# ``.
        headline: the lines of the headline table.
        command: the command that repeats the run (:func:`command_line`).
        setup: bullets after the machine's (data, model, method), without ``- ``.
        how_to_read: a few lines on what the figures mean, a paragraph or a list of them; the first
            is introduced by ``How to read it:``.
        details: the lines after it, the further tables under ``## `` headings.
        machine_note: appended to the machine line (``, torch threads 2``).
    """
    paragraphs = [how_to_read] if isinstance(how_to_read, str) else list(how_to_read)
    lines = [
        f"# {title}",
        "",
        *headline,
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}{machine_note}",
        *(f"- {item}" for item in setup),
        "",
    ]
    for number, paragraph in enumerate(paragraphs):
        lines += [f"How to read it: {paragraph}" if number == 0 else paragraph, ""]
    lines += details
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: the header, the rule, a row each (cells already formatted)."""
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def kept_notes(results_file: Path) -> str:
    """The hand-written ``## Notes`` section of an earlier results file (exploration, caveats), kept across runs."""
    if not results_file.exists():
        return ""
    text = results_file.read_text()
    return text[text.index(NOTES_HEADING) :] if NOTES_HEADING in text else ""


def write_results(results_file: str | Path, text: str) -> str:
    """Write a benchmark's results file: ``text``, then the earlier file's kept ``## Notes``; returns the text."""
    path = Path(results_file)
    text += kept_notes(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def measure_in_child(name: str, command: list[str]) -> dict:
    """Run one measuring process and return the JSON object its last line prints.

    A benchmark runs each way in a process of its own so that memory figures are that way's alone.

    Raises:
        RuntimeError: the process failed; the message names ``name`` and ends with its stderr.
    """
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{name}: the measuring process failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    print(name, result, flush=True)
    return result
