"""The typed params tree: defaults, typed dotted overrides, and loud errors naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import Params, ParamsError, apply_overrides, flatten_params, load_params


def test_defaults_load_without_a_file():
    params = load_params(None)
    assert isinstance(params, Params)
    assert params == Params()
    assert params.train.schedule.epochs == 18
    assert params.evaluate.ks == [1, 3, 5]
    assert params.model.backbone == "efficientnet-lite0"


def test_the_repository_params_yaml_validates():
    # params.yaml is the file every stage reads; it must fit the tree.
    repo_params = Path(__file__).resolve().parents[2] / "params.yaml"
    assert repo_params.is_file()
    assert isinstance(load_params(repo_params), Params)


def test_typed_defaults_are_the_recipe_params_yaml_gives():
    # A tree built in code (a notebook, a test, another flow) must train what the retrain flow
    # trains. The differences allowed are the two tied to the default backbone's input size:
    # the 192 px training crop and the query zooms measured with it.
    repo_params = Path(__file__).resolve().parents[2] / "params.yaml"
    typed, recipe = flatten_params(Params()), flatten_params(load_params(repo_params))
    differences = {key for key, value in typed.items() if recipe[key] != value}
    assert differences == {"train.augment.image_size", "model.query_zooms"}


def test_dotted_overrides_are_typed():
    params = load_params(
        None,
        [
            "train.schedule.epochs=3",
            "evaluate.ks=[1,2]",
            "train.schedule.lr=0.05",
            "train.augment.enabled=false",
            "model.image_size=16",
            "data.max_images_per_sku=null",
            "index.factory=HNSW32",
        ],
    )
    assert params.train.schedule.epochs == 3 and type(params.train.schedule.epochs) is int
    assert params.evaluate.ks == [1, 2]
    assert params.train.schedule.lr == pytest.approx(0.05) and isinstance(params.train.schedule.lr, float)
    assert params.train.augment.enabled is False
    assert params.model.image_size == 16
    assert params.data.max_images_per_sku is None
    assert params.index.factory == "HNSW32"
    # Untouched keys keep their defaults.
    assert params.train.sampler.batch_size == Params().train.sampler.batch_size


def test_flat_train_keys_of_earlier_files_are_refused_with_their_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  epochs: 5\n  loss: cosface\n  augment: false\n")
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    message = str(refused.value)
    for moved in (
        "train.epochs is now train.schedule.epochs",
        "train.loss is now train.loss.kind",
        "train.augment is now train.augment.enabled",
    ):
        assert moved in message
    with pytest.raises(ParamsError, match="train.lr is now train.schedule.lr"):
        load_params(None, ["train.lr=0.1"])


def test_the_flat_recipe_keeps_the_fingerprint_of_earlier_files():
    # Checkpoint and feature-cache folders are named by hashes of the flat recipe; its keys are
    # those of the flat train section, with the same values.
    flat = Params().train.flat()
    assert len(flat) == 36 and flat["epochs"] == 18 and flat["loss"] == "arcface" and flat["augment"] is True


def test_overrides_apply_on_top_of_a_file(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("train:\n  schedule:\n    epochs: 5\n    lr: 0.01\nevaluate:\n  min_top1: 0.9\n")
    params = load_params(path, ["train.schedule.epochs=2"])
    assert params.train.schedule.epochs == 2  # the override wins
    assert params.train.schedule.lr == pytest.approx(0.01)  # the file beats the default
    assert params.evaluate.min_top1 == pytest.approx(0.9)


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"train": {"schedule": {"epochs": 5}}}
    result = apply_overrides(raw, ["train.schedule.epochs=7", "model.embed_dim=16"])
    assert raw == {"train": {"schedule": {"epochs": 5}}}
    assert result == {"train": {"schedule": {"epochs": 7}}, "model": {"embed_dim": 16}}


@pytest.mark.parametrize(
    "override, path",
    [
        ("train.epochz=3", "train.epochz"),
        ("trainn.epochs=3", "trainn"),
        ("model.backbone_name=x", "model.backbone_name"),
    ],
)
def test_unknown_key_is_rejected_naming_the_path(override, path):
    with pytest.raises(ParamsError) as info:
        load_params(None, [override])
    assert path in str(info.value)


def test_unknown_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ParamsError, match=r"train\.epoch"):
        load_params(path)


@pytest.mark.parametrize(
    "override, path",
    [
        ("train.schedule.epochs=three", "train.schedule.epochs"),
        ("train.schedule.epochs=0", "train.schedule.epochs"),  # ge=1
        ("evaluate.min_top1=1.5", "evaluate.min_top1"),  # le=1
        ("model.backbone=resnet50", "model.backbone"),  # not one of the literals
        ("evaluate.ks=fast", "evaluate.ks"),
        ("train.augment.crop_area=[0.5]", "train.augment.crop_area"),  # [smallest, largest]
        ("index.ef_search=0", "index.ef_search"),  # ge=1
        ("train.augment.crop_area=[0,1]", "train.augment.crop_area"),  # an empty crop
        ("train.augment.crop_area=[0.5,1.2]", "train.augment.crop_area"),  # more than the image
        ("train.io.decoded_cache_mb=-1", "train.io.decoded_cache_mb"),  # ge=0
        ("train.io.loader_workers=-1", "train.io.loader_workers"),  # ge=0
        ("train.augment.crop_area=[0.8,0.3]", "train.augment.crop_area"),  # reversed
        ("train.sampler.anchor_sample=0", "train.sampler.anchor_sample"),  # ge=1 (null = every catalogue image)
        ("train.augment.colour_cast=-0.1", "train.augment.colour_cast"),  # ge=0
        ("train.augment.colour_cast=1.0", "train.augment.colour_cast"),  # a gain of 0 would black a channel out
        ("train.augment.erase=-0.1", "train.augment.erase"),  # a chance: ge=0
        ("train.augment.erase=1.5", "train.augment.erase"),  # le=1
    ],
)
def test_wrong_type_or_range_is_rejected(override, path):
    with pytest.raises(ParamsError) as info:
        load_params(None, [override])
    assert path in str(info.value)


def test_override_into_a_scalar_is_rejected(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match="epochs"):
        load_params(path, ["train.schedule.epochs.value=3"])


@pytest.mark.parametrize("override", ["train.schedule.epochs", "train.schedule.epochs:3", ""])
def test_override_without_equals_is_rejected(override):
    with pytest.raises(ParamsError, match="section.key=value"):
        load_params(None, [override])


def test_override_naming_no_key_is_rejected():
    with pytest.raises(ParamsError, match="names no key"):
        load_params(None, ["=3"])


def test_missing_explicit_file_is_rejected(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "experiment.yaml")


def test_invalid_yaml_and_non_mapping_files_are_rejected(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(listing)


def test_flatten_params_gives_dotted_string_values():
    flat = flatten_params(load_params(None, ["train.schedule.epochs=3", "evaluate.ks=[1,2]"]))
    assert flat["train.schedule.epochs"] == "3"
    assert flat["evaluate.ks"] == "[1, 2]"
    assert flat["model.backbone"] == "efficientnet-lite0"
    assert all(isinstance(v, str) for v in flat.values())


def test_string_field_accepts_a_number_looking_override():
    params = load_params(None, ["registry.experiment=2024"])
    assert params.registry.experiment == "2024"
