"""The index-memory benchmark end to end at a small size: real saves, loads in fresh processes, real /proc figures."""

from __future__ import annotations

import pytest

from benchmarks import index_memory


def test_each_factory_is_loaded_both_ways_in_fresh_processes(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "index_memory.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    argv = ["--out", str(out), "--vectors", "40000", "--dim", "64", "--factories", "Flat", "--repeats", "1"]
    assert index_memory.main(argv) == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.index_memory")
    assert parts.command.endswith("--vectors 40000 --dim 64 --factories Flat --repeats 1")
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    (row,) = table_rows(parts.headline).values()
    assert row[0].count("→") == 1 and row[1].startswith("×") and row[2].startswith("×")
    # 40,000 x 64 float32 is 9.8 MiB: the baseline holds it (and the map's strings) privately,
    # the memory-mapped load neither.
    full = [line for line in text.splitlines() if line.startswith("| Flat | full read, lists |")]
    mapped = [line for line in text.splitlines() if line.startswith("| Flat | memory-mapped |")]
    assert len(full) == len(mapped) == 1
    private_full, private_mapped = (float(line.split("|")[6]) for line in (full[0], mapped[0]))
    assert private_full - private_mapped >= 8


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        index_memory.main(["--vectors", "1"])
    assert refused.value.code == 2 and "--vectors must be at least 2" in capsys.readouterr().err
