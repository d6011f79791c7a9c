"""Fine-tuning the tiny CLIP on the learnable synthetic dataset: it learns, logs, checkpoints, resumes.

As in open_clip's tests, the real training function runs end to end on a tiny model and
synthetic data; the experiment tracker is injected (a recorder), nothing is mocked.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import Params, load_params
from components.data import load_manifest, select
from components.evaluate import evaluate_encoder
from components.model import build_encoder, embed_images, load_encoder
from components.training import TrainResult, train_encoder
from components.training.checkpoints import run_fingerprint
from components.training.feature_cache import CachedFeatures, cache_features, embed_cached
from components.training.losses import MarginHead
from components.training.sampling import pk_batches, with_catalogue_images

EPOCH_KEYS = {
    "train.loss",
    "train.frozen_backbone",
    "val.catalogue.top1",
    "val.catalogue.top3",
    "val.catalogue.delta_similarity",
    "val.catalogue.map",
}
NN_KEYS = {"val.nn.top1", "val.nn.top3", "val.nn.delta_similarity"}


@dataclass
class RecordingTracker:
    """An experiment tracker that remembers every call (the injected collaborator)."""

    params: list[dict[str, str]] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    fail_at_step: int | None = None

    def log_params(self, params: dict[str, str]) -> None:
        self.params.append(dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.fail_at_step:
            raise KeyboardInterrupt(f"simulated crash at epoch {step}")
        self.metrics.append((step, dict(metrics)))

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self.metrics]


def train_params(clip_dir: Path, data_root: Path, work: Path, *extra: str) -> Params:
    """The brief's tiny recipe: 2 frozen epochs (cached features) + 1 epoch with the backbone training.

    ``train.schedule.lr=0.02``: with 6 SKUs x 9 images and batches of 12 the whole run is 12 optimiser
    steps; the default 1e-3 barely moves the projection in that many.
    """
    overrides = [
        "model.backbone=hf-clip",
        f"model.hf_model_id={clip_dir}",
        "model.embed_dim=16",
        "model.image_size=16",
        "train.schedule.epochs=3",
        "train.schedule.frozen_epochs=2",
        "train.sampler.batch_size=12",
        "train.sampler.images_per_sku=2",
        "train.schedule.lr=0.02",
        "train.schedule.eval_every_epochs=1",  # per-epoch curves, for the assertions on them
        f"train.io.checkpoint_dir={work / 'checkpoints'}",
        f"train.io.output_dir={work / 'model'}",
        f"data.root={data_root}",
        "evaluate.ks=[1,3]",
    ]
    return load_params(None, overrides + list(extra))


@pytest.fixture(scope="module")
def manifest(synthetic_dataset):
    return load_manifest(synthetic_dataset)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip_dir, synthetic_dataset, manifest):
    """One real training run shared by the assertions below: ``(params, result, tracker)``."""
    work = tmp_path_factory.mktemp("train")
    params = train_params(tiny_clip_dir, synthetic_dataset, work)
    tracker = RecordingTracker()
    result = train_encoder(params, manifest, tracker=tracker, data_version="synthetic.dir", progress=False)
    return params, result, tracker


def test_tiny_model_overrides_match_the_recipe(tiny_model_overrides, tiny_clip_dir, synthetic_dataset, tmp_path):
    # train_params inlines the shared overrides (module fixtures cannot use function fixtures).
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    assert load_params(None, tiny_model_overrides).model == params.model


def test_saved_model_loads_and_embeds(trained, manifest):
    params, result, _ = trained
    assert isinstance(result, TrainResult)
    assert result.model_dir == Path(params.train.io.output_dir)
    assert result.device == "cpu" and result.resumed_from_epoch is None
    assert result.sku_ids == sorted(manifest["sku_id"].unique())
    encoder, preprocess, description = load_encoder(result.model_dir)
    assert description["data_version"] == "synthetic.dir"
    assert description["sku_ids"] == result.sku_ids
    assert description["run_fingerprint"] == run_fingerprint(params, "synthetic.dir")
    assert description["train"]["schedule"]["epochs"] == 3
    # The saved model reproduces the metrics the run reported for its last epoch: the gate's
    # protocol, since the last epoch fine-tuned the backbone (the full evaluation is a later step).
    reloaded = evaluate_encoder(encoder, preprocess, manifest, "val", "train", params.evaluate)
    assert set(result.metrics) == {"catalogue", "open_set"}
    for protocol in ("catalogue",):
        assert reloaded[protocol]["top1"] == pytest.approx(result.metrics[protocol]["top1"])
        assert reloaded[protocol]["map"] == pytest.approx(result.metrics[protocol]["map"], abs=1e-5)


def test_loss_decreases(trained):
    _, result, _ = trained
    losses = [record["train.loss"] for record in result.history]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[1] < losses[0]  # the frozen stage learns
    assert losses[-1] < losses[0]
    assert [record["train.frozen_backbone"] for record in result.history] == [1.0, 1.0, 0.0]


def test_training_beats_the_untrained_encoder(trained, manifest):
    params, result, _ = trained
    torch.manual_seed(params.train.seed)  # the same starting point train_encoder used
    untrained, preprocess = build_encoder(params.model)
    before = evaluate_encoder(untrained, preprocess, manifest, "val", "train", params.evaluate)
    trained_encoder, trained_preprocess, _ = load_encoder(result.model_dir)
    after = evaluate_encoder(trained_encoder, trained_preprocess, manifest, "val", "train", params.evaluate)
    assert after["catalogue"]["top1"] > before["catalogue"]["top1"], (before["catalogue"], after["catalogue"])
    assert after["catalogue"]["delta_similarity"] > before["catalogue"]["delta_similarity"]
    assert after["nn"]["top1"] >= before["nn"]["top1"]


def test_evaluating_less_often_changes_no_weight(trained, tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    # train.schedule.eval_every_epochs only thins the validation curves: evaluation draws no random
    # number and moves no weight, so the saved model and its final metrics are the same.
    params, result, _ = trained
    sparse = train_encoder(
        train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.eval_every_epochs=3"),
        manifest,
        data_version="synthetic.dir",
        progress=False,
    )
    assert [("val.catalogue.top1" in record) for record in sparse.history] == [False, False, True]
    assert [record["train.loss"] for record in sparse.history] == [record["train.loss"] for record in result.history]
    assert sparse.metrics == result.metrics
    every, _, _ = load_encoder(result.model_dir)
    thinned, _, _ = load_encoder(sparse.model_dir)
    for name, weight in every.state_dict().items():
        assert torch.equal(weight, thinned.state_dict()[name]), name


def test_tracker_receives_per_epoch_metrics(trained):
    _, result, tracker = trained
    assert tracker.steps == [0, 1, 2]
    for step, metrics in tracker.metrics:
        assert EPOCH_KEYS <= set(metrics), EPOCH_KEYS - set(metrics)
        # Both protocols on cached features (cheap); the gate's alone once the backbone trains.
        frozen = step < 2
        assert NN_KEYS <= set(metrics) if frozen else not NN_KEYS & set(metrics)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["val.catalogue.top1"] <= metrics["val.catalogue.top3"] <= 1.0
        assert "epoch" not in metrics and not any(k.startswith("_") for k in metrics)
        assert metrics["train.loss"] == pytest.approx(result.history[step]["train.loss"])
    assert tracker.metrics[-1][1]["val.catalogue.top1"] == pytest.approx(result.metrics["catalogue"]["top1"])
    assert len(tracker.params) == 1
    assert tracker.params[0]["train.skus"] == "6"
    assert tracker.params[0]["data.version"] == "synthetic.dir"
    assert tracker.params[0]["train.device_resolved"] == "cpu"


def test_checkpoints_are_safetensors_and_json_only(trained):
    params, result, _ = trained
    folder = Path(params.train.io.checkpoint_dir) / run_fingerprint(params, "synthetic.dir")
    assert folder.is_dir()
    # The last two epochs are kept, no half-written ones.
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0001", "epoch-0002"]
    files = [p for p in Path(params.train.io.checkpoint_dir).rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json", ".npy"}
    # .npy only for the cached backbone features: plain float arrays that load without pickles.
    for array_file in (p for p in files if p.suffix == ".npy"):
        assert array_file.parent.name.startswith("features-")
        assert np.load(array_file, allow_pickle=False).dtype == np.float32
    assert sorted(p.name for p in (folder / "epoch-0002").iterdir()) == [
        "encoder.safetensors",
        "head.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    model_files = sorted(p.name for p in result.model_dir.iterdir())
    assert model_files == ["encoder.json", "model.safetensors"]


def test_crashed_run_resumes_where_it_stopped(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=4")
    crashing = RecordingTracker(fail_at_step=2)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(params, manifest, tracker=crashing, progress=False)
    assert crashing.steps == [0, 1]

    tracker = RecordingTracker()
    result = train_encoder(params, manifest, tracker=tracker, progress=False)
    # Epoch 2 was checkpointed before the tracker failed on it, so its work is kept.
    assert result.resumed_from_epoch == 2
    assert tracker.steps == [3]  # only the epochs this run trained are logged
    assert [record["epoch"] for record in result.history] == [0, 1, 2, 3]
    # The resumed run's first two records are the crashed run's.
    for step, metrics in crashing.metrics:
        assert result.history[step]["train.loss"] == pytest.approx(metrics["train.loss"])
    load_encoder(result.model_dir)

    # A run that finds its last epoch done trains nothing and still writes the model.
    again = RecordingTracker()
    done = train_encoder(params, manifest, tracker=again, progress=False)
    assert done.resumed_from_epoch == 3 and again.steps == []
    assert done.metrics["catalogue"]["top1"] == pytest.approx(result.metrics["catalogue"]["top1"])


def test_a_partial_fc_run_trains_and_resumes_with_its_head_moments(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    # Six SKUs, three scored a step: the batch's two and a random other (the head's own AdamW).
    params = train_params(
        tiny_clip_dir, synthetic_dataset, tmp_path, "train.sampler.batch_size=4", "train.loss.sampled_classes=3"
    )
    crashing = RecordingTracker(fail_at_step=2)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(params, manifest, tracker=crashing, progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(sorted((tmp_path / "checkpoints").rglob("epoch-*/head.safetensors"))[-1]))
    assert saved["row_steps"].sum() > 0 and saved["exp_avg_sq"].abs().sum() > 0  # the moments are checkpointed
    result = train_encoder(params, manifest, tracker=RecordingTracker(), progress=False)
    assert result.resumed_from_epoch == 2 and len(result.history) == 3
    assert all(math.isfinite(record["train.loss"]) for record in result.history)


def test_resume_false_starts_over(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=2")
    train_encoder(params, manifest, progress=False)
    tracker = RecordingTracker()
    io = params.train.io.model_copy(update={"resume": False})
    fresh = params.model_copy(update={"train": params.train.model_copy(update={"io": io})})
    result = train_encoder(fresh, manifest, tracker=tracker, progress=False)
    assert result.resumed_from_epoch is None and tracker.steps == [0, 1]


def test_more_epochs_resume_from_the_shorter_run(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    short = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=2")
    train_encoder(short, manifest, progress=False)
    longer = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=4", "train.io.resume=true")
    tracker = RecordingTracker()
    result = train_encoder(longer, manifest, tracker=tracker, progress=False)
    assert result.resumed_from_epoch == 1
    assert tracker.steps == [2, 3]


def test_other_params_never_resume_a_foreign_checkpoint(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    first = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=2")
    train_encoder(first, manifest, progress=False)
    other = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=2", "train.loss.margin=0.3")
    assert run_fingerprint(other, None) != run_fingerprint(first, None)
    tracker = RecordingTracker()
    result = train_encoder(other, manifest, tracker=tracker, progress=False)
    assert result.resumed_from_epoch is None
    assert tracker.steps == [0, 1]
    folder = Path(first.train.io.checkpoint_dir)
    runs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("features-")]
    assert len(runs) == 2  # one checkpoint folder per fingerprint
    # ... but the backbone features, which a margin does not change, were computed once and shared.
    assert len(list(folder.glob("features-*"))) == 1
    # Another data version is another run too.
    assert run_fingerprint(first, "a.dir") != run_fingerprint(first, "b.dir")


def test_fingerprint_ignores_resume_device_and_image_decoding(tmp_path, tiny_clip_dir, synthetic_dataset):
    base = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    same = train_params(
        tiny_clip_dir,
        synthetic_dataset,
        tmp_path,
        "train.io.resume=false",
        "train.device=cpu",
        "train.io.decoded_cache_mb=0",
        "train.io.loader_workers=2",
    )
    assert run_fingerprint(base, "v") == run_fingerprint(same, "v")


def test_training_needs_two_skus(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    one_sku = manifest[manifest["sku_id"] == "Red-Circle"].reset_index(drop=True)
    with pytest.raises(ValueError, match="at least 2 SKUs"):
        train_encoder(train_params(tiny_clip_dir, synthetic_dataset, tmp_path), one_sku, progress=False)


# --- MarginHead --------------------------------------------------------------------------------


def head_and_embeddings(loss: str, seed: int = 0, scale: float = 30.0):
    torch.manual_seed(seed)
    n_classes, dim = 4, 8
    head = MarginHead(dim, n_classes, loss, margin=0.2, scale=scale, subcenters=3)
    prototypes = torch.eye(n_classes, dim)
    head.init_from_prototypes(prototypes)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    correct = prototypes[labels] + 0.05 * torch.randn(len(labels), dim)
    wrong = prototypes[(labels + 1) % n_classes] + 0.05 * torch.randn(len(labels), dim)
    return head, correct, wrong, labels


@pytest.mark.parametrize("loss", ["arcface", "cosface", "subcenter-arcface"])
def test_margin_losses_are_finite_and_lower_for_the_right_class(loss):
    head, correct, wrong, labels = head_and_embeddings(loss)
    right_loss, wrong_loss = head(correct, labels), head(wrong, labels)
    assert torch.isfinite(right_loss) and torch.isfinite(wrong_loss)
    assert right_loss < wrong_loss
    assert right_loss < math.log(4) < wrong_loss  # better / worse than chance
    # Gradients are finite too, even with an embedding pointing straight at (or away from) a class.
    extreme = torch.cat([head.weight.detach()[:1], -head.weight.detach()[:1]]).requires_grad_(True)
    value = head(extreme, torch.tensor([0, 0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(extreme.grad).all()


@pytest.mark.parametrize("loss", ["arcface", "cosface", "subcenter-arcface"])
def test_margin_makes_the_loss_stricter(loss):
    # A small scale keeps the softmax away from saturation, so the margin's effect shows.
    head, correct, _, labels = head_and_embeddings(loss, scale=4.0)
    no_margin = MarginHead(8, 4, loss, margin=0.0, scale=4.0, subcenters=3)
    no_margin.load_state_dict(head.state_dict())
    strict, lenient = head(correct, labels), no_margin(correct, labels)
    assert lenient > 0 and strict > lenient


def test_subcenter_head_keeps_several_prototypes_per_sku():
    head, correct, _, _ = head_and_embeddings("subcenter-arcface")
    assert head.weight.shape == (4 * 3, 8)
    assert head.cosines(correct).shape == (6, 4)
    plain = MarginHead(8, 4, "arcface", 0.2, 30.0, subcenters=3)
    assert plain.weight.shape == (4, 8)  # subcenters only apply to subcenter-arcface


def test_prototype_init_points_classes_at_their_mean():
    head = MarginHead(3, 2, "arcface", 0.2, 30.0)
    head.init_from_prototypes(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -3.0]]))
    torch.testing.assert_close(head.weight.detach(), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


def test_a_partial_fc_head_scores_the_batch_skus_and_sampled_others_and_moves_only_their_rows():
    torch.manual_seed(0)
    full = MarginHead(8, 50, "subcenter-arcface", 0.2, 16.0, subcenters=2, sampled_classes=50)
    assert not full.partial  # no fewer classes than SKUs: the full softmax, in the shared optimiser
    head = MarginHead(8, 50, "subcenter-arcface", 0.2, 16.0, subcenters=2, sampled_classes=10)
    assert head.partial and head.state_dict().keys() >= {"weight", "exp_avg", "exp_avg_sq", "row_steps"}
    embeddings, labels = torch.randn(12, 8), torch.tensor([3, 3, 7, 7, 41, 41, 0, 0, 19, 19, 3, 7])
    before = head.weight.detach().clone()
    loss = head(embeddings, labels)
    loss.backward()
    assert head.weight.grad is None  # the scored rows' gradient is their own, not the whole weight's
    rows, scored_weight = head._scored
    assert scored_weight.grad.shape == (20, 8) and len(set(rows.tolist())) == 20
    scored = rows // 2
    assert set(labels.tolist()) <= set(scored.tolist()) and len(set(scored.tolist())) == 10
    head.sparse_step(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    moved = (head.weight != before).any(dim=1).nonzero().flatten() // 2
    assert set(moved.tolist()) == set(scored.tolist()) and head.weight.grad is None
    # The step used the rows up: another without a new forward changes nothing.
    after = head.weight.detach().clone()
    head.sparse_step(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    assert torch.equal(head.weight, after)
    assert torch.isfinite(loss) and loss > 0


def test_a_partial_fc_step_under_data_parallelism_is_refused_before_anything_moves():
    from components.training.distributed import DataParallel
    from components.training.losses import optimisation_step

    train = Params().train
    head = MarginHead(8, 50, "arcface", 0.2, 16.0, sampled_classes=10)
    projection = torch.nn.Linear(4, 8)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=0.1)
    before = [t.detach().clone() for t in (head.weight, *projection.parameters())]
    embeddings, labels = projection(torch.randn(6, 4)), torch.tensor([1, 1, 2, 2, 3, 3])
    # Ranks would sample different classes from their shares; refused before any all-reduce or update.
    with pytest.raises(ValueError, match="does not run under data parallelism"):
        optimisation_step(head, optimizer, embeddings, labels, None, None, train, DataParallel(rank=0, world_size=2))
    assert all(torch.equal(a, b) for a, b in zip(before, (head.weight, *projection.parameters())))


def test_the_partial_fc_update_is_adamw_on_the_rows_it_touches():
    torch.manual_seed(1)
    head = MarginHead(4, 6, "arcface", 0.2, 16.0, sampled_classes=3)
    reference = torch.nn.Parameter(head.weight.detach().clone())
    adamw = torch.optim.AdamW([reference], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(3):  # every row touched each step: lazy Adam is then plain AdamW
        grad = torch.randn(6, 4)
        reference.grad = grad.clone()
        adamw.step()
        head.update_rows(torch.arange(6), grad, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        torch.testing.assert_close(head.weight.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert head.row_steps.tolist() == [3] * 6


# --- P x K sampling ----------------------------------------------------------------------------


def test_pk_batches_have_p_skus_with_k_images_each():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3 + [3] * 1 + [4] * 4)
    batches = pk_batches(labels, skus_per_batch=3, images_per_sku=2, rng=np.random.default_rng(0))
    assert len(batches) == len(labels) // 6
    for batch in batches:
        assert batch.shape == (6,)
        assert batch.min() >= 0 and batch.max() < len(labels)
        values, counts = np.unique(labels[batch], return_counts=True)
        assert len(values) == 3 and (counts == 2).all()


def test_pk_batches_draw_small_skus_with_replacement_and_cap_p():
    labels = np.array([0, 1, 1, 1])
    batches = pk_batches(labels, skus_per_batch=5, images_per_sku=3, rng=np.random.default_rng(1))
    assert len(batches) == 1  # at least one batch even when the data is smaller than P x K
    (batch,) = batches
    assert len(batch) == 2 * 3  # only 2 SKUs exist
    assert sorted(labels[batch].tolist()) == [0, 0, 0, 1, 1, 1]
    assert set(batch[labels[batch] == 0].tolist()) == {0}


def test_grouping_by_sku_is_one_pass_and_matches_the_per_sku_definition():
    from components.training.sampling import rows_by_label
    from components.training.stages import sku_means

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 50, size=600)
    grouped = rows_by_label(labels)
    assert list(grouped) == sorted(set(labels.tolist()))
    for label, rows in grouped.items():
        assert np.array_equal(rows, np.flatnonzero(labels == label))  # each label's rows, in row order
    embeddings = torch.from_numpy(rng.normal(size=(600, 8)).astype(np.float32))
    means = sku_means(embeddings, labels, 51)  # SKU 50 has no image
    for sku in range(50):
        torch.testing.assert_close(means[sku], embeddings[torch.from_numpy(labels == sku)].mean(0))
    assert torch.isnan(means[50]).all()


def test_pk_batches_are_reproducible_from_the_seed():
    labels = np.repeat(np.arange(6), 5)
    a = pk_batches(labels, 3, 2, np.random.default_rng(7))
    b = pk_batches(labels, 3, 2, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_with_catalogue_images_adds_each_batch_skus_catalogue_image_once():
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])  # rows 6 and 7 are the catalogue images of SKUs 0 and 1
    catalogue_rows = np.array([6, 7])
    batches = with_catalogue_images([np.array([0, 1, 2]), np.array([4, 5])], labels, catalogue_rows)
    assert batches[0].tolist() == [0, 1, 2, 6, 7]
    assert batches[1].tolist() == [4, 5]  # SKU 2 has no catalogue image


def test_catalogue_anchor_loss_prefers_the_own_catalogue_image():
    from components.training.losses import catalogue_anchor_loss

    anchors = torch.nn.functional.normalize(torch.eye(4)[:3], dim=-1)  # SKUs 0..2 have catalogue images, 3 has none
    anchor_labels = torch.tensor([0, 1, 2])
    near_own = torch.nn.functional.normalize(torch.eye(4)[:3] + 0.1, dim=-1)
    labels = torch.tensor([0, 1, 2])
    right = catalogue_anchor_loss(near_own, labels, anchors, anchor_labels, 0.2, 30.0)
    wrong = catalogue_anchor_loss(near_own, torch.tensor([1, 2, 0]), anchors, anchor_labels, 0.2, 30.0)
    assert torch.isfinite(right) and right < wrong
    # A photo of a SKU without a catalogue image is left out: no anchor to rank it against.
    alone = catalogue_anchor_loss(near_own[:1], torch.tensor([3]), anchors, anchor_labels, 0.2, 30.0)
    assert alone.item() == 0.0


def test_catalogue_anchor_loss_is_a_margin_softmax_over_the_anchor_skus_best_images():
    from components.training.losses import catalogue_anchor_loss

    generator = torch.Generator().manual_seed(0)
    photos = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    anchors = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    # A sample of a large catalogue: SKU 40 has two catalogue images, in no particular order;
    # the photo of SKU 9 has no anchor in the sample.
    anchor_labels = torch.tensor([70, 40, 12, 40, 3])
    labels = torch.tensor([40, 12, 70, 3, 9, 40])
    margin, scale = 0.3, 16.0

    # Written out: each anchor SKU scores its best image; the own SKU's score loses the margin.
    skus = sorted(set(anchor_labels.tolist()))
    terms = []
    for photo, label in zip(photos, labels.tolist()):
        if label not in skus:
            continue
        scores = torch.stack([max(photo @ anchors[i] for i in range(5) if anchor_labels[i] == sku) for sku in skus])
        scores[skus.index(label)] -= margin
        terms.append(torch.nn.functional.cross_entropy(scores[None] * scale, torch.tensor([skus.index(label)])))
    expected = torch.stack(terms).mean()

    assert torch.allclose(catalogue_anchor_loss(photos, labels, anchors, anchor_labels, margin, scale), expected)
    order = torch.tensor([3, 0, 4, 2, 1])  # the anchors' order does not matter
    assert torch.allclose(
        catalogue_anchor_loss(photos, labels, anchors[order], anchor_labels[order], margin, scale), expected
    )


def test_catalogue_anchors_are_the_whole_catalogue_up_to_the_sample_size():
    from components.training.sampling import CatalogueAnchors

    labels = np.array([5, 3, 8, 3, 1])
    for sample in (None, 5, 100):
        rng = np.random.default_rng(0)
        state = rng.bit_generator.state
        assert CatalogueAnchors(labels, sample).positions(np.array([3]), rng).tolist() == [0, 1, 2, 3, 4]
        assert rng.bit_generator.state == state  # no draw: training on a small catalogue is unchanged


def test_sampled_catalogue_anchors_hold_the_steps_skus_and_random_others():
    from components.training.sampling import CatalogueAnchors

    labels = np.repeat(np.arange(500), 2)[:999]  # 500 SKUs, two catalogue images each (SKU 499 one)
    anchor_set = CatalogueAnchors(labels, sample=64)
    rng = np.random.default_rng(0)
    step_skus = np.array([7, 7, 123, 499, 123])
    draws = [anchor_set.positions(step_skus, rng) for _ in range(3)]
    for positions in draws:
        assert len(positions) == 64 and len(set(positions.tolist())) == len(positions)
        assert positions.tolist() == sorted(positions.tolist())
        own = np.flatnonzero(np.isin(labels, step_skus))
        assert set(own.tolist()) <= set(positions.tolist())  # every image of the step's SKUs: the positives
        assert 0 <= positions.min() and positions.max() < len(labels)
        assert anchor_set.labels_at(torch.from_numpy(labels), positions).tolist() == labels[positions].tolist()
    assert not np.array_equal(draws[0], draws[1])  # drawn afresh each step

    # More positives than the sample size: all of them, no others.
    many = np.arange(0, 500, 5)
    assert anchor_set.positions(many, rng).tolist() == np.flatnonzero(np.isin(labels, many)).tolist()

    # A step whose SKUs have no catalogue image: every anchor is a drawn other.
    others = anchor_set.positions(np.array([600, 601]), rng)
    assert len(others) == 64 and len(set(others.tolist())) == 64 and others.max() < len(labels)


def test_training_samples_catalogue_anchors_beyond_the_sample_size(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    # 6 SKUs, one catalogue image each; batches of 2 SKUs x 2 images.
    def run(name: str, sample: str):
        params = train_params(
            tiny_clip_dir,
            synthetic_dataset,
            tmp_path / name,
            "train.sampler.batch_size=4",
            "train.sampler.unfrozen_batch_size=4",
            "train.loss.anchor_refresh_steps=1",
            f"train.sampler.anchor_sample={sample}",
        )
        result = train_encoder(params, manifest, progress=False)
        return [h["train.loss"] for h in result.history], (
            Path(params.train.io.output_dir) / "model.safetensors"
        ).read_bytes()

    whole_losses, whole_weights = run("whole", "null")
    # A sample as large as the catalogue is the whole catalogue: the same training, to the byte.
    assert run("as-large", "6") == (whole_losses, whole_weights)
    # A smaller one (the 2 SKUs of the step + 1 other) trains on other anchors, in both stages.
    sampled_losses, _ = run("sampled", "3")
    assert all(math.isfinite(loss) for loss in sampled_losses)
    assert sampled_losses[0] != whole_losses[0] and sampled_losses[-1] != whole_losses[-1]


# --- the unfrozen stage -----------------------------------------------------------------------


def test_shelf_augment_crops_tensors_and_photos_alike_and_keeps_hue():
    import random

    from PIL import Image

    from components.model import Preprocess
    from components.training.augment import ShelfAugment

    preprocess = Preprocess(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    augment = ShelfAugment(preprocess, random.Random(0), out_size=16)
    red = Image.new("RGB", (40, 30), (200, 30, 30))
    stored = augment.store.resize_crop(red)
    assert stored.dtype == torch.uint8 and tuple(stored.shape) == (3, 18, 18)  # 16 px x the store margin
    views = [augment(stored) for _ in range(4)] + [augment(red)]
    for view in views:
        assert view.dtype == torch.float32 and tuple(view.shape) == (3, 16, 16)
        red_mean, green_mean, blue_mean = view.mean(dim=(1, 2)).tolist()
        # Brightness, contrast and saturation move, the hue does not: a red pack stays red.
        assert red_mean > green_mean + 0.5 and red_mean > blue_mean + 0.5
    textured = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    first, second = augment(textured), augment(textured)
    assert not torch.allclose(first, second)


def test_colour_cast_tints_grey_only_when_asked_and_within_its_bound():
    import random

    from PIL import Image

    from components.model import Preprocess
    from components.training.augment import ShelfAugment

    preprocess = Preprocess(24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # views stay in [0, 1] pixel units
    grey = Image.new("RGB", (40, 40), (128, 128, 128))

    def channel_spreads(colour_cast: float) -> list[float]:
        augment = ShelfAugment(preprocess, random.Random(0), out_size=16, colour_cast=colour_cast)
        stored = augment.store.resize_crop(grey)
        spreads = []
        for _ in range(20):
            means = augment(stored).mean(dim=(1, 2))
            spreads.append(float(means.max() - means.min()))
        return spreads

    # Brightness, contrast and saturation keep grey grey; only the cast tints it, within its bound.
    assert max(channel_spreads(0.0)) < 1e-3
    tinted = channel_spreads(0.15)
    assert sum(spread > 0.02 for spread in tinted) >= 15
    # Gains 1 +- 0.15 on grey 0.5 brightened at most x1.3; contrast and saturation then stretch
    # the channels' differences by at most x1.3 each.
    assert max(tinted) <= 2 * 0.15 * (0.51 * 1.3) * 1.3 * 1.3


def test_erase_hides_one_solid_rectangle_of_the_crop_only_when_drawn():
    import random

    from PIL import Image

    from components.model import Preprocess
    from components.training.augment import ShelfAugment

    preprocess = Preprocess(48, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    textured = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def hidden_masks(erase: float) -> list[torch.Tensor]:
        # The erase is drawn after every other step, so with the same seed a first view with it
        # and one without differ exactly where the rectangle lies.
        masks = []
        for seed in range(40):
            plain, erased = (
                ShelfAugment(preprocess, random.Random(seed), out_size=32, erase=chance) for chance in (0.0, erase)
            )
            stored = plain.store.resize_crop(textured)
            masks.append((plain(stored) != erased(stored)).any(dim=0))
        return masks

    for mask in hidden_masks(1.0):
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert int(mask.sum()) == height * width  # one filled rectangle
        assert 0.015 <= float(mask.float().mean()) <= 0.35  # 2-33% of the crop, up to rounding
    assert 10 <= sum(bool(mask.any()) for mask in hidden_masks(0.5)) <= 30

    augment = ShelfAugment(preprocess, random.Random(0), out_size=32, erase=1.0)
    plain_view = ShelfAugment(preprocess, random.Random(0), out_size=32)(augment.store.resize_crop(textured))
    erased_view = augment(augment.store.resize_crop(textured))
    hidden = (plain_view != erased_view).any(dim=0)
    colours = erased_view[:, hidden]
    assert torch.allclose(colours, colours[:, :1].expand_as(colours))  # one solid colour


def test_shelf_augment_crops_only_as_much_of_the_image_as_crop_area_allows():
    import random

    from PIL import Image

    from components.model import Preprocess
    from components.training.augment import ShelfAugment

    # Black left half, white right half: a crop of the whole image always shows both.
    half_and_half = Image.fromarray(
        np.concatenate([np.zeros((64, 32, 3), np.uint8), np.full((64, 32, 3), 255, np.uint8)], axis=1)
    )
    preprocess = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def single_coloured_crops(crop_area) -> int:
        augment = ShelfAugment(preprocess, random.Random(0), out_size=32, crop_area=crop_area)
        stored = augment.store.resize_crop(half_and_half)
        return sum(float(augment(stored).std()) < 0.05 for _ in range(30))

    assert single_coloured_crops((1.0, 1.0)) == 0
    assert single_coloured_crops((0.05, 0.05)) >= 10  # a fifth of the side falls in one half most times


def test_augmentation_settings_are_part_of_the_cached_features_identity(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    # Stage 1's augmented views are cut with train.augment.crop_area, tinted with train.augment.colour_cast and
    # erased with train.augment.erase, so features cached with one setting must not be reused by a run
    # with another.
    for shaping in (
        ["train.augment.crop_area=[0.35,1.0]"],
        ["train.augment.crop_area=[0.6,1.0]"],
        ["train.augment.crop_area=[0.6,1.0]", "train.augment.colour_cast=0.1"],
        ["train.augment.crop_area=[0.6,1.0]", "train.augment.colour_cast=0.1", "train.augment.erase=0.5"],
    ):
        params = train_params(
            tiny_clip_dir,
            synthetic_dataset,
            tmp_path,
            "train.schedule.epochs=2",
            "train.augment.cached_views=3",
            *shaping,
        )
        train_encoder(params, manifest, progress=False)
    assert len(list((tmp_path / "checkpoints").glob("features-*"))) == 4


def fine_tuning_stage(tmp_path, synthetic_dataset, manifest, *extra: str):
    """A real CropTraining over the synthetic dataset with an untrained EfficientNet-Lite0."""
    import pandas as pd

    from components.data import select
    from components.training.stages import CropTraining

    params = load_params(
        None,
        [
            "model.backbone=efficientnet-lite0",
            "model.pretrained=false",
            "model.image_size=32",
            "model.embed_dim=16",
            "train.sampler.unfrozen_batch_size=12",
            "train.sampler.images_per_sku=2",
            "train.schedule.epochs=3",
            "train.schedule.frozen_epochs=1",
            "train.schedule.warmup_steps=2",
            f"data.root={synthetic_dataset}",
            *extra,
        ],
    )
    rows = pd.concat([select(manifest, split="train", role="query"), select(manifest, role="catalogue")]).reset_index(
        drop=True
    )
    sku_ids = sorted(rows["sku_id"].unique())
    labels = rows["sku_id"].map({s: i for i, s in enumerate(sku_ids)}).to_numpy()
    catalogue_rows = np.flatnonzero(rows["role"].to_numpy() == "catalogue")
    encoder, preprocess = build_encoder(params.model)
    head = MarginHead(encoder.embed_dim, len(sku_ids), "arcface", 0.2, 30.0)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(encoder.projection.parameters()) + list(head.parameters()), "lr": 1e-3},
            {"params": list(encoder.backbone.parameters()), "lr": 1e-3},
        ]
    )
    stage = CropTraining(
        preprocess,
        list(rows["image_path"]),
        catalogue_rows,
        params.train,
        params.evaluate.batch_size,
        torch.device("cpu"),
    )
    return params, stage, encoder, head, optimizer, labels, torch.from_numpy(labels[catalogue_rows])


def test_unfrozen_stage_trains_the_backbone_but_keeps_batchnorm_statistics(tmp_path, synthetic_dataset, manifest):
    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path, synthetic_dataset, manifest
    )
    assert stage.images.cache.dtype == torch.uint8 and stage.images.cache.shape[-1] == round(32 * 1.15)
    batchnorm = encoder.backbone.net._bn0
    conv = encoder.backbone.net._conv_stem.weight
    stats_before, weights_before = batchnorm.running_mean.clone(), conv.detach().clone()
    losses = stage.run_epoch(1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False)
    assert len(losses) == stage.steps_per_epoch and all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(conv.detach(), weights_before)  # the backbone learned
    assert torch.equal(batchnorm.running_mean, stats_before)  # with its pretrained statistics


def test_unfrozen_stage_re_embeds_only_the_sampled_catalogue_anchors(tmp_path, synthetic_dataset, manifest):
    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path,
        synthetic_dataset,
        manifest,
        "train.sampler.unfrozen_batch_size=4",
        "train.loss.anchor_refresh_steps=1",
        "train.sampler.anchor_sample=3",
    )
    embedded = []
    embed_rows = stage.embed_rows

    def recording_embed_rows(encoder, rows):
        embedded.append(rows.tolist())
        return embed_rows(encoder, rows)

    stage.embed_rows = recording_embed_rows
    losses = stage.run_epoch(1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False)
    assert len(losses) == stage.steps_per_epoch and all(math.isfinite(loss) for loss in losses)
    # One refresh per step (2 SKUs + 1 other), never the whole catalogue of 6.
    assert len(embedded) == stage.steps_per_epoch
    assert all(len(rows) == 3 and set(rows) <= set(stage.catalogue_rows.tolist()) for rows in embedded)


def test_unfrozen_stage_with_catalogue_images_in_batches_trains(tmp_path, synthetic_dataset, manifest):
    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path, synthetic_dataset, manifest, "train.sampler.catalogue_in_batches=true"
    )
    weights_before = encoder.backbone.net._conv_stem.weight.detach().clone()
    losses = stage.run_epoch(1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False)
    assert len(losses) == stage.steps_per_epoch and all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(encoder.backbone.net._conv_stem.weight.detach(), weights_before)


def test_unfrozen_stage_with_batch_statistics_updates_them(tmp_path, synthetic_dataset, manifest):
    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path, synthetic_dataset, manifest, "train.schedule.freeze_batchnorm=false"
    )
    batchnorm = encoder.backbone.net._bn0
    before = batchnorm.running_mean.clone()
    stage.run_epoch(1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False)
    assert not torch.equal(batchnorm.running_mean, before)


def test_frozen_epoch_on_crops_trains_only_the_projection_and_head(tmp_path, synthetic_dataset, manifest):
    # Batch statistics requested, yet a frozen backbone must not move them either.
    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path, synthetic_dataset, manifest, "train.schedule.freeze_batchnorm=false"
    )
    for parameter in encoder.backbone.parameters():
        parameter.requires_grad = False
    backbone_before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    projection_before = encoder.projection.weight.detach().clone()
    backbone_lr_before = optimizer.param_groups[1]["lr"]
    losses = stage.run_epoch(
        0, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False, backbone_frozen=True
    )
    assert len(losses) == stage.steps_per_epoch and all(math.isfinite(loss) for loss in losses)
    assert all(torch.equal(value, backbone_before[key]) for key, value in encoder.backbone.state_dict().items())
    assert not torch.equal(encoder.projection.weight.detach(), projection_before)
    assert optimizer.param_groups[1]["lr"] == backbone_lr_before  # the backbone schedule starts with stage 2


def test_frozen_stage_on_crops_runs_end_to_end_and_resumes(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    params = train_params(
        tiny_clip_dir,
        synthetic_dataset,
        tmp_path,
        "train.schedule.frozen_stage=crops",
        "train.sampler.unfrozen_batch_size=12",
    )
    crashing = RecordingTracker(fail_at_step=1)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(params, manifest, tracker=crashing, progress=False)
    tracker = RecordingTracker()
    result = train_encoder(params, manifest, tracker=tracker, progress=False)
    assert result.resumed_from_epoch == 1 and tracker.steps == [2]
    assert [record["train.frozen_backbone"] for record in result.history] == [1.0, 1.0, 0.0]
    # No cached features: every epoch measures the gate's protocol only, the last one too.
    assert "val.catalogue.top1" in result.history[0] and "val.nn.top1" not in result.history[0]
    assert EPOCH_KEYS <= set(result.history[-1]) and not NN_KEYS & set(result.history[-1])
    assert not list((tmp_path / "checkpoints").glob("features-*"))  # nothing was cached
    untrained, preprocess = build_encoder(params.model)
    before = evaluate_encoder(untrained, preprocess, manifest, "val", "train", params.evaluate)
    assert result.metrics["catalogue"]["delta_similarity"] > before["catalogue"]["delta_similarity"] + 0.05, (
        before["catalogue"],
        result.metrics["catalogue"],
    )


def test_decoded_images_keep_only_what_the_budget_holds_and_decode_the_rest_alike(
    tmp_path, synthetic_dataset, manifest
):
    from components.model import Preprocess
    from components.training.decoded_images import DecodedImages

    paths = list(manifest["image_path"])
    store = Preprocess(image_size=20, mean=(0.5,) * 3, std=(0.5,) * 3)
    everything = DecodedImages(paths, store, cache_bytes=len(paths) * 3 * 20 * 20)
    partly = DecodedImages(paths, store, cache_bytes=5 * 3 * 20 * 20 + 7)  # room for 5 images, not 6
    nothing = DecodedImages(paths, store, cache_bytes=0)
    assert (everything.cached_count, partly.cached_count, nothing.cached_count) == (len(paths), 5, 0)
    assert partly.cache.shape == (5, 3, 20, 20) and partly.cache.dtype == torch.uint8
    rows = np.array([len(paths) - 1, 0, 7, 4, 5, 3])
    assert torch.equal(everything.batch(rows), partly.batch(rows))
    assert torch.equal(everything.batch(rows), nothing.batch(rows))
    # Worker processes decode the same batches, in the same order.
    row_batches = [rows, rows[::-1].copy(), np.arange(8)]
    in_process = list(everything.batches(row_batches, workers=0))
    by_workers = list(nothing.batches(row_batches, workers=2))
    assert len(by_workers) == 3 and all(torch.equal(a, b) for a, b in zip(in_process, by_workers))


def test_unfrozen_epoch_trains_alike_whether_images_are_kept_or_decoded_by_workers(
    tmp_path, synthetic_dataset, manifest
):
    def one_epoch(*extra: str):
        torch.manual_seed(0)
        _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
            tmp_path, synthetic_dataset, manifest, *extra
        )
        losses = stage.run_epoch(1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False)
        return stage, losses, encoder.state_dict()

    kept, kept_losses, kept_weights = one_epoch()
    streamed, streamed_losses, streamed_weights = one_epoch("train.io.decoded_cache_mb=0", "train.io.loader_workers=1")
    assert kept.images.cached_count == len(kept.images) and streamed.images.cached_count == 0
    assert streamed_losses == kept_losses
    assert all(torch.equal(kept_weights[name], streamed_weights[name]) for name in kept_weights)


def test_backbone_lr_warms_up_then_decays_to_zero_by_the_last_step(tmp_path, synthetic_dataset, manifest):
    params, stage, *_ = fine_tuning_stage(tmp_path, synthetic_dataset, manifest)
    peak = params.train.schedule.backbone_lr
    schedule = [stage.backbone_lr(step) for step in range(stage.total_steps + 1)]
    assert schedule[0] == pytest.approx(peak / 2 * 0.5 * (1 + math.cos(0)))  # half-way through a 2-step warm-up
    assert max(schedule) <= peak and schedule[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(schedule[1:]))  # monotone after the warm-up


def test_clip_refuses_a_training_size_other_than_its_own(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path, "train.augment.image_size=24")
    with pytest.raises(ValueError, match="CLIP vision tower takes only its own input size"):
        train_encoder(params, manifest, progress=False)
    # Refused before any work: no feature cache, no checkpoint.
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_unfrozen_epoch_feeds_the_weight_average_every_step(tmp_path, synthetic_dataset, manifest):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    _, stage, encoder, head, optimizer, labels, catalogue_labels = fine_tuning_stage(
        tmp_path, synthetic_dataset, manifest
    )
    averaged = AveragedModel(encoder, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    start = encoder.backbone.net._conv_stem.weight.detach().clone()
    stage.run_epoch(
        1, encoder, head, optimizer, labels, catalogue_labels, np.random.default_rng(0), False, averaged=averaged
    )
    assert int(averaged.n_averaged) == stage.steps_per_epoch
    average = averaged.module.backbone.net._conv_stem.weight
    # Neither where the epoch started nor where it ended: between the two.
    assert not torch.equal(average, start) and not torch.equal(average, encoder.backbone.net._conv_stem.weight)


def test_weight_average_is_what_is_saved_and_survives_a_resume(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    from safetensors.torch import load_file

    params = train_params(
        tiny_clip_dir,
        synthetic_dataset,
        tmp_path,
        "train.schedule.epochs=4",
        "train.schedule.ema_decay=0.5",
        "train.sampler.unfrozen_batch_size=12",
    )
    crashing = RecordingTracker(fail_at_step=2)  # after epoch 2, the first unfrozen one, is checkpointed
    with pytest.raises(KeyboardInterrupt):
        train_encoder(params, manifest, tracker=crashing, progress=False)
    folder = tmp_path / "checkpoints" / run_fingerprint(params, None)
    # Frozen epochs keep no average; the first unfrozen epoch starts it.
    assert not (folder / "epoch-0001" / "averaged.safetensors").exists()
    steps = int(load_file(str(folder / "epoch-0002" / "averaged.safetensors"))["n_averaged"])
    assert steps > 0

    result = train_encoder(params, manifest, progress=False)
    assert result.resumed_from_epoch == 2
    last = folder / "epoch-0003"
    averaged = load_file(str(last / "averaged.safetensors"))
    assert int(averaged["n_averaged"]) == 2 * steps  # the resumed average went on, not over
    live = load_file(str(last / "encoder.safetensors"))
    saved, _, _ = load_encoder(result.model_dir)
    for key, value in saved.state_dict().items():
        assert torch.equal(value, averaged[f"module.{key}"]), key
    assert any(not torch.equal(value, live[key]) for key, value in saved.state_dict().items())


def test_cached_features_are_memory_mapped_files_and_a_reuse_trains_identically(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    params = train_params(
        tiny_clip_dir, synthetic_dataset, tmp_path, "train.schedule.epochs=2", "train.io.resume=false"
    )
    computed = train_encoder(params, manifest, progress=False)
    computed_weights = (Path(params.train.io.output_dir) / "model.safetensors").read_bytes()
    [folder] = (tmp_path / "checkpoints").glob("features-*")
    assert sorted(p.name for p in folder.iterdir()) == ["catalogue_views.npy", "evaluation.npy", "train_views.npy"]
    # Read back as memory maps: a large training set's features need not fit in memory.
    views = CachedFeatures.open(folder, evaluation_paths=[]).train_views
    assert isinstance(views, np.memmap) and views.dtype == np.float32
    assert views.shape[:2] == (params.train.augment.cached_views, 6 * 9)  # 6 SKUs x (8 photos + 1 catalogue image)

    reused = train_encoder(params, manifest, progress=False)  # same features: read, not computed
    assert [h["train.loss"] for h in reused.history] == [h["train.loss"] for h in computed.history]
    assert (Path(params.train.io.output_dir) / "model.safetensors").read_bytes() == computed_weights


def test_a_crash_while_caching_features_leaves_no_cache_that_looks_complete(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    encoder, preprocess = build_encoder(params.model)
    train_paths = list(manifest["image_path"][:8])
    evaluation_image = tmp_path / "moved-away.jpg"  # missing while the first run caches

    def cache():
        return cache_features(
            encoder,
            preprocess,
            train_paths,
            np.array([0]),
            [str(evaluation_image)],
            params.model,
            params.train,
            params.evaluate.batch_size,
            torch.device("cpu"),
            None,
        )

    with pytest.raises(FileNotFoundError):
        cache()
    checkpoints = tmp_path / "checkpoints"
    [partial] = checkpoints.iterdir()
    # Nothing a later run would take for a finished cache, and marked as this process's.
    assert partial.name.endswith(f".partial-{socket.gethostname()}-{os.getpid()}")

    # The image is back; the retry starts the partial folder afresh and completes it.
    shutil.copy(manifest["image_path"].iloc[9], evaluation_image)
    cached = cache()
    assert [p.name for p in checkpoints.iterdir()] == [partial.name.split(".partial-")[0]]
    assert cached.evaluation.shape == (1, encoder.feature_dim) and np.isfinite(cached.evaluation).all()


def test_caching_sweeps_partial_caches_of_exited_processes_only(tmp_path, tiny_clip_dir, synthetic_dataset, manifest):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    encoder, preprocess = build_encoder(params.model)
    checkpoints = tmp_path / "checkpoints"
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    host = socket.gethostname()
    # Other runs' partial caches: one whose process has exited, one of a live process (this
    # test's parent), one of another host (its processes cannot be checked from here).
    abandoned = checkpoints / f"features-aaaaaaaaaaaa.partial-{host}-{exited.pid}"
    busy = checkpoints / f"features-bbbbbbbbbbbb.partial-{host}-{os.getppid()}"
    elsewhere = checkpoints / f"features-cccccccccccc.partial-other-host-{exited.pid}"
    for folder in (abandoned, busy, elsewhere):
        folder.mkdir(parents=True)
        (folder / "train_views.npy").write_bytes(b"half written")
    cache_features(
        encoder,
        preprocess,
        list(manifest["image_path"][:4]),
        np.array([0]),
        [],
        params.model,
        params.train,
        params.evaluate.batch_size,
        torch.device("cpu"),
        None,
    )
    assert not abandoned.exists() and busy.is_dir() and elsewhere.is_dir()
    assert len(list(checkpoints.glob("features-????????????"))) == 1  # the finished cache


def test_a_cache_another_run_published_first_is_kept(tmp_path):
    from components.training.feature_cache import publish

    folder, partial = tmp_path / "features-x", tmp_path / "features-x.partial-host-1"
    for made, content in ((folder, b"first"), (partial, b"second")):
        made.mkdir()
        (made / "train_views.npy").write_bytes(content)
    publish(partial, folder)
    assert (folder / "train_views.npy").read_bytes() == b"first" and not partial.exists()

    publish(folder, tmp_path / "features-y")  # nothing there yet: a plain rename
    assert (tmp_path / "features-y" / "train_views.npy").read_bytes() == b"first"
    with pytest.raises(FileNotFoundError):  # a missing partial folder is an error, not a cache
        publish(tmp_path / "gone.partial-host-1", tmp_path / "features-z")


def test_evaluation_features_of_training_images_are_copied_not_embedded_again(
    tmp_path, tiny_clip_dir, synthetic_dataset, manifest
):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    encoder, preprocess = build_encoder(params.model)
    train_paths = list(select(manifest, split="train")["image_path"][:8])
    query_path = select(manifest, split="val")["image_path"].iloc[0]
    embedded = []
    encoder.backbone.register_forward_pre_hook(lambda _, inputs: embedded.append(len(inputs[0])))
    cached = cache_features(
        encoder,
        preprocess,
        train_paths,
        np.array([0]),
        [train_paths[3], query_path, train_paths[0]],
        params.model,
        params.train,
        params.evaluate.batch_size,
        torch.device("cpu"),
        None,
    )
    # Every training view and extra catalogue view, then the one image training does not hold.
    cfg = params.train
    assert sum(embedded) == cfg.augment.cached_views * 8 + (cfg.augment.catalogue_views - 1) + 1
    np.testing.assert_array_equal(cached.evaluation[0], cached.train_views[0, 3])
    np.testing.assert_array_equal(cached.evaluation[2], cached.train_views[0, 0])
    query = embed_images(encoder, preprocess, [query_path], features_only=True)[0]
    np.testing.assert_allclose(cached.evaluation[1], query, rtol=1e-5, atol=1e-6)


def test_embed_images_refuses_an_output_array_of_the_wrong_shape(tiny_clip_dir, synthetic_dataset, tmp_path, manifest):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    encoder, preprocess = build_encoder(params.model)
    paths = list(manifest["image_path"][:3])
    with pytest.raises(ValueError, match=r"3 images of dimension 16 need \(3, 16\)"):
        embed_images(encoder, preprocess, paths, out=np.zeros((2, 16), dtype=np.float32))
    into = np.zeros((3, 16), dtype=np.float32)
    assert embed_images(encoder, preprocess, paths, out=into) is into
    np.testing.assert_array_equal(into, embed_images(encoder, preprocess, paths))


def test_cached_features_embed_alike_in_one_chunk_or_many(tiny_clip_dir, synthetic_dataset, tmp_path):
    params = train_params(tiny_clip_dir, synthetic_dataset, tmp_path)
    encoder, _ = build_encoder(params.model)
    features = np.random.default_rng(0).normal(size=(10, encoder.feature_dim)).astype(np.float32)
    with torch.no_grad():
        whole = embed_cached(encoder, features, torch.device("cpu"))
        chunked = embed_cached(encoder, features, torch.device("cpu"), chunk_rows=3)
        empty = embed_cached(encoder, features[:0], torch.device("cpu"))
    assert whole.shape == (10, 16) and empty.shape == (0, 16)
    torch.testing.assert_close(chunked, whole)
