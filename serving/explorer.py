"""The match explorer page at ``GET /``, and BentoML's Swagger UI moved to ``GET /docs``.

The page (``explorer.html``, one static file with its script inline) lets a person drop or
choose a photo and see the top-k catalogue SKUs with their thumbnails, scores, the confidence
flag and the model version and index checksum that answered. It calls the same ``/match`` and
``/thumbnail`` routes as any client, with the API key typed into it (kept in the browser's
``localStorage``), so it needs no route or privilege of its own.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("explorer.html")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self' 'unsafe-inline'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]


@lru_cache(maxsize=1)
def page_bytes() -> bytes:
    """The explorer page's HTML."""
    return PAGE.read_bytes()


class Pages:
    """ASGI middleware serving the explorer at ``/`` and handing ``/docs`` to BentoML's own ``/``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            if scope.get("path") == "/":
                body = page_bytes()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
                return
            if scope.get("path") == "/docs":
                # BentoML serves its Swagger UI at "/", with assets under ./static_content.
                scope = {**scope, "path": "/", "raw_path": b"/"}
        await self.app(scope, receive, send)
