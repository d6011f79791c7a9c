"""Refused requests: one JSON shape for every 4xx the service gives, and the reason it is counted under.

Every refusal, whichever layer makes it (credentials, the upload guard, a handler), is a JSON body
``{"error": "<what was wrong>", "reason": "<short key>", ...}`` and carries the reason in the
``x-skumatch-refusal`` response header too, so the outermost middleware can count refusals by
reason (``skumatch_rejections_total``) without reading bodies.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

REASON_HEADER = "x-skumatch-refusal"

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


def refusal_body(reason: str, message: str, **detail: Any) -> bytes:
    """The JSON body of a refusal."""
    return json.dumps({"error": message, "reason": reason, **detail}).encode()


async def send_refusal(
    send: Send,
    status: int,
    reason: str,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    **detail: Any,
) -> None:
    """Answer an ASGI request with a refusal (for middleware, before the application runs)."""
    body = refusal_body(reason, message, **detail)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REASON_HEADER.encode(), reason.encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def refusal_response(status: int, reason: str, message: str, **detail: Any):
    """A refusal as a Starlette response (for a BentoML API handler to return)."""
    from starlette.responses import Response

    return Response(
        refusal_body(reason, message, **detail),
        status_code=status,
        media_type="application/json",
        headers={REASON_HEADER: reason},
    )
