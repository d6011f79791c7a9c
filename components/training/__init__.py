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

from components.training.recipe import NullTracker, Tracker, TrainResult, train_encoder, training_setup

__all__ = ["NullTracker", "Tracker", "TrainResult", "train_encoder", "training_setup"]
