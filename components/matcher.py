"""What a served model does with photos: embed them, search its catalogue index, apply the threshold.

Pure: no MLflow and no HTTP. Serving loads a :class:`ServedModel` with :func:`load_served_model`,
from folders the registry downloaded (:func:`components.registry.download_version`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from components.config import ServeParams
from components.index import CatalogueIndex, IndexMismatchError, load_index
from components.model import embed_batch, load_encoder, resolve_device

DEFAULT_BATCH_SIZE = ServeParams.model_fields["batch_size"].default


class ServedModel:
    """An encoder with its verified catalogue index: what the matching service runs.

    Built by :func:`load_served_model`, which refuses an index that does not match the
    model version (checksum or version), so a service never answers from a stale index.
    """

    def __init__(
        self,
        encoder,
        preprocess,
        catalogue: CatalogueIndex,
        model_name: str,
        version: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.encoder, self.preprocess, self.catalogue = encoder, preprocess, catalogue
        self.model_name, self.version, self.batch_size = model_name, version, batch_size

    @property
    def index_checksum(self) -> str:
        """The SHA-256 checksum of the index this model searches (verified when it was loaded)."""
        return str(self.catalogue.meta.get("checksum", ""))

    def embed(self, images: list) -> np.ndarray:
        """Unit-norm query embeddings of PIL images, one row each (what :meth:`match` searches with).

        The images are embedded ``batch_size`` at a time (``serve.batch_size``): a batch's rows do
        not depend on what else is in it, and on a CPU small batches are faster per image.
        """
        if not images:
            return np.zeros((0, self.encoder.embed_dim), dtype=np.float32)
        return np.concatenate(
            [
                embed_batch(
                    self.encoder, self.preprocess, images[start : start + self.batch_size], as_queries=True
                ).numpy()
                for start in range(0, len(images), self.batch_size)
            ]
        )

    @property
    def reject_below(self) -> float | None:
        """The calibrated open-set threshold: a score below it is no confident match."""
        value = self.catalogue.meta.get("reject_below")
        return None if value is None else float(value)

    def match(self, images: list, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """The ``top_k`` SKUs for each image, best first: ``[{"sku_id", "score", "confident"}, ...]``.

        ``confident`` is False for a score below the calibrated threshold (always True when the
        index carries none): the photo may show a product the catalogue does not have.
        """
        return self.match_vectors(self.embed(images), top_k) if images else []

    def match_vectors(self, vectors: np.ndarray, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """:meth:`match` for query embeddings already made by :meth:`embed`."""
        results = self.catalogue.search(vectors, top_k) if len(vectors) else []
        threshold = self.reject_below
        return [
            [
                {"sku_id": sku, "score": round(score, 6), "confident": threshold is None or score >= threshold}
                for sku, score in hits
            ]
            for hits in results
        ]


def load_served_model(
    encoder_dir: str | Path,
    index_dir: str | Path,
    model_name: str,
    version: str,
    index_checksum: str | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
) -> ServedModel:
    """Load an encoder and its index, verifying the index against the model version.

    Args:
        device: where the encoder runs: ``cpu``, ``cuda``, or ``auto`` (CUDA when torch sees one).

    Raises:
        IndexMismatchError: the index is corrupt, or not the one recorded for ``version``.
        FileNotFoundError: the encoder folder is incomplete.
    """
    catalogue = load_index(index_dir, expected_checksum=index_checksum, expected_model_version=version)
    encoder, preprocess, _ = load_encoder(encoder_dir, resolve_device(device))
    if catalogue.dim != encoder.embed_dim:
        raise IndexMismatchError(f"index dimension {catalogue.dim} != encoder embedding size {encoder.embed_dim}")
    return ServedModel(encoder, preprocess, catalogue, model_name, version, batch_size)
