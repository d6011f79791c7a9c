"""Who may call the service: API keys for callers and a separate token for admin routes.

Both are optional and come from the environment (or files it names), never from
``params.yaml``, so no secret is committed or packed into a Bento:

- ``SKUMATCH_API_KEYS``: caller keys, separated by commas or white space; or
  ``SKUMATCH_API_KEYS_FILE``: a file with one key a line (``#`` starts a comment).
  With none, caller routes are open (local use).
- ``SKUMATCH_ADMIN_TOKEN`` or ``SKUMATCH_ADMIN_TOKEN_FILE``: the admin token. With none, admin
  routes (``/admin/...``) are refused: they change what is served.

A request presents its credential as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Missing or wrong credentials get 401; a caller key on an admin route gets 403. The admin token
is accepted on caller routes too. Credentials are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key, so the time taken says nothing about how
much of a key was right, and neither is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.refusals import send_refusal

KEYS_ENV, KEYS_FILE_ENV = "SKUMATCH_API_KEYS", "SKUMATCH_API_KEYS_FILE"
ADMIN_ENV, ADMIN_FILE_ENV = "SKUMATCH_ADMIN_TOKEN", "SKUMATCH_ADMIN_TOKEN_FILE"
ADMIN_PREFIX = "/admin/"
# Open without credentials: health probes, metrics scraping, the explorer page and API docs.
# (They carry no catalogue data; the page asks for the key before it calls anything.)
OPEN_PATHS = frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs", "/docs.json", "/schema.json"})
OPEN_PREFIXES = ("/static_content/",)


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def _read_secrets(text: str) -> list[str]:
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [secret for line in lines for secret in re.split(r"[\s,]+", line) if secret]


@dataclass(frozen=True)
class Credentials:
    """The configured caller keys and admin token, kept only as SHA-256 digests."""

    caller_digests: tuple[bytes, ...] = ()
    admin_digest: bytes | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        """Read keys and token from the environment variables above.

        Raises:
            OSError: a ``*_FILE`` variable names a file that cannot be read (the service must not
                start open when its operator meant it closed).
            ValueError: an admin token file that holds more than one token.
        """
        environ = os.environ if environ is None else environ
        keys = _read_secrets(environ.get(KEYS_ENV, ""))
        if environ.get(KEYS_FILE_ENV):
            keys += _read_secrets(Path(environ[KEYS_FILE_ENV]).read_text())
        tokens = _read_secrets(environ.get(ADMIN_ENV, ""))
        if environ.get(ADMIN_FILE_ENV):
            tokens += _read_secrets(Path(environ[ADMIN_FILE_ENV]).read_text())
        if len(tokens) > 1:
            raise ValueError(f"{ADMIN_ENV} / {ADMIN_FILE_ENV} must hold one admin token, found {len(tokens)}")
        return cls(tuple(_digest(key) for key in keys), _digest(tokens[0]) if tokens else None)

    @property
    def callers_need_key(self) -> bool:
        return bool(self.caller_digests)

    def is_admin(self, presented: str | None) -> bool:
        """Whether ``presented`` is the admin token."""
        if presented is None or self.admin_digest is None:
            return False
        return hmac.compare_digest(_digest(presented), self.admin_digest)

    def is_caller(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the caller keys (every key is compared, always)."""
        if presented is None:
            return False
        digest = _digest(presented)
        found = False
        for known in self.caller_digests:
            found |= hmac.compare_digest(digest, known)
        return found


def presented_credential(headers: Any) -> str | None:
    """The credential a request carries: a bearer token, else an ``X-API-Key`` header."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None


def route_kind(path: str) -> str:
    """``open``, ``admin`` or ``caller``: which credential a path needs."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return "open"
    return "admin" if path.startswith(ADMIN_PREFIX) else "caller"


class AccessGuard:
    """ASGI middleware refusing requests without the credential their route needs.

    Args:
        app: the wrapped ASGI application.
        credentials: the keys and token in force; default: read from the environment once, when
            the worker builds its application (an unreadable key file stops it starting).
    """

    def __init__(self, app, credentials: Credentials | None = None) -> None:
        self.app = app
        self.credentials = Credentials.from_environment() if credentials is None else credentials

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        kind = route_kind(scope.get("path", ""))
        if kind == "open":
            await self.app(scope, receive, send)
            return
        presented = presented_credential(Headers(scope=scope))
        challenge = [(b"www-authenticate", b'Bearer realm="skumatch"')]
        if kind == "admin":
            if self.credentials.admin_digest is None:
                await send_refusal(
                    send,
                    403,
                    "admin_disabled",
                    f"admin routes are off: set {ADMIN_ENV} (or {ADMIN_FILE_ENV}) to enable them",
                )
            elif self.credentials.is_admin(presented):
                await self.app(scope, receive, send)
            elif self.credentials.is_caller(presented):
                await send_refusal(send, 403, "forbidden", "this route needs the admin token, not a caller key")
            else:
                await send_refusal(send, 401, "unauthorized", "missing or wrong admin token", challenge)
            return
        if (
            not self.credentials.callers_need_key
            or self.credentials.is_caller(presented)
            or self.credentials.is_admin(presented)
        ):
            await self.app(scope, receive, send)
            return
        await send_refusal(
            send,
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            challenge,
        )
