"""The index benchmark end to end at a small size: fresh-process measures, Milvus Lite, index add, merged sizes."""

from __future__ import annotations

import json

from benchmarks import index as index_benchmark


def test_every_way_is_measured_and_sizes_not_run_again_keep_their_figures(
    tmp_path, synthetic_dataset, results_file_parts
):
    out = tmp_path / "index.md"
    # An earlier run measured another size: its record stays, with its own command.
    earlier = {"sizes": {"2000": {"command": "python -m benchmarks.index --sizes 2000", "counts": {"vectors": 2000,
               "skus": 1000}, "plan": "Flat", "plan_reason": "exact", "ways": {}}}}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(earlier))
    argv = [
        "--out", str(out), "--scratch", str(tmp_path / "scratch"), "--data-root", str(synthetic_dataset),
        "--sizes", "3000", "--queries", "40", "--exact-queries", "10", "--candidates", "IVF{nlist},SQ8",
        "--candidates-at", "3000", "--milvus-at", "3000", "--milvus-queries", "5", "--add", "4", "--add-at", "3000",
        "-S", "index.exact_max_vectors=1000", "-S", "index.tune_sample=100",
    ]  # fmt: skip
    index_benchmark.main(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    assert list(record["sizes"]) == ["2000", "3000"] and record["sizes"]["2000"] == earlier["sizes"]["2000"]
    ways = record["sizes"]["3000"]["ways"]
    assert set(ways) == {"exact (Flat)", "auto", "IVF64,SQ8", "Milvus Lite"}
    assert ways["exact (Flat)"]["recall_at_10"] == 1.0 and ways["auto"]["meta_factory"] == "IVF64,Flat"
    assert ways["auto"]["recall_at_10"] >= 0.9 and ways["auto"]["rss_bytes"] > 0
    assert record["add"]["rows"] == 4 and record["add"]["untouched"] is True
    text = out.read_text()
    parts = results_file_parts(text, "benchmarks.index")
    assert "--sizes 3000" in parts.command and "index add of 4 products" in parts.headline
    assert "Run: `python -m benchmarks.index --sizes 2000`" in text
    assert record["add"]["runtime"] == "onnx"  # the production embedder, as `skumatch index add` embeds

    # --add-only measures the add again, keeping every size's figures from the run that measured them.
    index_benchmark.main([*argv, "--add-only", "-S", "embedding.runtime=torch"])
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["sizes"] == record["sizes"] and again["add"]["runtime"] == "torch"
    assert "--add-only" in again["add"]["command"] and f"index add: `{again['add']['command']}`" in out.read_text()
