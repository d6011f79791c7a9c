"""Uploaded images: decoding with clear errors, and an ASGI guard for multipart requests.

Kept apart from the service so it is testable without BentoML's server and without a model.

Why a guard: BentoML 1.4 treats a *text* value sent in a file field (``-F image=abc`` rather
than ``-F image=@file.jpg``) as a URL and tries to download it, which fails as HTTP 500 (or, with
uvloop installed, makes the server fetch any public URL a client names); and it parses a *file*
sent under a field name the API does not have as JSON, which fails as HTTP 500 for any binary
file. The guard answers such requests (multipart or URL-encoded forms), malformed form bodies
and oversized uploads with a 4xx JSON error before BentoML parses them, so a bad request is
never a 5xx and the service never fetches URLs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Awaitable, Callable

# Large enough for any camera photo; larger bodies are refused before they are parsed.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# Form bodies BentoML parses field by field (and where it would fetch a text "file" as a URL).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadImage(ValueError):
    """An upload that is not a decodable image."""


def decode_image(path: str | Path):
    """Open an uploaded file as a fully decoded RGB PIL image.

    ``load()`` decodes every byte now, so a truncated JPEG fails here (Pillow's default
    ``LOAD_TRUNCATED_IMAGES=False``) instead of half-decoding into a grey image later.

    Raises:
        BadImage: an empty file, an unknown format, a truncated or corrupt image, or one so
            large that Pillow refuses it as a decompression bomb.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise BadImage("the uploaded file is empty")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise BadImage(f"the uploaded image is too large to decode safely: {err}") from err
    except UnidentifiedImageError as err:
        raise BadImage("the uploaded file is not an image in a format Pillow reads "
                       "(JPEG, PNG, WebP, BMP, GIF, TIFF...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated and corrupt data as OSError, sometimes SyntaxError/ValueError.
        raise BadImage(f"the uploaded image is truncated or corrupt and could not be decoded: {err}") from err


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class UploadGuard:
    """ASGI middleware checking form uploads to some routes before the application sees them.

    Args:
        app: the wrapped ASGI application.
        file_fields: for each checked route, the form fields that take files. On those routes
            these fields must be file parts when present, and no other field may be one.
        max_bytes: the largest request body accepted (HTTP 413 above it).
    """

    def __init__(self, app, file_fields: dict[str, tuple[str, ...]], max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.app, self.file_fields, self.max_bytes = app, dict(file_fields), max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.file_fields:
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"error": f"request body larger than {self.max_bytes} bytes"})
            return
        content_type = headers.get("content-type", "").lower()
        if not content_type.startswith(FORM_TYPES):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_json(send, 413, {"error": f"request body larger than {self.max_bytes} bytes"})
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = await self._check(scope, body)
        if problem:
            await _send_json(send, 400, {"error": problem})
            return
        await self.app(scope, _replay(body, receive), send)

    async def _check(self, scope: Scope, body: bytes) -> str | None:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        request = Request(scope, receive=_replay(body, None))
        try:
            form = await request.form()
        except Exception as err:  # starlette raises several types for broken multipart bodies
            return f"malformed form body: {err}"
        route_fields = self.file_fields[scope["path"]]
        try:
            for field in route_fields:
                for value in form.getlist(field):
                    if not isinstance(value, UploadFile):
                        return (f"form field {field!r} must be a file upload (e.g. curl -F '{field}=@photo.jpg'), "
                                "not a text value; image URLs are not fetched")
            for field, value in form.multi_items():
                if field not in route_fields and isinstance(value, UploadFile):
                    expected = " or ".join(repr(name) for name in route_fields)
                    return f"{scope['path']} takes files only in the form field {expected}, not {field!r}"
        finally:
            await form.close()
        return None


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
