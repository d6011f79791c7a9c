"""The index-scale benchmark end to end at small sizes: real FAISS indexes, real saves and loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import index_scale
from components.config import IndexParams

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_every_factory_is_measured_against_flat_at_every_size(tmp_path, table_rows, results_file_parts):
    out = tmp_path / "index_scale.md"
    out.write_text("# an earlier run\n\n## Notes (by hand)\n\n- kept across runs\n")
    argv = [
        "--params",
        str(PARAMS),
        "--out",
        str(out),
        "--sizes",
        "300",
        "1200",
        "--queries",
        "80",
        "--factories",
        "IVF{nlist},Flat@4",
        "HNSW32@8",
    ]
    assert index_scale.main(argv) == 0
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.index_scale")
    assert parts.command.endswith("--sizes 300 1200 --queries 80 --factories Flat 'IVF{nlist},Flat@4' HNSW32@8")
    assert "one 256-d unit embedding per SKU" in parts.setup[0]
    assert "an earlier run" not in text and text.endswith("## Notes (by hand)\n\n- kept across runs\n")
    # The headline: every factory's batch search ratio and recall@1 at each size, as its size's table has them.
    headline = table_rows(parts.headline)
    assert list(headline) == ["Flat (baseline)", "IVF{nlist},Flat@4", "HNSW32@8"]
    assert headline["Flat (baseline)"] == ["×1.00", "1.000", "×1.00", "1.000"]
    for size, nlist in ((300, 64), (1200, 128)):  # about 4·√N lists, a power of two
        section = text.split(f"## {size:,} SKUs")[1].split("## ")[0]
        rows = table_rows(section)
        assert list(rows) == ["Flat (baseline)", f"IVF{nlist},Flat", "HNSW32"]  # the baseline was added, first
        flat, ivf, hnsw = rows.values()
        column = 2 * [300, 1200].index(size)
        assert [cells[column : column + 2] for cells in headline.values()] == [row[5:7] for row in rows.values()]
        assert flat[0] == "-" and ivf[0] == "4" and hnsw[0] == "8"
        assert flat[5:8] == ["×1.00", "1.000", "1.000"]  # Flat agrees with itself
        for row in rows.values():
            assert 0 <= float(row[6]) <= 1 and 0 <= float(row[7]) <= 1 and 0 <= float(row[8]) <= 1
            assert float(row[3]) > 0 and float(row[4]) > 0 and float(row[9]) > 0 and float(row[10]) > 0  # timed, loaded
        assert float(flat[8]) > 0.5  # the exact search finds most queries' SKU on this synthetic data


def test_factory_placeholders_and_search_settings():
    params = IndexParams(nprobe=16, ef_search=128)
    assert index_scale.resolve_factory("IVF{nlist},Flat", 1_000_000, params) == ("IVF4096,Flat", 16, 128)
    assert index_scale.resolve_factory("IVF{nlist},SQ8@64", 10_000, params) == ("IVF512,SQ8", 64, 128)
    assert index_scale.resolve_factory("HNSW32", 10_000, params) == ("HNSW32", 16, 128)
    assert index_scale.resolve_factory("HNSW32@16", 10_000, params) == ("HNSW32", 16, 16)


def test_synthetic_catalogue_is_unit_norm_and_hard_within_a_category():
    catalogue, queries, truth = index_scale.synthetic_catalogue(2000, 256, 200)
    assert np.allclose(np.linalg.norm(catalogue, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    true_similarity = np.einsum("qd,qd->q", queries, catalogue[truth])
    assert 0.4 < true_similarity.mean() < 0.7


@pytest.mark.parametrize("args", [["--queries", "0"], ["--sizes", "0"], ["--sizes", "3"]])
def test_bad_arguments_are_refused(tmp_path, args):
    with pytest.raises(SystemExit):
        index_scale.main(["--params", str(PARAMS), "--out", str(tmp_path / "out.md"), *args])
    assert not (tmp_path / "out.md").exists()
