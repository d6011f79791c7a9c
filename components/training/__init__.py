"""Metric-learning fine-tuning of an encoder, one job per module.

- :mod:`~components.training.losses`: the margin head and the catalogue-anchor loss;
- :mod:`~components.training.sampling`: P x K batches and catalogue anchors;
- :mod:`~components.training.augment`: shelf-like augmentation;
- :mod:`~components.training.feature_cache`: the frozen stage's cached backbone features;
- :mod:`~components.training.decoded_images`: decoded training images within a memory budget;
- :mod:`~components.training.checkpoints`: per-epoch checkpoints and resume;
- :mod:`~components.training.stages`: the two stages (cached features, augmented crops);
- :mod:`~components.training.distributed`: data parallelism under ``torchrun`` (gloo / NCCL);
- :mod:`~components.training.recipe`: :func:`train_encoder`, which chains them.
"""

__all__ = ["NullTracker", "Tracker", "TrainResult", "train_encoder", "training_setup"]


def __getattr__(name: str):
    # The recipe imports the model stack (transformers, timm); importing one small module such
    # as the losses should not pay for it (benchmark and worker processes start faster).
    if name in __all__:
        from components.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
