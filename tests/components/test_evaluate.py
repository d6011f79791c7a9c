"""Retrieval metrics on hand-made embeddings with known answers, FAISS against brute force, the gate.

Most cases use an identity gallery (gallery image i = unit vector e_i), so a query's embedding
*is* its row of similarities and the expected numbers can be worked out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.config import EvaluateParams, load_params
from components.data import DatasetError, load_manifest
from components.evaluate import (
    GateDecision,
    GateFailedError,
    SkuGroups,
    brute_force_knn,
    evaluate_embeddings,
    evaluate_encoder,
    faiss_knn,
    flatten_metrics,
    gate,
    protocol_sets,
    retrieval_metrics,
    write_metrics,
)

KNN_FNS = [faiss_knn, brute_force_knn]
KS_1 = EvaluateParams(ks=[1])


def identity_gallery(skus: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.eye(len(skus), dtype=np.float32), np.array(skus)


def metrics_for(query_rows, query_skus, gallery_skus, ks=(1, 3, 5), knn_fn=faiss_knn, neighbours=1000):
    gallery, gallery_skus = identity_gallery(gallery_skus)
    return retrieval_metrics(
        np.array(query_rows, dtype=np.float32), np.array(query_skus), gallery, gallery_skus, ks, knn_fn, neighbours
    )


# --- retrieval_metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("knn_fn", KNN_FNS)
def test_top_k_with_known_ranks(knn_fn):
    # The true SKU ranks 0, 1, 2 and 3 among four SKUs.
    queries = [
        [0.9, 0.1, 0.0, 0.2],  # A: first
        [0.1, 0.5, 0.9, 0.0],  # B: second behind C
        [0.6, 0.0, 0.3, 0.9],  # C: third behind D and A
        [0.9, 0.7, 0.5, 0.1],  # D: last
    ]
    result = metrics_for(queries, ["A", "B", "C", "D"], ["A", "B", "C", "D"], (1, 2, 3, 5), knn_fn)
    assert result["top1"] == pytest.approx(0.25)
    assert result["top2"] == pytest.approx(0.5)
    assert result["top3"] == pytest.approx(0.75)
    assert result["top5"] == pytest.approx(1.0)  # k beyond the number of SKUs
    assert result["queries"] == 4 and result["queries_without_gallery_sku"] == 0


@pytest.mark.parametrize("knn_fn", KNN_FNS)
def test_top_k_counts_distinct_skus(knn_fn):
    # Five images of the wrong SKU X outrank the one image of the true SKU T. Per image, T would
    # rank 6th; over distinct SKUs it ranks 2nd, so it is a top-3 hit but not a top-1 hit.
    gallery = ["X", "X", "X", "X", "X", "T", "Y", "Z"]
    query = [[0.95, 0.94, 0.93, 0.92, 0.91, 0.5, 0.3, 0.1]]
    result = metrics_for(query, ["T"], gallery, (1, 2, 3), knn_fn)
    assert result["top1"] == 0.0
    assert result["top2"] == 1.0
    assert result["top3"] == 1.0


@pytest.mark.parametrize("knn_fn", KNN_FNS)
def test_top_k_searches_further_when_images_of_one_sku_fill_the_neighbours(knn_fn):
    # Two neighbours hold only X: the search widens until T or three other SKUs are in sight.
    gallery = ["X", "X", "X", "X", "X", "T", "Y", "Z"]
    query = [[0.95, 0.94, 0.93, 0.92, 0.91, 0.5, 0.3, 0.1]]
    few = metrics_for(query, ["T"], gallery, (1, 2, 3), knn_fn, neighbours=2)
    assert (few["top1"], few["top2"], few["top3"]) == (0.0, 1.0, 1.0)
    # Its one image is not among the two neighbours: mAP@2 is 0, where the full mAP is 1/6.
    assert few["map"] == 0.0 and metrics_for(query, ["T"], gallery, (1,), knn_fn)["map"] == pytest.approx(1 / 6)


def test_a_tie_with_another_sku_counts_against_the_model():
    result = metrics_for([[0.5, 0.5, 0.1]], ["A"], ["A", "B", "C"], (1, 2))
    assert result["top1"] == 0.0
    assert result["top2"] == 1.0


@pytest.mark.parametrize("knn_fn", KNN_FNS)
def test_map_computed_by_hand(knn_fn):
    gallery = ["A", "B", "A", "B", "A"]
    queries = [
        [0.9, 0.8, 0.7, 0.6, 0.5],  # A: ranked A B A B A -> precision at hits 1, 2/3, 3/5
        [0.5, 0.9, 0.4, 0.8, 0.3],  # B: ranked B B A A A -> precision at hits 1, 1
    ]
    result = metrics_for(queries, ["A", "B"], gallery, (1,), knn_fn)
    ap_a = (1 + 2 / 3 + 3 / 5) / 3
    ap_b = 1.0
    assert result["map"] == pytest.approx((ap_a + ap_b) / 2)
    assert result["top1"] == 1.0
    # Delta similarity over SKUs (best image per SKU): A 0.9 - 0.8; B 0.9 - 0.5.
    assert result["delta_similarity"] == pytest.approx((0.1 + 0.4) / 2)


def test_delta_similarity_is_true_minus_mean_of_other_skus():
    result = metrics_for([[0.8, 0.2, 0.4, 0.0], [0.1, 0.1, 0.1, -0.5]], ["A", "D"], ["A", "B", "C", "D"])
    # A: 0.8 - mean(0.2, 0.4, 0.0) = 0.6; D: -0.5 - 0.1 = -0.6.
    assert result["delta_similarity"] == pytest.approx(0.0, abs=1e-6)
    single = metrics_for([[0.8, 0.2, 0.4, 0.0]], ["A"], ["A", "B", "C", "D"])
    assert single["delta_similarity"] == pytest.approx(0.6)


def test_delta_similarity_with_a_single_gallery_sku_is_zero():
    result = metrics_for([[0.8, 0.6]], ["A"], ["A", "A"])
    assert result["delta_similarity"] == 0.0
    assert result["top1"] == 1.0 and result["map"] == 1.0


def test_sku_groups_score_each_sku_by_its_best_image(monkeypatch):
    import components.evaluate as evaluate_lib

    groups = SkuGroups.of(np.array(["b", "a", "b", "c"]))
    assert groups.skus.tolist() == ["a", "b", "c"] and groups.sizes.tolist() == [1, 2, 1]
    gallery = np.eye(4, dtype=np.float32)  # a query's embedding is its row of image scores
    queries = np.array([[0.1, 0.7, 0.3, 0.9], [0.5, -0.2, 0.4, 0.0]], dtype=np.float32)
    rows, codes = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 0, 1, 2])
    expected = [0.7, 0.3, 0.9, -0.2, 0.5, 0.0]
    np.testing.assert_allclose(groups.best_scores(queries, gallery, rows, codes), expected)
    # Gathered one gallery row at a time: the same scores.
    monkeypatch.setattr(evaluate_lib, "GATHER_FLOATS", 1)
    np.testing.assert_allclose(groups.best_scores(queries, gallery, rows, codes), expected)


def test_queries_without_gallery_sku_are_excluded_and_counted():
    queries = [[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]
    result = metrics_for(queries, ["A", "NEW", "B"], ["A", "B"], (1,))
    assert result["queries"] == 2
    assert result["queries_without_gallery_sku"] == 1
    # Only A and B count, both right: the unmatched query is not scored as a miss.
    assert result["top1"] == 1.0
    assert result["map"] == 1.0


def test_no_matchable_query_is_an_error():
    with pytest.raises(ValueError, match="no query SKU"):
        metrics_for([[0.9, 0.1]], ["NEW"], ["A", "B"])


def test_numeric_sku_labels_match_string_labels():
    gallery, _ = identity_gallery(["1", "2"])
    result = retrieval_metrics(
        np.array([[0.1, 0.9]], dtype=np.float32), np.array([2]), gallery, np.array(["1", "2"]), (1,)
    )
    assert result["top1"] == 1.0


def test_faiss_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 24)).astype(np.float32)
    gallery = rng.normal(size=(150, 24)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    (fast, fast_rows), (exact, exact_rows) = faiss_knn(queries, gallery, 20), brute_force_knn(queries, gallery, 20)
    assert fast.shape == fast_rows.shape == (40, 20)
    assert np.allclose(fast, exact, atol=1e-5) and np.array_equal(fast_rows, exact_rows)
    assert (np.diff(exact, axis=1) <= 0).all() and len(np.unique(exact_rows)) > 20  # best first; queries differ
    assert faiss_knn(queries, gallery, 1000)[1].shape == (40, 150)  # k past the gallery: all of it


def test_metrics_are_identical_with_faiss_or_brute_force():
    rng = np.random.default_rng(1)
    skus = np.array([f"sku{i}" for i in range(12)])
    centres = rng.normal(size=(12, 16))
    gallery_skus = np.repeat(skus, 3)
    gallery = centres[np.repeat(np.arange(12), 3)] + 0.8 * rng.normal(size=(36, 16))
    query_labels = rng.integers(0, 12, size=60)
    queries = centres[query_labels] + 0.8 * rng.normal(size=(60, 16))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)

    with_faiss = retrieval_metrics(queries, skus[query_labels], gallery, gallery_skus, (1, 3, 5), faiss_knn)
    brute = retrieval_metrics(queries, skus[query_labels], gallery, gallery_skus, (1, 3, 5), brute_force_knn)
    assert with_faiss.keys() == brute.keys()
    for key in brute:
        assert with_faiss[key] == pytest.approx(brute[key], abs=1e-6), key
    assert 0.0 < brute["top1"] < 1.0  # a case where ranking actually matters
    # From four neighbours a query (a SKU has three images), top-k is the same; mAP becomes mAP@4.
    few = retrieval_metrics(queries, skus[query_labels], gallery, gallery_skus, (1, 3, 5), faiss_knn, neighbours=4)
    assert {k: few[k] for k in ("top1", "top3", "top5")} == {k: brute[k] for k in ("top1", "top3", "top5")}
    assert few["delta_similarity"] == pytest.approx(brute["delta_similarity"], abs=1e-6)
    assert few["map"] < brute["map"]


def test_delta_similarity_samples_other_skus_beyond_delta_other_skus():
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(400, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery_skus = np.array([f"s{i // 2}" for i in range(400)])  # 200 SKUs of two images
    query_labels = rng.integers(0, 200, size=3000)
    queries = gallery[query_labels * 2] + 0.3 * rng.normal(size=(3000, 8)).astype(np.float32)
    skus = gallery_skus[query_labels * 2]
    every = retrieval_metrics(queries, skus, gallery, gallery_skus, (1,), other_skus=199)
    sampled = retrieval_metrics(queries, skus, gallery, gallery_skus, (1,), other_skus=10)
    # Ten random other SKUs a query estimate the mean over all 199 closely over 3000 queries.
    assert sampled["delta_similarity"] != every["delta_similarity"]
    assert sampled["delta_similarity"] == pytest.approx(every["delta_similarity"], abs=0.01)


def test_knn_fn_is_the_injected_one():
    calls = []

    def recording(queries, gallery, k):
        calls.append((queries.shape, gallery.shape, k))
        return brute_force_knn(queries, gallery, k)

    metrics_for([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], ["A", "B", "Z"], ["A", "B"], (1,), recording)
    assert calls == [((2, 2), (2, 2), 2)]  # the unmatched query was dropped before searching


# --- protocols over a manifest -----------------------------------------------------------------


def small_manifest() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    rows = [
        ("cat/A.jpg", "A", "catalogue", "catalogue"),
        ("cat/B.jpg", "B", "catalogue", "catalogue"),
        ("train/A1.jpg", "A", "train", "query"),
        ("train/B1.jpg", "B", "train", "query"),
        ("val/A1.jpg", "A", "val", "query"),
        ("val/B1.jpg", "B", "val", "query"),
    ]
    manifest = pd.DataFrame(rows, columns=["image_path", "sku_id", "split", "role"])
    e0, e1 = np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)
    diag = np.array([0.6, 0.8], dtype=np.float32)
    embeddings = {
        # Catalogue: the right way round. Training photos: swapped, so the nn protocol fails.
        "cat/A.jpg": e0,
        "cat/B.jpg": e1,
        "train/A1.jpg": e1,
        "train/B1.jpg": e0,
        "val/A1.jpg": np.array([0.8, 0.6], dtype=np.float32),
        "val/B1.jpg": diag,
    }
    return manifest, embeddings


def test_protocol_sets_pick_galleries_and_queries():
    manifest, _ = small_manifest()
    sets = protocol_sets(manifest, "val", "train")
    assert sets.queries["image_path"].tolist() == ["val/A1.jpg", "val/B1.jpg"]
    assert sets.galleries["nn"]["image_path"].tolist() == ["train/A1.jpg", "train/B1.jpg"]
    assert sets.galleries["catalogue"]["image_path"].tolist() == ["cat/A.jpg", "cat/B.jpg"]
    with pytest.raises(DatasetError):
        protocol_sets(manifest, "test", "train")


def test_evaluate_embeddings_reports_both_protocols():
    manifest, embeddings = small_manifest()
    metrics = evaluate_embeddings(embeddings, protocol_sets(manifest, "val", "train"), KS_1)
    assert set(metrics) == {"nn", "catalogue", "open_set"}
    assert metrics["catalogue"]["top1"] == 1.0
    assert metrics["nn"]["top1"] == 0.0
    flat = flatten_metrics(metrics)
    assert flat["catalogue.top1"] == 1.0 and flat["nn.top1"] == 0.0
    assert flat["catalogue.queries"] == 2.0


def test_queries_embedded_as_queries_are_scored_from_their_own_embeddings():
    manifest, embeddings = small_manifest()
    sets = protocol_sets(manifest, "val", "train")
    # Query embeddings that point each val photo at the other SKU's catalogue image.
    swapped = {"val/A1.jpg": embeddings["val/B1.jpg"], "val/B1.jpg": embeddings["val/A1.jpg"]}
    gallery_only = {path: vector for path, vector in embeddings.items() if not path.startswith("val/")}
    metrics = evaluate_embeddings(gallery_only, sets, KS_1, query_embeddings=swapped)
    assert metrics["catalogue"]["top1"] == 0.0 and metrics["nn"]["top1"] == 1.0
    assert evaluate_embeddings(embeddings, sets, KS_1)["catalogue"]["top1"] == 1.0


def test_evaluate_encoder_embeds_queries_at_the_encoders_query_zooms(synthetic_dataset, tiny_model_overrides):
    from components.model import build_encoder

    manifest = load_manifest(synthetic_dataset)
    plain = load_params(None, tiny_model_overrides + ["evaluate.ks=[1,3]"])
    zoomed = load_params(None, tiny_model_overrides + ["evaluate.ks=[1,3]", "model.query_zooms=[1.0,0.5]"])
    encoder, preprocess = build_encoder(plain.model)
    base = evaluate_encoder(encoder, preprocess, manifest, "val", "train", plain.evaluate)
    encoder.query_zooms = tuple(zoomed.model.query_zooms)  # same weights, queries seen at two zooms
    with_zooms = evaluate_encoder(encoder, preprocess, manifest, "val", "train", zoomed.evaluate)
    assert with_zooms["catalogue"]["delta_similarity"] != pytest.approx(base["catalogue"]["delta_similarity"], abs=1e-6)


def _counted_model_loads(synthetic_dataset, tiny_model_overrides):
    """``(params, manifest, load, loads)``: a tiny model's loader that counts its calls in ``loads``."""
    from components.model import build_encoder

    params = load_params(None, tiny_model_overrides + ["evaluate.ks=[1,3]"])
    loads = []

    def load():
        loads.append(1)
        return build_encoder(params.model)

    return params, load_manifest(synthetic_dataset), load, loads


def test_a_cached_model_is_evaluated_from_its_embeddings_without_loading_it(
    synthetic_dataset, tiny_model_overrides, tmp_path
):
    from components.evaluate import EmbeddingCache, evaluate_model, protocol_paths

    params, manifest, load, loads = _counted_model_loads(synthetic_dataset, tiny_model_overrides)
    cache = EmbeddingCache(tmp_path / "cache", "run-1", "data-a")
    first = evaluate_model(load, manifest, "val", "train", params.evaluate, cache)
    again = evaluate_model(load, manifest, "val", "train", params.evaluate, cache)
    assert (first.from_cache, again.from_cache, len(loads)) == (False, True, 1)
    assert again.metrics == first.metrics
    # Another data version, another model run, or other images: not served from the cache.
    gallery_paths, query_paths = protocol_paths(protocol_sets(manifest, "val", "train"))
    assert cache.load(gallery_paths, query_paths) is not None
    assert EmbeddingCache(tmp_path / "cache", "run-1", "data-b").load(gallery_paths, query_paths) is None
    assert EmbeddingCache(tmp_path / "cache", "run-2", "data-a").load(gallery_paths, query_paths) is None
    assert cache.load(gallery_paths, query_paths[1:]) is None


def test_a_corrupt_embedding_cache_is_embedded_again_and_rewritten(synthetic_dataset, tiny_model_overrides, tmp_path):
    from components.evaluate import EmbeddingCache, evaluate_model, protocol_paths

    params, manifest, load, loads = _counted_model_loads(synthetic_dataset, tiny_model_overrides)
    cache = EmbeddingCache(tmp_path / "cache", "run-1", "data-a")
    first = evaluate_model(load, manifest, "val", "train", params.evaluate, cache)
    gallery_file = cache.folder / "gallery.npy"
    # A disk filled or a copy cut short mid-file: the cache is a miss, never an error or a stale hit.
    gallery_file.write_bytes(gallery_file.read_bytes()[:100])
    gallery_paths, query_paths = protocol_paths(protocol_sets(manifest, "val", "train"))
    assert cache.load(gallery_paths, query_paths) is None
    again = evaluate_model(load, manifest, "val", "train", params.evaluate, cache)
    assert (again.from_cache, len(loads)) == (False, 2)
    # Embedded afresh: equal to the first figures up to float rounding.
    assert again.metrics.keys() == first.metrics.keys()
    for protocol, figures in first.metrics.items():
        assert again.metrics[protocol] == pytest.approx(figures, abs=1e-5)
    assert cache.load(gallery_paths, query_paths) is not None
    # Garbage where the path list should be is a miss too.
    (cache.folder / "paths.json").write_text("{not json")
    assert cache.load(gallery_paths, query_paths) is None


def test_empty_gallery_protocol_is_skipped():
    manifest, embeddings = small_manifest()
    no_catalogue = manifest[manifest["role"] != "catalogue"].reset_index(drop=True)
    metrics = evaluate_embeddings(embeddings, protocol_sets(no_catalogue, "val", "train"), KS_1)
    assert set(metrics) == {"nn"}
    decision = gate(metrics, None, EvaluateParams(gate_protocol="catalogue"))
    assert not decision.passed and "catalogue" in decision.reasons[0]


def test_evaluate_encoder_on_the_synthetic_dataset(synthetic_dataset, tiny_model_overrides):
    from components.model import build_encoder

    params = load_params(None, tiny_model_overrides + ["evaluate.ks=[1,3]"])
    encoder, preprocess = build_encoder(params.model)
    manifest = load_manifest(synthetic_dataset)
    fast = evaluate_encoder(encoder, preprocess, manifest, "val", "train", params.evaluate)
    exact = evaluate_encoder(encoder, preprocess, manifest, "val", "train", params.evaluate, knn_fn=brute_force_knn)
    assert set(fast) == {"nn", "catalogue", "open_set"}
    for protocol in ("nn", "catalogue"):
        # Every query is either scored or left out as a leak (the synthetic images are simple
        # enough that a val drawing can land within 4 dHash bits of a gallery one).
        assert fast[protocol]["queries"] + fast[protocol]["leaked_queries"] == 24
        assert set(fast[protocol]) == {
            "top1",
            "top3",
            "delta_similarity",
            "map",
            "queries",
            "queries_without_gallery_sku",
            "leaked_queries",
        }
        assert 0.0 <= fast[protocol]["top1"] <= fast[protocol]["top3"] <= 1.0
        for key, value in exact[protocol].items():
            assert fast[protocol][key] == pytest.approx(value, abs=1e-6)


# --- the gate ----------------------------------------------------------------------------------


GATE = EvaluateParams(min_top1=0.5, min_top3=0.7, champion_tolerance=0.01)


def numbers(top1: float, top3: float, protocol: str = "catalogue") -> dict[str, dict[str, float]]:
    return {protocol: {"top1": top1, "top3": top3}}


def test_gate_passes_above_thresholds():
    decision = gate(numbers(0.8, 0.9), None, GATE)
    assert decision.passed and decision.reasons == []
    assert any("0.8000" in line and "0.5000" in line for line in decision.checks)
    assert decision.summary().startswith("gate PASSED")


def test_gate_passes_exactly_at_thresholds():
    assert gate(numbers(0.5, 0.7), None, GATE).passed


def test_gate_fails_below_threshold_with_numbers():
    decision = gate(numbers(0.42, 0.9), None, GATE)
    assert not decision.passed
    assert len(decision.reasons) == 1
    reason = decision.reasons[0]
    assert "top1" in reason and "0.4200" in reason and "0.5000" in reason
    both = gate(numbers(0.1, 0.2), None, GATE)
    assert len(both.reasons) == 2 and "0.2000" in both.reasons[1] and "0.7000" in both.reasons[1]


def test_gate_reads_the_configured_protocol():
    metrics = {**numbers(0.9, 0.95, "nn"), **numbers(0.1, 0.2, "catalogue")}
    assert gate(metrics, None, EvaluateParams(gate_protocol="nn", min_top1=0.5, min_top3=0.7)).passed
    assert not gate(metrics, None, EvaluateParams(gate_protocol="catalogue", min_top1=0.5, min_top3=0.7)).passed


def test_gate_fails_when_worse_than_champion_beyond_tolerance():
    decision = gate(numbers(0.80, 0.90), numbers(0.85, 0.90), GATE)
    assert not decision.passed
    assert len(decision.reasons) == 1
    assert "0.8000" in decision.reasons[0] and "0.8500" in decision.reasons[0] and "worse" in decision.reasons[0]


def test_gate_passes_within_champion_tolerance():
    decision = gate(numbers(0.845, 0.90), numbers(0.85, 0.905), GATE)
    assert decision.passed, decision.reasons
    assert gate(numbers(0.95, 0.99), numbers(0.85, 0.90), GATE).passed  # better is fine


def test_gate_passes_exactly_at_champion_tolerance():
    lenient = EvaluateParams(min_top1=0.0, min_top3=0.0, champion_tolerance=0.01)
    for champion, challenger in ((0.10, 0.09), (0.07, 0.06), (0.13, 0.12)):
        assert gate(numbers(challenger, 0.5), numbers(champion, 0.5), lenient).passed, (champion, challenger)


def test_gate_ignores_a_champion_without_the_protocol():
    assert gate(numbers(0.8, 0.9), numbers(0.99, 0.99, "nn"), GATE).passed


def test_gate_without_the_protocol_fails():
    decision = gate(numbers(0.9, 0.9, "nn"), None, GATE)
    assert not decision.passed and "catalogue" in decision.reasons[0]


def test_gate_failed_error_carries_the_numbers():
    decision = gate(numbers(0.42, 0.61), numbers(0.7, 0.8), GATE)
    error = GateFailedError(decision)
    assert error.decision is decision
    message = str(error)
    assert message.startswith("gate FAILED")
    for number in ("0.4200", "0.6100", "0.7000", "0.8000", "0.5000"):
        assert number in message
    assert isinstance(error, RuntimeError)


def test_gate_decision_summary_lists_checks_when_passed():
    decision = GateDecision(True, [], ["a check"])
    assert decision.summary() == "gate PASSED: a check"


def test_write_metrics_writes_json(tmp_path):
    metrics = {"catalogue": {"top1": 0.75, "top3": 1.0}, "nn": {"top1": 0.5}}
    path = write_metrics(metrics, tmp_path / "reports" / "nested" / "metrics.json")
    assert path.exists()
    assert json.loads(path.read_text()) == metrics
    write_metrics({"catalogue": {"top1": 0.1}}, path)  # overwrites
    assert json.loads(path.read_text()) == {"catalogue": {"top1": 0.1}}


def test_leaks_are_found_reported_and_left_out(synthetic_dataset, tmp_path):
    import shutil

    from PIL import Image

    from components.data import load_manifest
    from components.evaluate import evaluate_embeddings, protocol_sets
    from components.leaks import find_leaks

    root = shutil.copytree(synthetic_dataset, tmp_path / "leaky")
    manifest = load_manifest(root)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    catalogue = manifest[manifest["role"] == "catalogue"].reset_index(drop=True)
    # An exact copy of a catalogue image, and a re-encoded, slightly resized train photo, as queries.
    exact_query, near_query = val["image_path"].iat[0], val["image_path"].iat[1]
    shutil.copy(catalogue["image_path"].iat[0], exact_query)
    Image.open(train["image_path"].iat[3]).save(near_query, quality=75)

    leaks = find_leaks(catalogue, val)
    assert leaks.to_dict("records") == [
        {"query_path": exact_query, "gallery_path": catalogue["image_path"].iat[0], "kind": "exact", "distance": 0}
    ]
    near = find_leaks(train, val)
    assert near["query_path"].tolist() == [near_query] and near["kind"].tolist() == ["near"]
    assert near["gallery_path"].tolist() == [train["image_path"].iat[3]]

    sets = protocol_sets(manifest, "val", "train", leak_max_distance=4)
    rng = np.random.default_rng(0)
    embeddings = {p: rng.standard_normal(8).astype(np.float32) for p in manifest["image_path"]}
    metrics = evaluate_embeddings(embeddings, sets, KS_1)
    assert metrics["catalogue"]["leaked_queries"] == 1 and metrics["nn"]["leaked_queries"] == 1
    assert metrics["catalogue"]["queries"] == len(val) - 1 == metrics["nn"]["queries"]
    # With the check off, every query counts.
    unchecked = evaluate_embeddings(embeddings, protocol_sets(manifest, "val", "train", None), KS_1)
    assert unchecked["catalogue"]["queries"] == len(val)


def test_rejection_threshold_separates_unknown_skus():
    from components.evaluate import calibrate_rejection, open_set_metrics, rejection_at

    # 8 SKUs on orthogonal axes; queries sit close to their own SKU's catalogue vector.
    rng = np.random.default_rng(0)
    gallery = np.eye(8, dtype=np.float32)
    gallery_skus = np.array([f"s{i}" for i in range(8)])
    query_skus = np.repeat(gallery_skus, 5)
    queries = gallery[np.repeat(np.arange(8), 5)] + 0.15 * rng.standard_normal((40, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    calibrated = calibrate_rejection(queries, query_skus, gallery, gallery_skus, holdout_fraction=0.25, seed=0)
    assert calibrated["unknown_queries"] == 10 and calibrated["known_queries"] == 30
    # Known queries score ~0.99 with their own SKU, unknown ones only ~0.2 with the best other: perfectly separable.
    assert calibrated["precision"] == 1.0 and calibrated["recall"] == 1.0
    assert 0.2 < calibrated["threshold"] < 0.99
    report = open_set_metrics(queries, query_skus, gallery, gallery_skus)
    assert report["precision"] == 1.0 and report["recall"] == 1.0

    # rejection_at by hand: scores 0.9 (known), 0.3 (unknown), 0.5 (known), threshold 0.6 rejects two.
    at = rejection_at(np.array([0.9, 0.3, 0.5]), np.array([False, True, False]), 0.6)
    assert at["precision"] == 0.5 and at["recall"] == 1.0


GALLERY_AT_SCALE = """
import json, resource, sys
import numpy as np
from components.evaluate import retrieval_metrics

def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

rows, dim, queries_count = 1_000_000, 32, 1000
rng = np.random.default_rng(0)
gallery = rng.standard_normal((rows, dim), dtype=np.float32)
for start in range(0, rows, 100_000):  # in chunks: a whole-gallery temporary would count as the peak
    gallery[start : start + 100_000] /= np.linalg.norm(gallery[start : start + 100_000], axis=1, keepdims=True)
gallery_skus = np.arange(rows) // 10  # 100,000 SKUs of ten images
picked = rng.integers(0, rows, queries_count)
queries = gallery[picked] + 0.05 * rng.standard_normal((queries_count, dim), dtype=np.float32)
queries /= np.linalg.norm(queries, axis=1, keepdims=True)
held = rss_bytes()  # the vectors, and what making them left behind
metrics = retrieval_metrics(queries, gallery_skus[picked], gallery, gallery_skus, (1, 3, 5))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"beyond_vectors": peak - held, "vectors": gallery.nbytes, **metrics}))
"""


def test_evaluation_on_a_million_vector_gallery_stays_in_bounded_memory(tmp_path):
    """1,000 queries against 1M gallery vectors: a queries x gallery matrix alone would be 3.7 GiB."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "gallery_at_scale.py"
    script.write_text(GALLERY_AT_SCALE)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["queries"] == 1000, found
    assert found["beyond_vectors"] < 2 * 2**30, found  # the target; the matrix alone would be 3.7 GiB
    # Queries sit near one of their SKU's images: most find it, and never below chance.
    assert 0.5 < found["top1"] <= found["top3"] <= found["top5"] <= 1.0
