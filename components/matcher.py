"""What a served model does with photos: embed them, search its catalogue index, apply the threshold.

Pure: no MLflow and no HTTP. Serving loads a :class:`ServedModel` with :func:`load_served_model`,
from folders the registry downloaded (:func:`components.registry.download_version`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from components.config import ServeParams
from components.embedder import ImageEmbedder, build_embedder
from components.index import CatalogueIndex, IndexMismatchError
from components.index.indexing import open_catalogue
from components.model import load_encoder, resolve_device

DEFAULT_BATCH_SIZE = ServeParams.model_fields["batch_size"].default


class Lanes(Protocol):
    """Threads that run torch side by side, each with its own intra-op threads (``serving.inference.TorchLanes``)."""

    count: int

    def map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]: ...


class ServedModel:
    """An encoder with its verified catalogue index: what the matching service runs.

    Built by :func:`load_served_model`, which refuses an index that does not match the
    model version (checksum or version), so a service never answers from a stale index. Queries
    are embedded by the production embedder on the runtime the index's vectors were made with
    (:mod:`components.embedder`; its ONNX graph, when it keeps one).
    """

    def __init__(
        self,
        encoder,
        preprocess,
        catalogue: CatalogueIndex,
        model_name: str,
        version: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        embedder: ImageEmbedder | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.encoder, self.preprocess, self.catalogue = encoder, preprocess, catalogue
        self.model_name, self.version, self.batch_size = model_name, version, batch_size
        self.embedder = embedder or build_embedder(encoder, preprocess, batch_size=batch_size)

    @property
    def index_checksum(self) -> str:
        """The SHA-256 checksum of the index this model searches (verified when it was loaded)."""
        return str(self.catalogue.meta.get("checksum", ""))

    def embed(self, images: list, lanes: Lanes | None = None) -> np.ndarray:
        """Unit-norm query embeddings of PIL images, one row each (what :meth:`match` searches with).

        Every photo is cut into its view rows (each query zoom and its mirror), and a forward pass
        takes ``batch_size`` photos' worth of rows (``serve.batch_size``): a row's embedding does
        not depend on what else is in its pass, and on a CPU small passes are faster per image.
        With ``lanes`` the rows are shared out among them, so one photo's six views keep two cores
        busy, where torch's intra-op threads scale less well on a network this small.
        """
        if not images:
            return np.zeros((0, self.encoder.embed_dim), dtype=np.float32)
        run = lanes.map if lanes else map
        rows = np.concatenate(list(run(self._query_rows, images)))
        count = lanes.count if lanes else 1
        bounds = [round(part * len(rows) / count) for part in range(count + 1)]
        parts = [rows[start:end] for start, end in zip(bounds, bounds[1:]) if end > start]
        embedded = np.concatenate(list(run(self.embedder.embed_rows, parts)))
        return self.embedder.pool(embedded, as_queries=True)

    def _query_rows(self, image) -> np.ndarray:
        return self.embedder.pixel_rows(image, as_queries=True)

    @property
    def reject_below(self) -> float | None:
        """The calibrated open-set threshold: a score below it is no confident match."""
        value = self.catalogue.meta.get("reject_below")
        return None if value is None else float(value)

    def match(self, images: list, top_k: int = 5, lanes: Lanes | None = None) -> list[list[dict[str, Any]]]:
        """The ``top_k`` SKUs for each image, best first: ``[{"sku_id", "score", "confident"}, ...]``.

        ``confident`` is False for a score below the calibrated threshold (always True when the
        index carries none): the photo may show a product the catalogue does not have.
        """
        return self.match_vectors(self.embed(images, lanes), top_k) if images else []

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
    onnx_threads: int | None = None,
) -> ServedModel:
    """Load an encoder and its index, verifying the index against the model version.

    Args:
        device: where the encoder runs: ``cpu``, ``cuda``, or ``auto`` (CUDA when torch sees one).
        onnx_threads: intra-op threads of each ONNX Runtime call, for an index embedded on an ONNX
            runtime; ``None`` = this thread's torch threads.

    Raises:
        IndexMismatchError: the index is corrupt, or not the one recorded for ``version``.
        FileNotFoundError: the encoder folder is incomplete.
    """
    catalogue = open_catalogue(index_dir, expected_checksum=index_checksum, expected_model_version=version)
    encoder, preprocess, _ = load_encoder(encoder_dir, resolve_device(device))
    if catalogue.dim != encoder.embed_dim:
        raise IndexMismatchError(f"index dimension {catalogue.dim} != encoder embedding size {encoder.embed_dim}")
    runtime = catalogue.meta.get("embedding_runtime", "torch")
    embedder = build_embedder(encoder, preprocess, runtime, catalogue.embedder_graph, onnx_threads, batch_size)
    return ServedModel(encoder, preprocess, catalogue, model_name, version, batch_size, embedder)
