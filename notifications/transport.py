"""The HTTP layer under firebase-admin's FCM client: a lean httpx client on a keep-alive HTTP/1.1 pool.

firebase-admin sends each push as its own request through an `httpx.AsyncClient` whose mounted
retrying transports (`HttpxRetryTransport`, retries of 500/503) wrap an httpcore transport. At
hundreds of pushes per batch, that stack's own CPU is what limits a worker:

- httpcore's pool re-scans its queue per request (encode/httpcore#1035): about 1.5 ms of CPU per
  push, a ceiling of about 550 pushes/s. aiohttp's pool instead gave about 1,500/s, and its own
  request machinery (yarl URLs, multidicts, payload registry, timers) was then a quarter of the
  worker's CPU. `Http11Transport` below writes the request httpx already built onto a pooled
  keep-alive connection and parses the answer with httptools (llhttp, the parser uvicorn uses).
- `httpx.AsyncClient.request` re-parses the same URL, merges the same headers, JSON-encodes with
  the standard library, and runs the cookie jar on every answer. `FcmHttpClient` builds the
  request from per-URL and per-header-set templates, encodes JSON with msgspec and keeps no
  cookies (FCM sets none); `send()` (auth flow, event hooks, redirects) is httpx's own.

What firebase-admin does stays its own: message encoding, the retrying transport, the answer's
parsing into `UnregisteredError` and friends.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import httptools
import httpx
import msgspec

_DEFAULT_TIMEOUT: Any = httpx.USE_CLIENT_DEFAULT


class FcmHttpClient(httpx.AsyncClient):
    """`httpx.AsyncClient` with a fast path for what firebase-admin sends: `request(method, url_string,
    headers=dict, json=..., timeout=...)`. Anything else takes httpx's ordinary path."""

    _MAX_TEMPLATES = 16  # distinct (URL, headers) pairs remembered; firebase-admin uses one or two

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._cookies = _NoCookies()
        self._templates: dict[
            tuple[str, str, tuple[tuple[str, str], ...]], tuple[httpx.URL, httpx.Headers]
        ] = {}
        self._timeouts: dict[float, dict[str, float | None]] = {}

    async def request(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout: Any = _DEFAULT_TIMEOUT,  # noqa: ASYNC109 (httpx's signature, passed on to the request)
        **other: Any,
    ) -> httpx.Response:
        if other or json is None or not isinstance(url, str) or not isinstance(headers, dict | None):
            return await super().request(method, url, json=json, headers=headers, timeout=timeout, **other)
        body = msgspec.json.encode(json)
        target, template = self._template(method, url, headers)
        request_headers = httpx.Headers(template)  # a copy of the template's list
        request_headers["Content-Length"] = str(len(body))
        request = httpx.Request(
            method,
            target,
            headers=request_headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": self._timeout_extension(timeout)},
        )
        request.read()
        response = await self.send(request)
        # The answer is read and closed, but httpx's `BoundAsyncStream` wrapper points back at it:
        # a reference cycle (response, request, headers: 18 objects a push) that only the cyclic
        # garbage collector frees. With the wrapper gone, reference counting frees them at once.
        response.stream = _CONSUMED
        return response

    def _template(
        self, method: str, url: str, headers: dict[str, str] | None
    ) -> tuple[httpx.URL, httpx.Headers]:
        key = (method, url, tuple(headers.items()) if headers else ())
        known = self._templates.get(key)
        if known is not None:
            return known
        # What build_request() would make for this URL and these headers, less the body's length.
        built = self.build_request(method, url, headers=headers, json={})
        template = httpx.Headers(built.headers, encoding="ascii")
        del template["Content-Length"]
        if len(self._templates) < self._MAX_TEMPLATES:
            self._templates[key] = (built.url, template)
        return built.url, template

    def _timeout_extension(self, timeout: Any) -> dict[str, float | None]:
        if timeout is _DEFAULT_TIMEOUT:
            return self.timeout.as_dict()
        if not isinstance(timeout, int | float):
            return httpx.Timeout(timeout).as_dict()
        known = self._timeouts.get(timeout)  # firebase-admin passes its one httpTimeout every time
        if known is None:
            known = self._timeouts[timeout] = httpx.Timeout(timeout).as_dict()
        return dict(known)  # each request its own, as build_request() gives


_CONSUMED = httpx.ByteStream(b"")


class _NoCookies(httpx.Cookies):
    """FCM sets no cookies; reading every answer into a cookie jar was 7 % of the worker's CPU."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, the answer parsed by httptools."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._status = 0
        self._keep_alive = False
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            self._fail(httpx.ReadError(str(exc) or type(exc).__name__))
        else:
            self._fail(httpx.RemoteProtocolError("the server closed the connection without answering"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._headers, self._body = [], []
            return
        # Read both now: the parser resets for the next message once this callback returns.
        self._status, self._keep_alive = status, self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def exchange(self, data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send one request; its status, headers, body and whether the connection may be reused."""
        if self.closed or self._transport is None or self._transport.is_closing():
            raise httpx.RemoteProtocolError("the connection closed before the request was sent")
        self._headers, self._body = [], []
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            self._transport.write(data)
            await self._waiter
        finally:
            self._waiter = None
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        return self._status, self._headers, body, self._keep_alive

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class _Origin:
    def __init__(self, limit: int) -> None:
        self.gate = asyncio.Semaphore(limit)
        self.idle: collections.deque[_Connection] = collections.deque()


class Http11Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections, at most `connections` per origin, for an `httpx` client.

    Made for what the FCM client sends (a POST with a small JSON body, whole answers with a
    Content-Length or chunked): no HEAD or CONNECT, no upgrade, no streaming, no HTTP/2.
    `timeout` bounds each request as a whole (waiting for a connection, connecting, sending,
    the answer). A request that fails or times out closes its connection; nothing is retried
    here (firebase-admin's transport above retries 500 and 503, the worker everything else).
    An idle connection is reused for `keepalive_seconds` at most, and never once the server
    has closed it.
    """

    def __init__(
        self,
        *,
        connections: int,
        timeout: float,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = connections
        self._timeout = timeout
        self._keepalive = keepalive_seconds
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}
        self._open: set[_Connection] = set()
        self._ssl = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme, host = url.raw_scheme, url.raw_host
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"cannot send to {url}", request=request)
        if request.method in ("HEAD", "CONNECT"):  # answers the parser could not frame on its own
            raise httpx.LocalProtocolError(f"{request.method} is not supported here", request=request)
        port = url.port or (443 if scheme == b"https" else 80)
        origin = self._origins.get((scheme, host, port))
        if origin is None:
            origin = self._origins[(scheme, host, port)] = _Origin(self._limit)
        raw_headers = request.headers.raw
        head = b"".join(
            [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
            + [b"%s: %s\r\n" % pair for pair in raw_headers]
            + [b"\r\n"]
        )
        # Exactly one CR and one LF per line: no header name or value may start a line of its own.
        if head.count(b"\n") != len(raw_headers) + 2 or head.count(b"\r") != len(raw_headers) + 2:
            raise httpx.LocalProtocolError("a line break in a request header", request=request)
        body = await request.aread()

        stage = "pool"
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout), origin.gate:
                conn = self._idle(origin)
                if conn is None:
                    stage = "connect"
                    conn = await self._connect(scheme, host, port)
                stage = "exchange"
                status, headers, content, keep_alive = await conn.exchange(head + body)
                if keep_alive and not conn.closed:
                    conn.idle_since = time.monotonic()
                    origin.idle.append(conn)
                    conn = None
        except TimeoutError as exc:
            timeout_type = {"pool": httpx.PoolTimeout, "connect": httpx.ConnectTimeout}.get(
                stage, httpx.ReadTimeout
            )
            raise timeout_type(f"no answer within {self._timeout:g}s", request=request) from exc
        except OSError as exc:
            error_type = httpx.ConnectError if stage == "connect" else httpx.WriteError
            raise error_type(str(exc) or type(exc).__name__, request=request) from exc
        except httpx.TransportError as exc:
            exc.request = request
            raise
        finally:
            if conn is not None:
                self._discard(conn)
        return httpx.Response(status, headers=headers, content=content, request=request)

    def _idle(self, origin: _Origin) -> _Connection | None:
        """The most recently used live connection; stale ones are closed on the way."""
        now = time.monotonic()
        while origin.idle:
            conn = origin.idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            self._discard(conn)
        return None

    async def _connect(self, scheme: bytes, host: bytes, port: int) -> _Connection:
        context = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()  # certifi's roots, as httpx would
                self._ssl.set_alpn_protocols(["http/1.1"])
            context = self._ssl
        name = host.decode("ascii")
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection, name, port, ssl=context, server_hostname=name if context else None
        )
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._origins.clear()
