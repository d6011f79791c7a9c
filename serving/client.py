"""A small typed client of the matching service (``serving.service``), on httpx.

```python
from serving.client import SkumatchClient

with SkumatchClient("http://127.0.0.1:3000", api_key="...") as client:
    best = client.match("photo.jpg", top_k=3).matches[0]
    for result in client.match_batch(["a.jpg", "b.jpg", "c.jpg"]):
        print(result.matches[0].sku_id, result.model_version)
```

Every refusal the service gives is JSON ``{"error", "reason", ...}`` (``serving.refusals``); the
client raises it as :class:`SkumatchError`. Network failures are httpx's own exceptions
(``httpx.TransportError``): the service never answered, so there is no status or reason to give.

The client imports nothing of the service's (no BentoML, torch or pydantic models), so a caller
needs only httpx.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import httpx

Image = Union[str, Path, bytes]

# Multipart framing per file (boundary, Content-Disposition, Content-Type lines) is ~150 bytes;
# this leaves room for long file names so a chunk sized by its files' bytes stays under the
# service's max_request_bytes.
PART_OVERHEAD_BYTES = 1024
# The reason the service's refusals carry when a request held too many images or bytes: a
# sign the cached limits are stale (a server restarted with other limits).
_LIMIT_REASONS = ("max_images_per_request", "max_request_bytes")


@dataclass(frozen=True)
class Match:
    """One catalogue SKU in an answer.

    Attributes:
        sku_id: the catalogue SKU.
        score: cosine similarity of the photo to the SKU's closest catalogue image (1 = identical).
        confident: False below the model's calibrated open-set threshold (``reject_below``).
    """

    sku_id: str
    score: float
    confident: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Match:
        return cls(str(data["sku_id"]), float(data["score"]), bool(data.get("confident", True)))


@dataclass(frozen=True)
class MatchResult:
    """The answer of ``POST /match``: the best SKUs for one photo and the model that found them.

    Attributes:
        model_name, model_version, index_checksum: the encoder and index pair that answered
            (the service may swap in a newer ``@champion`` between two requests).
        matches: best first, distinct SKUs.
        no_confident_match: even the best SKU is below ``reject_below``: likely a product that is
            not in the catalogue.
        reject_below: the open-set threshold of this model, None when it has none.
    """

    model_name: str
    model_version: str
    index_checksum: str
    matches: tuple[Match, ...]
    no_confident_match: bool = False
    reject_below: Optional[float] = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MatchResult:
        return cls(
            str(data["model_name"]),
            str(data["model_version"]),
            str(data["index_checksum"]),
            tuple(Match.from_json(hit) for hit in data["matches"]),
            bool(data.get("no_confident_match")),
            _optional_float(data.get("reject_below")),
        )


@dataclass(frozen=True)
class ImageResult:
    """One photo's answer from ``POST /match_batch``.

    Each carries the model of its own request: when :meth:`SkumatchClient.match_batch` splits a
    list into several requests, a hot swap between them can answer the parts with different
    versions.

    Attributes:
        matches: best first, distinct SKUs.
        no_confident_match: even the best SKU is below ``reject_below``.
        model_name, model_version, index_checksum: the encoder and index pair that answered.
        reject_below: that model's open-set threshold, None when it has none.
    """

    matches: tuple[Match, ...]
    no_confident_match: bool = False
    model_name: str = ""
    model_version: str = ""
    index_checksum: str = ""
    reject_below: Optional[float] = None


@dataclass(frozen=True)
class RefusedImage:
    """An image ``/match_batch`` refused: its position in the caller's list, why, and the reason key."""

    index: int
    error: str
    reason: Optional[str] = None


class SkumatchError(RuntimeError):
    """The service answered with an error status.

    Attributes:
        status: the HTTP status (400, 401, 403, 409, 413, ...).
        reason: the refusal's short key (``corrupt``, ``unauthorized``, ``no_registry``, ...); None
            when the body had none (BentoML's own errors, or a proxy in between).
        message: what was wrong, as the service said it.
        bad_images: for ``/match_batch``, each refused image with its index in the list the caller
            passed (not in the request that carried it).
        body: the whole decoded JSON body (``{}`` when it was not JSON), for any further detail.
    """

    def __init__(
        self,
        status: int,
        reason: Optional[str],
        message: str,
        bad_images: Sequence[RefusedImage] = (),
        body: Optional[dict[str, Any]] = None,
    ) -> None:
        self.status, self.reason, self.message = status, reason, message
        self.bad_images = tuple(bad_images)
        self.body = dict(body or {})
        super().__init__(status, reason, message, self.bad_images)

    def __str__(self) -> str:
        head = f"HTTP {self.status}" + (f" ({self.reason})" if self.reason else "") + f": {self.message}"
        return "\n".join([head, *(f"  image {bad.index}: {bad.error}" for bad in self.bad_images)])

    @classmethod
    def from_response(cls, response: httpx.Response, offset: int = 0) -> SkumatchError:
        """The error a non-2xx response stands for.

        Args:
            response: the service's answer.
            offset: the position in the caller's list of the request's first image, added to each
                ``bad_images[].index``.
        """
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Not the service's JSON (a proxy's page, a crash): keep the start of the text readable.
            text = response.text.strip()
            return cls(response.status_code, None, text[:500] or response.reason_phrase)
        bad = [
            RefusedImage(int(item["index"]) + offset, str(item.get("error", "")), item.get("reason"))
            for item in body.get("bad_images") or []
            if isinstance(item, dict) and "index" in item
        ]
        # Refusals from the service's middleware and handlers carry "reason"; BentoML's own
        # validation errors do not, but the service's header may.
        reason = body.get("reason") or response.headers.get("x-skumatch-refusal")
        return cls(response.status_code, reason, str(body.get("error") or body), bad, body)


class SkumatchClient:
    """A client of one matching service.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:3000``.
        api_key: a caller key or the admin token; when set, every request sends it as
            ``Authorization: Bearer <key>``.
        timeout: seconds per request (connect, read, write each).
        max_images_per_request: the most images one ``/match_batch`` request carries; the server's
            own ``limits.max_images_per_request`` caps it (default: the server's limit).

    Use it as a context manager, or call :meth:`close` when done: it keeps a connection pool.
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        max_images_per_request: Optional[int] = None,
    ) -> None:
        if max_images_per_request is not None and max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be at least 1, got {max_images_per_request}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.max_images_per_request = max_images_per_request
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._limits: Optional[dict[str, Any]] = None

    def __enter__(self) -> SkumatchClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def info(self) -> dict[str, Any]:
        """What the service serves: model, version, index checksum, catalogue, limits, credentials.

        Returns:
            ``POST /info``'s JSON (``serving.service.InfoResponse``).

        Raises:
            SkumatchError: the service refused (401 without a valid key when keys are required).
        """
        answer = self._post("/info", json={})
        self._limits = dict(answer.get("limits") or {})
        return answer

    def match(self, image: Image, top_k: Optional[int] = None) -> MatchResult:
        """The catalogue SKUs that best match one photo.

        Args:
            image: a file path (read here, on the client) or the file's bytes (JPEG, PNG or WebP
                by default: the service's ``limits.formats``).
            top_k: how many SKUs, 1..100; default: the service's packaged ``serve.top_k``.

        Returns:
            The matches, best first, and the model that found them.

        Raises:
            SkumatchError: the service refused the photo (400 with reason ``corrupt``, ``format``,
                ``empty``...; 413 over a size limit) or the credentials (401).
            OSError: a path that cannot be read.
        """
        return MatchResult.from_json(self._post("/match", files=[_part("image", image)], data=_top_k(top_k)))

    def iter_match_batch(self, images: Sequence[Image], top_k: Optional[int] = None) -> Iterator[ImageResult]:
        """:meth:`match_batch`, yielding each photo's result as soon as its request has answered.

        For a long list, a caller can show or store results while later requests are still out.
        Results come in input order. A refused request raises when it is reached, after the
        results of the requests before it.
        """
        for offset, chunk in self._chunks(images):
            files = [_part("images", image) for image in chunk]
            answer = self._post("/match_batch", files=files, data=_top_k(top_k), offset=offset)
            model = {key: str(answer[key]) for key in ("model_name", "model_version", "index_checksum")}
            reject_below = _optional_float(answer.get("reject_below"))
            for result in answer["results"]:
                yield ImageResult(
                    tuple(Match.from_json(hit) for hit in result["matches"]),
                    bool(result.get("no_confident_match")),
                    reject_below=reject_below,
                    **model,
                )

    def match_batch(self, images: Sequence[Image], top_k: Optional[int] = None) -> list[ImageResult]:
        """:meth:`match` for several photos, sent in as few ``/match_batch`` requests as the limits allow.

        The service embeds the photos of one request in batches, which is faster per photo than
        one request each. A list longer than the service's ``limits.max_images_per_request``
        (read once from :meth:`info`, then cached), or larger than its ``max_request_bytes``, is
        split into several requests.

        Args:
            images: file paths or file bytes, as for :meth:`match`.
            top_k: how many SKUs per photo, 1..100; default: the service's ``serve.top_k``.

        Returns:
            One result per photo, in input order (empty for an empty list, without a request).

        Raises:
            SkumatchError: a request was refused. The service refuses a whole request for one bad
                image; ``bad_images`` names each bad image of that request by its index in
                ``images``. Images of later requests were not sent.
        """
        return list(self.iter_match_batch(images, top_k))

    def embed(self, image: Image) -> list[float]:
        """The unit-norm embedding of a photo as a query: the vector ``/match`` searches the index with.

        Args:
            image: a file path or the file's bytes, as for :meth:`match`.

        Raises:
            SkumatchError: the service refused the photo or the credentials.
        """
        return [float(x) for x in self._post("/embed", files=[_part("image", image)])["embedding"]]

    def reload(self) -> dict[str, Any]:
        """Ask the service to check ``@champion`` now and swap to it if it changed.

        Needs the admin token as the client's ``api_key``.

        Returns:
            ``{"outcome": "swapped" | "unchanged", "model_version", "index_checksum", "at", ...}``.

        Raises:
            SkumatchError: 401 without the admin token, 403 with a caller key or when the service
                has no admin token configured, 409 when it knows no registry (``no_registry``) or
                the new champion could not be loaded (``reload_failed``; it keeps serving the old).
        """
        return self._post("/admin/reload", json={})

    def _limit(self, name: str) -> Optional[int]:
        if self._limits is None:
            self.info()
        value = (self._limits or {}).get(name)
        return int(value) if value is not None else None

    def _chunks(self, images: Sequence[Image]) -> Iterator[tuple[int, list[Image]]]:
        """``(offset, images)`` per request: at most the image limit, and within the byte limit."""
        images = list(images)
        if not images:
            return
        most = min(filter(None, (self.max_images_per_request, self._limit("max_images_per_request"))), default=None)
        most = most or len(images)
        budget = self._limit("max_request_bytes")
        start = 0
        while start < len(images):
            end, size = start, PART_OVERHEAD_BYTES
            # Always at least one image: one too large for any request is the server's to refuse.
            while end < len(images) and end - start < most:
                size += _size(images[end]) + PART_OVERHEAD_BYTES
                if budget is not None and size > budget and end > start:
                    break
                end += 1
            yield start, images[start:end]
            start = end

    def _post(self, route: str, offset: int = 0, **request: Any) -> dict[str, Any]:
        response = self._http.post(route, **request)
        if not response.is_success:
            if response.status_code == 413 and response.headers.get("x-skumatch-refusal") in _LIMIT_REASONS:
                self._limits = None  # re-read the limits next time rather than repeat the refusal
            raise SkumatchError.from_response(response, offset)
        return response.json()


def _part(field: str, image: Image) -> tuple[str, tuple[str, bytes, str]]:
    """A multipart file part; the service decodes by content, the name and type are for its logs."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return field, ("image", bytes(image), "application/octet-stream")
    path = Path(image)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return field, (path.name, path.read_bytes(), content_type)


def _size(image: Image) -> int:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    return Path(image).stat().st_size


def _top_k(top_k: Optional[int]) -> dict[str, str]:
    return {} if top_k is None else {"top_k": str(top_k)}


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)
