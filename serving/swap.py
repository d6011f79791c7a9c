"""Hot swap: notice that the registry's ``@champion`` (or its index) changed, and serve it without a restart.

A check reads what ``@champion`` points at (version and index checksum). When that differs from
what is served, the new version's encoder and index are downloaded and loaded beside the served
pair, verified as at start-up (checksum and model version, ``load_served_model``), and put
through a self-test match. Only then does the slot point at the new pair, in one assignment:
requests that already hold the old pair finish on it, later ones get the new one. A check that
fails at any step leaves the old pair serving and records why (``ModelSlot.last_check``).

Checks run when ``POST /admin/reload`` asks and, with ``serve.reload_poll_seconds`` above 0, on a
timer. Each worker process holds its own slot: with several workers, the timer is what brings
every worker over (the admin route reloads the worker that answers it).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serving.inference import in_short_lived_thread

LOGGER = logging.getLogger(__name__)


class SelfTestError(RuntimeError):
    """A loaded model whose test match did not behave as a served model must."""


def self_test(served) -> None:
    """Match a fixed test image and a stored catalogue vector; raise if anything is off.

    Checks that a query embeds to one finite unit vector of the index's dimension and finds
    SKUs with finite scores, and (where the index can give a stored vector back) that a catalogue
    row's own vector finds itself with its own similarity.

    Raises:
        SelfTestError: any of those checks failed.
    """
    from PIL import Image

    pixels = np.linspace(0, 255, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3).astype(np.uint8)
    vectors = served.embed([Image.fromarray(pixels)])
    if vectors.shape != (1, served.catalogue.dim) or not np.all(np.isfinite(vectors)):
        raise SelfTestError(f"a test image embedded to shape {vectors.shape} with non-finite values")
    if abs(float(np.linalg.norm(vectors[0])) - 1.0) > 1e-3:
        raise SelfTestError("a test image's embedding is not unit length")
    hits = served.match_vectors(vectors, 1)
    if len(hits) != 1 or len(hits[0]) != 1 or not np.isfinite(hits[0][0]["score"]):
        raise SelfTestError(f"a test match returned {hits}")
    stored = served.catalogue.stored_vector(0)
    if stored is None:  # an index saved without its vectors, on codes that cannot give one back
        return
    found = served.catalogue.search(np.asarray(stored, dtype=np.float32)[None], 1)[0]
    expected = float(np.dot(stored, stored))
    if not found or abs(found[0][1] - expected) > 1e-3:
        raise SelfTestError(
            f"catalogue row 0 did not find itself (score {found[0][1] if found else None}, expected {expected:.4f})"
        )


@dataclass
class CheckResult:
    """What one check of the registry found and did."""

    outcome: str  # "swapped", "unchanged" or "failed"
    model_version: str
    index_checksum: str
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    error: Optional[str] = None
    previous_version: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Loader = Callable[[str, Path], Any]  # (version, scratch folder) -> a loaded, verified ServedModel


def _load_and_test(load: Loader, version: str, folder: Path):
    candidate = load(version, folder)
    self_test(candidate)
    return candidate


class ModelSlot:
    """The pair being served, replaced atomically by :meth:`check`.

    Args:
        served: the pair served at start-up (the packaged one).
        target: returns ``(version, index checksum)`` that ``@champion`` points at now.
        load: downloads and loads a version into a scratch folder, verifying it.
        on_swap: called with the new pair after each swap (metrics labels, logs).
    """

    def __init__(
        self,
        served,
        target: Callable[[], tuple[str, Optional[str]]],
        load: Loader,
        on_swap: Callable[[Any], None] | None = None,
    ) -> None:
        self.current = served
        self._target, self._load, self._on_swap = target, load, on_swap
        self._lock = threading.Lock()
        self._folder: Path | None = None
        self._stop = threading.Event()
        self.last_check: CheckResult | None = None

    def check(self) -> CheckResult:
        """Compare ``@champion`` with what is served, and swap to it if it changed and verifies.

        Checks are serialised: one that arrives while another runs waits for it.
        """
        with self._lock:
            result = self._check()
            self.last_check = result
            return result

    def _check(self) -> CheckResult:
        served = self.current
        try:
            version, checksum = self._target()
        except Exception as err:  # noqa: BLE001 - the registry unreachable must not stop serving
            LOGGER.error("hot swap: could not read @champion: %s; still serving version %s", err, served.version)
            return CheckResult("failed", served.version, served.index_checksum, error=f"reading @champion: {err}")
        if version == served.version and checksum == served.index_checksum:
            return CheckResult("unchanged", served.version, served.index_checksum)
        folder = Path(tempfile.mkdtemp(prefix="skumatch-swap-"))
        try:
            candidate = in_short_lived_thread(_load_and_test, self._load, version, folder)
        except Exception as err:  # noqa: BLE001 - a bad candidate keeps the old pair serving
            shutil.rmtree(folder, ignore_errors=True)
            LOGGER.error(
                "hot swap to version %s (index %s) refused: %s: %s; still serving version %s",
                version,
                checksum,
                type(err).__name__,
                err,
                served.version,
            )
            return CheckResult(
                "failed", served.version, served.index_checksum, error=f"version {version}: {type(err).__name__}: {err}"
            )
        self.current = candidate  # one assignment: a request sees the old pair or the new, never a mix
        old_folder, self._folder = self._folder, folder
        if old_folder is not None:
            shutil.rmtree(old_folder, ignore_errors=True)  # everything served is in memory
        LOGGER.info(
            "hot swap: version %s (index %s) -> version %s (index %s)",
            served.version,
            served.index_checksum,
            candidate.version,
            candidate.index_checksum,
        )
        if self._on_swap:
            self._on_swap(candidate)
        return CheckResult("swapped", candidate.version, candidate.index_checksum, previous_version=served.version)

    def poll(self, every_seconds: float, on_result: Callable[[CheckResult], None] | None = None) -> threading.Thread:
        """Check every ``every_seconds`` on a daemon thread until :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(every_seconds):
                result = self.check()
                if on_result:
                    on_result(result)

        thread = threading.Thread(target=loop, name="skumatch-champion-poll", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop polling and remove the downloaded files."""
        self._stop.set()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def registry_loader(tracking_uri: str, model_name: str, batch_size: int, device: str, onnx_threads: int | None = None):
    """``(target, load)`` for :class:`ModelSlot` backed by the MLflow registry at ``tracking_uri``
    (``onnx_threads``: see :func:`components.matcher.load_served_model`)."""
    from mlflow import MlflowClient

    from components import registry
    from components.matcher import load_served_model

    def client():
        return MlflowClient(tracking_uri, tracking_uri)

    def target() -> tuple[str, Optional[str]]:
        return registry.alias_target(client(), model_name, registry.CHAMPION)

    def load(version: str, folder: Path):
        resolved = registry.download_version(client(), model_name, version, dst=folder)
        return load_served_model(
            resolved.encoder_dir,
            resolved.index_dir,
            model_name,
            resolved.version,
            resolved.index_checksum,
            batch_size,
            device,
            onnx_threads,
        )

    return target, load
