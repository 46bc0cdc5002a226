"""The HTTP layer under firebase-admin (notifications/transport.py) against small local servers:
keep-alive reuse, answers framed by length or chunks, a server that closes, a timeout, TLS, and
the lean httpx client sending what stock httpx would."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notifications.transport import FcmHttpClient, Http11Transport

Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]
"""Gets the request head and body; writes an answer; returns whether to keep the connection."""


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not await self.handler(head, body, writer):
                    return
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Server, int]]:
    server = Server(handler)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield server, listening.sockets[0].getsockname()[1]
    finally:
        listening.close()


@asynccontextmanager
async def client_of(
    handler: Handler, *, connections: int = 1, request_timeout: float = 5
) -> AsyncIterator[tuple[Server, str, httpx.AsyncClient]]:
    """A server, its URL and an httpx client on a fresh `Http11Transport`."""
    async with (
        serving(handler) as (server, port),
        httpx.AsyncClient(
            transport=Http11Transport(connections=connections, timeout=request_timeout)
        ) as client,
    ):
        yield server, f"http://127.0.0.1:{port}/", client


def answer(body: bytes = b'{"ok":true}', *, close: bool = False) -> Handler:
    async def handler(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        extra = b"Connection: close\r\n" if close else b""
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra, len(body), body)
        )
        await writer.drain()
        return not close

    return handler


async def test_one_connection_carries_request_after_request():
    async with serving(answer()) as (server, port):
        transport = Http11Transport(connections=4, timeout=5)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(5):
                response = await client.post(f"http://127.0.0.1:{port}/send", json={"a": 1})
                assert (response.status_code, response.json()) == (200, {"ok": True})
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_concurrent_requests_stay_within_the_connection_limit():
    async def slowly(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.01)
        return await answer(body)(head, body, writer)

    async with client_of(slowly, connections=3, request_timeout=5) as (server, url, client):
        answers = await asyncio.gather(*(client.post(url, content=str(i).encode()) for i in range(30)))
    assert [r.content for r in answers] == [str(i).encode() for i in range(30)]
    assert server.connections == 3


async def test_a_chunked_answer_in_pieces():
    async def chunked(_: bytes, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b'{"name":', b'"projects/p/messages/1"}'):
            await writer.drain()
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with client_of(chunked, connections=1, request_timeout=5) as (server, url, client):
        for _ in range(2):
            response = await client.post(url)
            assert response.json() == {"name": "projects/p/messages/1"}
    assert server.connections == 1


async def test_connection_close_and_a_server_gone_idle_open_a_new_connection():
    async with client_of(answer(close=True), connections=2, request_timeout=5) as (server, url, client):
        for _ in range(3):
            assert (await client.get(url)).status_code == 200
    assert server.connections == 3

    async def close_after_answering(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await answer()(head, body, writer)
        return False  # the server closes the kept-alive connection while it is idle

    async with client_of(close_after_answering, connections=2, request_timeout=5) as (server, url, client):
        for _ in range(3):
            assert (await client.get(url)).status_code == 200
            await asyncio.sleep(0.05)  # its FIN arrives
    assert server.connections == 3


async def test_a_server_that_closes_without_answering_is_a_transport_error():
    async def hang_up(_: bytes, __: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    async with client_of(hang_up, connections=1, request_timeout=5) as (_, url, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(url, json={})


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_not_reused():
    calls = 0
    late = asyncio.Event()

    async def first_never(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await late.wait()
            await answer()(head, body, writer)  # too late, on a connection the client closed
            return False
        return await answer()(head, body, writer)

    async with client_of(first_never, connections=1, request_timeout=0.2) as (server, url, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url)
        late.set()
        assert (await client.post(url)).status_code == 200
    assert server.connections == 2


async def test_nothing_listening_is_a_connect_error():
    async with serving(answer()) as (_, port):
        pass
    async with httpx.AsyncClient(transport=Http11Transport(connections=1, timeout=5)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_a_line_break_in_a_header_is_refused_before_sending():
    async with client_of(answer(), connections=1, request_timeout=5) as (server, url, client):
        request = client.build_request("GET", url)
        request.headers["X-Evil"] = "a\r\nInjected: yes"
        with pytest.raises(httpx.LocalProtocolError):
            await client.send(request)
    assert server.requests == []


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts only its certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_with_the_server_certificate_checked(tmp_path):
    server_tls, client_tls = self_signed(tmp_path)
    async with serving(answer(), tls=server_tls) as (server, port):
        transport = Http11Transport(connections=2, timeout=5, ssl_context=client_tls)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.post(f"https://127.0.0.1:{port}/", json={})).json() == {"ok": True}
        untrusting = Http11Transport(connections=1, timeout=5, ssl_context=ssl.create_default_context())
        async with httpx.AsyncClient(transport=untrusting) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(f"https://127.0.0.1:{port}/", json={})
    assert server.connections == 1


async def test_the_lean_client_sends_what_stock_httpx_sends():
    """Same request line, headers (names and values) and body as `httpx.AsyncClient.request`, for
    what firebase-admin passes; the answer reads the same."""
    async with serving(answer(b'{"name":"projects/p/messages/1"}')) as (server, port):
        url = f"http://127.0.0.1:{port}/v1/projects/p/messages:send"
        message = {"message": {"data": {"kind": "payment_failed"}, "notification": {"title": "Thanh toán"}}}
        options = {"headers": {"x-goog-api-client": "gl-python fire-admin"}, "timeout": 30}
        headers = {"X-GOOG-API-FORMAT-VERSION": "2", "X-FIREBASE-CLIENT": "fire-admin-python/7.7.0"}
        sent = []
        for client_type in (httpx.AsyncClient, FcmHttpClient, FcmHttpClient):
            transport = Http11Transport(connections=1, timeout=5)
            async with client_type(transport=transport, **options) as client:  # type: ignore[arg-type]
                response = await client.request("post", url, headers=dict(headers), json=message, timeout=30)
                response.raise_for_status()
                assert response.json() == {"name": "projects/p/messages/1"}
                assert response.request.extensions["timeout"] == httpx.Timeout(30).as_dict()
            sent.append(server.requests[-1])
    stock, lean, lean_again = (
        (head.split(b"\r\n")[0], sorted(head.split(b"\r\n")[1:]), body) for head, body in sent
    )
    assert lean == stock == lean_again  # the request line, the headers (in another order), the body
