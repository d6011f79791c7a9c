"""Uploaded images: decoding within limits, and an ASGI guard that checks image requests first.

Kept apart from the service so it is testable without BentoML's server and without a model.
The limits are the ``serve.limits`` section of ``params.yaml`` (:class:`UploadLimits`).

Why a guard in front of BentoML: BentoML 1.4 treats a *text* value sent in a file field as a
URL and tries to download it, parses a *file* under a field name the API lacks as JSON (HTTP
500), and validates JSON bodies into ``Path`` arguments. So on image routes the guard lets
through only a ``multipart/form-data`` body with a declared length, within the byte limits,
whose file fields hold files (as many as the route takes) and whose other fields hold none.
Everything else is refused with a 4xx JSON error before BentoML parses it: the service never
opens a path or fetches a URL that a caller names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import UploadLimits
from serving.refusals import send_refusal

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadImage(ValueError):
    """An upload that is not an acceptable image; ``reason`` is the short key it is counted under."""

    def __init__(self, message: str, reason: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason, self.status = reason, status


def decode_image(path: str | Path, limits: UploadLimits | None = None):
    """Open an uploaded file as a fully decoded, upright RGB PIL image, within ``limits``.

    The size and aspect ratio are read from the header and checked before any pixel is decoded;
    only ``limits.formats`` are tried. ``load()`` decodes every byte now, so a truncated JPEG fails
    here instead of half-decoding into a grey image later. The EXIF orientation is applied, so a
    phone photo taken on its side is embedded the right way up.

    Raises:
        BadImage: an empty, oversized, unreadable, truncated or corrupt upload, or one outside
            the pixel, aspect-ratio or format limits. Pillow's own error text is not passed on.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limits = limits or UploadLimits()
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise BadImage("the uploaded file is empty", "empty")
    if size > limits.max_upload_bytes:
        raise BadImage(
            f"the uploaded file is {size} bytes, over the limit max_upload_bytes={limits.max_upload_bytes}",
            "max_upload_bytes",
            413,
        )
    accepted = ", ".join(limits.formats)
    try:
        with Image.open(path, formats=limits.formats) as image:
            _check_dimensions(image.size, limits)
            image.load()
            return _upright(image, ImageOps).convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage(
            f"the uploaded image has more pixels than Pillow decodes safely (limit max_pixels={limits.max_pixels})",
            "max_pixels",
            413,
        ) from err
    except UnidentifiedImageError as err:
        raise BadImage(f"the uploaded file is not an image in an accepted format ({accepted})", "format") from err
    except MemoryError as err:
        raise BadImage("the uploaded image is too large to decode", "max_pixels", 413) from err
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, EOFError...
        raise BadImage("the uploaded image is truncated or corrupt and could not be decoded", "corrupt") from err


def _check_dimensions(size: tuple[int, int], limits: UploadLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise BadImage(f"the uploaded image is {width} x {height} pixels: it has no pixels", "corrupt")
    if width * height > limits.max_pixels:
        raise BadImage(
            f"the uploaded image is {width} x {height} = {width * height} pixels, over the limit "
            f"max_pixels={limits.max_pixels}",
            "max_pixels",
            413,
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise BadImage(
            f"the uploaded image is {width} x {height} pixels, an aspect ratio of {ratio:.1f}, over the "
            f"limit max_aspect_ratio={limits.max_aspect_ratio:g}",
            "max_aspect_ratio",
        )


def _upright(image, image_ops):
    # A malformed EXIF block must not refuse a photo whose pixels decode: keep it as stored.
    try:
        return image_ops.exif_transpose(image)
    except Exception:  # noqa: BLE001
        return image


class UploadGuard:
    """ASGI middleware checking image requests to some routes before the application sees them.

    Args:
        app: the wrapped ASGI application.
        file_fields: for each checked route, its file field and how many files it takes at most
            (``None``: ``limits.max_images_per_request``). No other field may carry a file.
        limits: returns the limits in force (read when a request arrives, so the service can
            supply the ones packaged with its model).
    """

    def __init__(
        self, app, file_fields: dict[str, tuple[str, int | None]], limits: Callable[[], UploadLimits] = UploadLimits
    ) -> None:
        self.app, self.file_fields, self.limits = app, dict(file_fields), limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.file_fields:
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        limits = self.limits()
        field, _ = self.file_fields[scope["path"]]
        headers = Headers(scope=scope)
        # Not lower-cased: the boundary in it is case-sensitive (browsers use mixed case).
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            await send_refusal(
                send,
                415,
                "content_type",
                f"{scope['path']} takes images only as multipart/form-data file uploads in the field "
                f"{field!r} (e.g. curl -F '{field}=@photo.jpg'); JSON, form text, paths and URLs are "
                "not accepted",
                content_type=content_type or None,
            )
            return
        declared = headers.get("content-length", "")
        if not declared.isdigit():
            await send_refusal(
                send,
                411,
                "length_required",
                "the request must declare its Content-Length (chunked uploads are not accepted)",
            )
            return
        if int(declared) > limits.max_request_bytes:
            await self._too_large(send, limits)
            return
        body = await _read_body(receive, limits.max_request_bytes)
        if body is None:
            return  # the client went away
        if len(body) > limits.max_request_bytes:
            await self._too_large(send, limits)
            return
        import anyio

        # Off the event loop: a burst of uploads must not hold up health probes.
        problem = await anyio.to_thread.run_sync(self._check_form, scope["path"], content_type, body, limits)
        if problem:
            status, reason, message = problem
            await send_refusal(send, status, reason, message)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _too_large(send: Send, limits: UploadLimits) -> None:
        await send_refusal(
            send,
            413,
            "max_request_bytes",
            f"request body larger than the limit max_request_bytes={limits.max_request_bytes}",
        )

    def _check_form(
        self, route: str, content_type: str, body: bytes, limits: UploadLimits
    ) -> tuple[int, str, str] | None:
        """What is wrong with a multipart body for ``route``, as ``(status, reason, message)``; None if nothing."""
        field, most = self.file_fields[route]
        most = most or limits.max_images_per_request
        try:
            parts = multipart_parts(content_type, body)
        except ValueError:
            return 400, "malformed_form", "malformed multipart/form-data body"
        files = [part for part in parts if part.name == field]
        if any(not part.is_file for part in files):
            return (
                400,
                "text_instead_of_file",
                f"form field {field!r} must be a file upload (e.g. curl -F '{field}=@photo.jpg'), "
                "not a text value; paths and URLs are not opened or fetched",
            )
        stray = next((part for part in parts if part.is_file and part.name != field), None)
        if stray is not None:
            return (
                400,
                "unknown_file_field",
                f"{route} takes files only in the form field {field!r}, not {stray.name!r}",
            )
        if len(files) > most:
            return (
                413,
                "max_images_per_request",
                f"{route} takes at most {most} file(s) in {field!r}, got "
                f"{len(files)} (limit max_images_per_request={limits.max_images_per_request})",
            )
        for position, part in enumerate(files):
            if part.size > limits.max_upload_bytes:
                return (
                    413,
                    "max_upload_bytes",
                    f"upload {position} is {part.size} bytes, over the limit "
                    f"max_upload_bytes={limits.max_upload_bytes}",
                )
        return None


@dataclass
class FormPart:
    """One part of a multipart body: its field name, whether it is a file, its size in bytes."""

    name: str
    is_file: bool
    size: int


def multipart_parts(content_type: str, body: bytes) -> list[FormPart]:
    """The parts of a complete ``multipart/form-data`` body, read without keeping their data.

    Raises:
        ValueError: no boundary, a body that does not parse, or one that ends before its closing
            boundary.
    """
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ValueError("no boundary")
    parts: list[FormPart] = []
    headers: dict[bytes, bytes] = {}
    field, value, size = bytearray(), bytearray(), 0

    def header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        nonlocal size
        size += end - start

    def part_end() -> None:
        nonlocal size
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("latin-1")
        parts.append(FormPart(name, b"filename" in disposition, size))
        headers.clear()
        size = 0

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": lambda data, start, end: field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: value.extend(data[start:end]),
            "on_header_end": header_end,
            "on_part_data": part_data,
            "on_part_end": part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except Exception as err:  # noqa: BLE001 - python-multipart raises its own error types
        raise ValueError(str(err)) from err
    if parser.state != MultipartState.END:
        raise ValueError("the body ends before its closing boundary")
    return parts


async def _read_body(receive: Receive, most: int) -> bytes | None:
    """The request body, read up to one chunk past ``most`` bytes; None if the client disconnected."""
    chunks, size, more = [], 0, True
    while more and size <= most:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive | None) -> Receive:
    """A ``receive`` that hands the buffered body over once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
