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
    brute_force_similarity,
    evaluate_embeddings,
    evaluate_encoder,
    faiss_similarity,
    flatten_metrics,
    gate,
    protocol_sets,
    retrieval_metrics,
    sku_scores,
    write_metrics,
)

SIMILARITY_FNS = [faiss_similarity, brute_force_similarity]


def identity_gallery(skus: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.eye(len(skus), dtype=np.float32), np.array(skus)


def metrics_for(query_rows, query_skus, gallery_skus, ks=(1, 3, 5), similarity_fn=faiss_similarity):
    gallery, gallery_skus = identity_gallery(gallery_skus)
    return retrieval_metrics(
        np.array(query_rows, dtype=np.float32), np.array(query_skus), gallery, gallery_skus, ks, similarity_fn
    )


# --- retrieval_metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("similarity_fn", SIMILARITY_FNS)
def test_top_k_with_known_ranks(similarity_fn):
    # The true SKU ranks 0, 1, 2 and 3 among four SKUs.
    queries = [
        [0.9, 0.1, 0.0, 0.2],  # A: first
        [0.1, 0.5, 0.9, 0.0],  # B: second behind C
        [0.6, 0.0, 0.3, 0.9],  # C: third behind D and A
        [0.9, 0.7, 0.5, 0.1],  # D: last
    ]
    result = metrics_for(queries, ["A", "B", "C", "D"], ["A", "B", "C", "D"], (1, 2, 3, 5), similarity_fn)
    assert result["top1"] == pytest.approx(0.25)
    assert result["top2"] == pytest.approx(0.5)
    assert result["top3"] == pytest.approx(0.75)
    assert result["top5"] == pytest.approx(1.0)  # k beyond the number of SKUs
    assert result["queries"] == 4 and result["queries_without_gallery_sku"] == 0


@pytest.mark.parametrize("similarity_fn", SIMILARITY_FNS)
def test_top_k_counts_distinct_skus(similarity_fn):
    # Five images of the wrong SKU X outrank the one image of the true SKU T. Per image, T would
    # rank 6th; over distinct SKUs it ranks 2nd, so it is a top-3 hit but not a top-1 hit.
    gallery = ["X", "X", "X", "X", "X", "T", "Y", "Z"]
    query = [[0.95, 0.94, 0.93, 0.92, 0.91, 0.5, 0.3, 0.1]]
    result = metrics_for(query, ["T"], gallery, (1, 2, 3), similarity_fn)
    assert result["top1"] == 0.0
    assert result["top2"] == 1.0
    assert result["top3"] == 1.0


def test_a_tie_with_another_sku_counts_against_the_model():
    result = metrics_for([[0.5, 0.5, 0.1]], ["A"], ["A", "B", "C"], (1, 2))
    assert result["top1"] == 0.0
    assert result["top2"] == 1.0


@pytest.mark.parametrize("similarity_fn", SIMILARITY_FNS)
def test_map_computed_by_hand(similarity_fn):
    gallery = ["A", "B", "A", "B", "A"]
    queries = [
        [0.9, 0.8, 0.7, 0.6, 0.5],  # A: ranked A B A B A -> precision at hits 1, 2/3, 3/5
        [0.5, 0.9, 0.4, 0.8, 0.3],  # B: ranked B B A A A -> precision at hits 1, 1
    ]
    result = metrics_for(queries, ["A", "B"], gallery, (1,), similarity_fn)
    ap_a = (1 + 2 / 3 + 3 / 5) / 3
    ap_b = 1.0
    assert result["map"] == pytest.approx((ap_a + ap_b) / 2)
    assert result["top1"] == 1.0
    # Delta similarity over SKUs (best image per SKU): A 0.9 - 0.8; B 0.9 - 0.5.
    assert result["delta_similarity"] == pytest.approx((0.1 + 0.4) / 2)


def test_delta_similarity_is_true_minus_mean_of_other_skus():
    result = metrics_for([[0.8, 0.2, 0.4, 0.0], [0.1, 0.1, 0.1, -0.5]], ["A", "D"], ["A", "B", "C", "D"])
    # A: 0.8 - mean(0.2, 0.4, 0.0) = 0.6; D: -0.5 - 0.1 = -0.6.
    assert result["delta_similarity"] == pytest.approx(0.0)
    single = metrics_for([[0.8, 0.2, 0.4, 0.0]], ["A"], ["A", "B", "C", "D"])
    assert single["delta_similarity"] == pytest.approx(0.6)


def test_delta_similarity_with_a_single_gallery_sku_is_zero():
    result = metrics_for([[0.8, 0.6]], ["A"], ["A", "A"])
    assert result["delta_similarity"] == 0.0
    assert result["top1"] == 1.0 and result["map"] == 1.0


def test_sku_scores_take_the_best_image_of_each_sku():
    similarity = np.array([[0.1, 0.7, 0.3, 0.9], [0.5, -0.2, 0.4, 0.0]], dtype=np.float32)
    skus, scores = sku_scores(similarity, np.array(["b", "a", "b", "c"]))
    assert skus.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(scores, [[0.7, 0.3, 0.9], [-0.2, 0.5, 0.0]])


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


def test_faiss_similarity_equals_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 24)).astype(np.float32)
    gallery = rng.normal(size=(150, 24)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    fast, exact = faiss_similarity(queries, gallery), brute_force_similarity(queries, gallery)
    assert fast.shape == (40, 150)
    assert np.allclose(fast, exact, atol=1e-5)
    # Not trivially equal: the matrix has real structure (not all zeros, not constant).
    assert exact.std() > 0.1


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

    with_faiss = retrieval_metrics(queries, skus[query_labels], gallery, gallery_skus, (1, 3, 5), faiss_similarity)
    brute = retrieval_metrics(queries, skus[query_labels], gallery, gallery_skus, (1, 3, 5), brute_force_similarity)
    assert with_faiss.keys() == brute.keys()
    for key in brute:
        assert with_faiss[key] == pytest.approx(brute[key], abs=1e-6), key
    assert 0.0 < brute["top1"] < 1.0  # a case where ranking actually matters


def test_similarity_fn_is_the_injected_one():
    calls = []

    def recording(queries, gallery):
        calls.append((queries.shape, gallery.shape))
        return brute_force_similarity(queries, gallery)

    metrics_for([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], ["A", "B", "Z"], ["A", "B"], (1,), recording)
    assert calls == [((2, 2), (2, 2))]  # the unmatched query was dropped before searching


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
    metrics = evaluate_embeddings(embeddings, protocol_sets(manifest, "val", "train"), [1])
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
    metrics = evaluate_embeddings(gallery_only, sets, [1], query_embeddings=swapped)
    assert metrics["catalogue"]["top1"] == 0.0 and metrics["nn"]["top1"] == 1.0
    assert evaluate_embeddings(embeddings, sets, [1])["catalogue"]["top1"] == 1.0


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


def test_empty_gallery_protocol_is_skipped():
    manifest, embeddings = small_manifest()
    no_catalogue = manifest[manifest["role"] != "catalogue"].reset_index(drop=True)
    metrics = evaluate_embeddings(embeddings, protocol_sets(no_catalogue, "val", "train"), [1])
    assert set(metrics) == {"nn"}
    decision = gate(metrics, None, EvaluateParams(gate_protocol="catalogue"))
    assert not decision.passed and "catalogue" in decision.reasons[0]


def test_evaluate_encoder_on_the_synthetic_dataset(synthetic_dataset, tiny_model_overrides):
    from components.model import build_encoder

    params = load_params(None, tiny_model_overrides + ["evaluate.ks=[1,3]"])
    encoder, preprocess = build_encoder(params.model)
    manifest = load_manifest(synthetic_dataset)
    fast = evaluate_encoder(encoder, preprocess, manifest, "val", "train", params.evaluate)
    exact = evaluate_encoder(
        encoder, preprocess, manifest, "val", "train", params.evaluate, similarity_fn=brute_force_similarity
    )
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
    metrics = evaluate_embeddings(embeddings, sets, [1])
    assert metrics["catalogue"]["leaked_queries"] == 1 and metrics["nn"]["leaked_queries"] == 1
    assert metrics["catalogue"]["queries"] == len(val) - 1 == metrics["nn"]["queries"]
    # With the check off, every query counts.
    unchecked = evaluate_embeddings(embeddings, protocol_sets(manifest, "val", "train", None), [1])
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
