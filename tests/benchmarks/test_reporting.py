"""The benchmarks' shared reporting: the results file's layout, its kept notes, the command line, child processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from benchmarks import reporting


def page(**changes) -> str:
    parts = dict(
        title="Some benchmark",
        headline=reporting.table(("way", "s", "vs baseline"), [("a", "1.0", "×1.00")]),
        command="python -m benchmarks.some --repeats 2",
        setup=["Data: `here`"],
        how_to_read=["ratios divide by the first row.", "A second paragraph."],
        details=["## More", "", "| x | y |", "|---|---|", "| 1 | 2 |", ""],
    )
    return reporting.results_page(**{**parts, **changes})


def test_a_results_page_opens_with_the_table_command_machine_and_how_to_read_it(results_file_parts):
    text = page(machine_note=", torch threads 2")
    parts = results_file_parts(text, "benchmarks.some")
    assert parts.title == "Some benchmark"
    assert parts.headline == "| way | s | vs baseline |\n|---|---|---|\n| a | 1.0 | ×1.00 |"
    assert parts.command == "python -m benchmarks.some --repeats 2"
    assert f"- Machine: {reporting.machine()}, torch threads 2\n- Data: `here`\n\n" in text
    assert parts.setup == ["Data: `here`"]
    assert parts.rest == (
        "How to read it: ratios divide by the first row.\n\nA second paragraph.\n\n"
        "## More\n\n| x | y |\n|---|---|\n| 1 | 2 |"
    )
    assert text.endswith("| 1 | 2 |\n")  # one newline: the kept notes follow after a blank line
    assert page(details=[]).endswith("How to read it: ratios divide by the first row.\n\nA second paragraph.\n")


def test_the_machine_line_names_cores_and_torch():
    import torch

    line = reporting.machine()
    assert " cores" in line and f"torch {torch.__version__}" in line and ("no GPU" in line or "GPU " in line)
    assert reporting.torch_threads() == f"torch threads {torch.get_num_threads()}"


def test_write_results_keeps_the_hand_written_notes(tmp_path):
    out = tmp_path / "results" / "some.md"
    assert reporting.write_results(out, "# first\n") == "# first\n"  # the folder is made
    out.write_text("# first\n\nold figures\n\n## Notes (by hand)\n\n- kept across runs\n")
    written = reporting.write_results(out, "# second\n")
    assert written == out.read_text() == "# second\n\n## Notes (by hand)\n\n- kept across runs\n"
    assert reporting.write_results(out, "# third\n") == "# third\n\n## Notes (by hand)\n\n- kept across runs\n"
    out.write_text("# no notes\n\n## Other\n")
    assert reporting.write_results(out, "# fourth\n") == "# fourth\n"


def test_the_command_line_spells_out_what_shapes_the_figures():
    parser = reporting.benchmark_parser("a benchmark", Path("results/some.md"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--factories", nargs="+", default=["Flat"])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--slow", action="store_true")
    measured = ("sizes", "share", "factories", "fast", "slow")
    optional = ("params", "data", "out")

    defaults = parser.parse_args([])
    assert (
        reporting.command_line("benchmarks.some", defaults, measured, parser, optional)
        == "python -m benchmarks.some --sizes 1 2 --share 0.5 --factories Flat"
    )
    args = parser.parse_args(
        [
            "--params",
            "p.yaml",
            "--data",
            "d",
            "--fast",
            "--share",
            "0.25",
            "--factories",
            "IVF{nlist},Flat",
            "HNSW32@8",
            "--set",
            "model.query_zooms=[1.0]",
            "-S",
            "train.schedule.epochs=2",
        ]
    )
    assert reporting.command_line("benchmarks.some", args, measured, parser, optional) == (
        "python -m benchmarks.some --params p.yaml --data d --set 'model.query_zooms=[1.0]' "
        "--set train.schedule.epochs=2 --sizes 1 2 --share 0.25 --factories 'IVF{nlist},Flat' HNSW32@8 --fast"
    )


def test_a_measuring_process_returns_its_last_line_or_says_which_way_failed(capsys):
    ok = [sys.executable, "-c", "print('warming up'); print('{\"ms\": 1.5}')"]
    assert reporting.measure_in_child("fast way", ok) == {"ms": 1.5}
    assert "fast way {'ms': 1.5}" in capsys.readouterr().out
    failing = [sys.executable, "-c", "import sys; sys.exit('no such device')"]
    with pytest.raises(RuntimeError, match=r"(?s)^slow way: the measuring process failed:\n.*no such device"):
        reporting.measure_in_child("slow way", failing)


def test_the_shared_options_are_there():
    args = reporting.benchmark_parser("a benchmark", Path("results/some.md")).parse_args(["-S", "a.b=1"])
    assert args == argparse.Namespace(params="params.yaml", overrides=["a.b=1"], out="results/some.md")
