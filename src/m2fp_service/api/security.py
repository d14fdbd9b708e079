"""Who may call the API, and what browsers may do with our pages.

- ``ApiKeyMiddleware``: with ``M2FP_API_KEY`` set, every request under ``/api/`` (HTTP and
  WebSocket, whatever routes exist now or later) must present the key as ``Authorization: Bearer
  <key>`` or ``X-API-Key: <key>`` (a WebSocket also as ``?api_key=<key>``: browsers cannot set
  its headers); health, metrics, docs and the WebUI's files stay open. Keys are
  compared as SHA-256 digests with ``hmac.compare_digest``: constant time whatever their length.
- ``SecurityHeadersMiddleware``: ``X-Content-Type-Options``, ``X-Frame-Options``,
  ``Referrer-Policy`` and a Content-Security-Policy without inline script on every response.
- ``describe_auth``: the OpenAPI document states the configured auth (none without a key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from m2fp_service.api.errors import error_response
from m2fp_service.errors import Unauthorized

log = logging.getLogger("m2fp.security")

PROTECTED_PREFIX = "/api/"
API_KEY_HEADER = "X-API-Key"
SCHEMES: dict[str, dict[str, str]] = {
    "Bearer": {"type": "http", "scheme": "bearer",
               "description": "The server's M2FP_API_KEY as `Authorization: Bearer <key>`"},
    "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER,
               "description": "The server's M2FP_API_KEY as `X-API-Key: <key>`"},
}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The keys a request presents: ``X-API-Key`` values and ``Authorization: Bearer`` tokens."""
    keys = []
    for name, value in headers:
        if name == b"x-api-key":
            keys.append(value.decode("latin-1").strip())
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            keys.append(token.strip() if scheme.lower() == "bearer" else "")  # another scheme never matches
    return keys


class ApiKeyMiddleware:
    """Refuses ``/api/`` requests without the right key (401, the error envelope)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = _digest(api_key)

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> Unauthorized | None:
        """None when every presented key is right and there is at least one."""
        keys = presented_keys(headers)
        if not keys:
            return Unauthorized(
                f"this server requires an API key: send `Authorization: Bearer <key>` or `{API_KEY_HEADER}: <key>`"
            )
        # Every key is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(_digest(k), self._expected) for k in keys]
        return None if all(matches) else Unauthorized("wrong API key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", []))
        if scope["type"] == "websocket":
            # Browsers cannot set headers on a WebSocket: there the key may come as ?api_key=.
            for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if name == "api_key":
                    headers.append((b"x-api-key", value.encode("latin-1")))
        refusal = self.check(headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s: %s", scope["path"], refusal.message)
        response = error_response(refusal)
        response.headers["WWW-Authenticate"] = 'Bearer realm="m2fp"'
        if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
            # Starlette's Response sends a WebSocket denial (websocket.http.response.*) by itself
            # when the scope is a WebSocket's: the client sees the 401 and its JSON body.
            await response(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})


# --- response headers -----------------------------------------------------------------------------

_BASE_CSP = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data: blob:",
    "connect-src": "'self'",
    "font-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}
# Swagger UI and ReDoc pages (made by FastAPI, served from the package): their few inline
# <script>/<style> blocks are allowed by hash, computed from the page as served (it holds no
# request input: only the app's title and URLs). ReDoc injects its generated styles at run time
# and builds its search worker from a blob:, which no hash can cover; its style-src is
# 'unsafe-inline' alone (browsers ignore 'unsafe-inline' next to a hash).
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
_DOCS_OVERRIDES = {"/redoc": {"style-src": "'self' 'unsafe-inline'", "worker-src": "blob:"}}
_INLINE = re.compile(rb"<(script|style)(\s[^>]*)?>(.*?)</\1\s*>", re.DOTALL | re.IGNORECASE)


def content_security_policy(extra: dict[str, str] | None = None, override: dict[str, str] | None = None) -> str:
    """Our policy, with ``extra`` sources added to their directives and ``override`` replacing them."""
    policy = dict(_BASE_CSP)
    for directive, sources in (extra or {}).items():
        policy[directive] = f"{policy.get(directive, '')} {sources}".strip()
    policy.update(override or {})
    return "; ".join(f"{k} {v}" for k, v in policy.items())


def inline_hashes(html: bytes) -> dict[str, str]:
    """``{"script-src": "'sha256-…' …", "style-src": …}`` for the inline blocks of a page."""
    found: dict[str, list[str]] = {}
    for match in _INLINE.finditer(html):
        kind, attrs, body = match.group(1).lower(), match.group(2) or b"", match.group(3)
        if kind == b"script" and b"src=" in attrs.lower():
            continue
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        found.setdefault(f"{kind.decode()}-src", []).append(f"'sha256-{digest}'")
    return {directive: " ".join(hashes) for directive, hashes in found.items()}


STATIC_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
_DEFAULT_CSP = content_security_policy().encode()


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (headers the app set itself win)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in DOCS_PATHS:
            await self._docs_page(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_headers(message.get("headers", []), _DEFAULT_CSP)}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs_page(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Buffers the (small, generated) page to hash its inline blocks into its CSP."""
        start: dict[str, Any] | None = None
        body = bytearray()

        async def buffer(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = dict(message)
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            csp = content_security_policy(inline_hashes(bytes(body)), _DOCS_OVERRIDES.get(scope["path"])).encode()
            await send({**start, "headers": _with_headers(start.get("headers", []), csp)})
            await send({"type": "http.response.body", "body": bytes(body)})

        await self.app(scope, receive, buffer)


def _with_headers(headers: Iterable[tuple[bytes, bytes]], csp: bytes) -> list[tuple[bytes, bytes]]:
    out = list(headers)
    present = {name.lower() for name, _ in out}
    for name, value in (*STATIC_HEADERS, (b"content-security-policy", csp)):
        if name not in present:
            out.append((name, value))
    return out


# --- the published contract ---------------------------------------------------------------------

def describe_auth(doc: dict[str, Any], required: bool) -> dict[str, Any]:
    """Adds the auth the server enforces to an OpenAPI document: nothing when no key is set; else
    both schemes, a ``security`` requirement and a 401 answer on every ``/api/`` operation.
    """
    if not required:
        return doc
    doc.setdefault("components", {}).setdefault("securitySchemes", {}).update(SCHEMES)
    unauthorized = {
        "description": "API key missing or wrong (this server sets M2FP_API_KEY)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, item in doc.get("paths", {}).items():
        if not path.startswith(PROTECTED_PREFIX):
            continue
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["security"] = [{name: []} for name in SCHEMES]
                operation["responses"].setdefault("401", unauthorized)
    return doc
