"""An httpx transport that sends through aiohttp, for firebase-admin's FCM client.

firebase-admin sends each push as its own HTTP request through httpx. Under a batch of
hundreds of concurrent requests, httpcore's connection pool spends about 1.5 ms of CPU per
request re-scanning its queue (encode/httpcore#1035), which capped one worker at about 550
pushes/s. Putting aiohttp's connection pool under the same httpx client keeps everything
firebase-admin does (OAuth credential flow, retries of 500/503, error parsing into
UnregisteredError and friends) and removes that cost.
"""

from __future__ import annotations

import aiohttp
import httpx

_AIOHTTP_WRITES = frozenset({b"host", b"content-length", b"connection", b"accept-encoding"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, connections: int, timeout: float) -> None:
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that sends.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=self._timeout,
                auto_decompress=False,  # httpx decodes Content-Encoding itself
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        try:
            async with self._open().request(
                request.method,
                str(request.url),
                # aiohttp writes Host, Content-Length and Connection itself; handing over httpx's
                # copies only doubles its per-request header work.
                headers={
                    k.decode("latin-1"): v.decode("latin-1")
                    for k, v in request.headers.raw
                    if k.lower() not in _AIOHTTP_WRITES
                },
                data=body,
                allow_redirects=False,
            ) as response:
                content = await response.read()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            content=content,
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
