"""A local server that speaks the FCM HTTP v1 API, so the real firebase-admin runs offline.

There is no official FCM emulator. This one serves the two endpoints firebase-admin needs to send:

- `POST /token`, the service account's `token_uri`: the OAuth 2.0 JWT-bearer grant. The assertion is
  verified (RS256 only) against the public half of the service account this emulator generated.
  google-auth always signs it with `aud` = `https://oauth2.googleapis.com/token`, whatever the
  `token_uri`, so that audience is accepted as well as the emulator's own token URI.
- `POST /v1/projects/{project_id}/messages:send`, with a bearer token issued by `/token`.

Errors are Google's JSON (`{"error": {"code", "message", "status", "details": [FcmError]}}`), so the
library raises the same exception classes as against FCM.

A device is addressed by `message.fid` (firebase-admin 7.7: `Message(fid=...)`) or the deprecated
`message.token`; both are opaque strings, so the emulator reads the outcome from their prefix:

    unregistered-…  404 NOT_FOUND, UNREGISTERED                → messaging.UnregisteredError
    invalid-…       400 INVALID_ARGUMENT                       → exceptions.InvalidArgumentError
    mismatch-…      403 PERMISSION_DENIED, SENDER_ID_MISMATCH  → messaging.SenderIdMismatchError
    quota-…         429 RESOURCE_EXHAUSTED, QUOTA_EXCEEDED     → messaging.QuotaExceededError
    unavailable-…   503 UNAVAILABLE                            → exceptions.UnavailableError
                    (firebase-admin retries 500 and 503 four times, ~7 s of backoff, before giving up)
    slow-…          succeeds after `slow_seconds`
    anything else   200 `{"name": "projects/<p>/messages/<id>"}`

Messages to a topic or condition succeed. `outage(status)`, `hold()`/`release()` and `reset()` steer
it from another thread; every request that passes auth is recorded as a `Received`.

In process (tests, the dev default), `start()` runs it on its own thread and event loop: google-auth
refreshes tokens with a blocking `requests` call, which would deadlock an emulator sharing the
caller's loop. Point firebase-admin at it with its service account and the send URL:

    emulator = FcmEmulator().start()
    app = firebase_admin.initialize_app(credentials.Certificate(emulator.service_account_info()),
                                        {"projectId": emulator.project_id}, name="push")
    messaging._get_messaging_service(app)._fcm_url = emulator.send_url

As its own process (the benchmark), it keeps counts only, served at `GET /emulator/stats`:

    python -m notifications.fcm_emulator --port 8089 --service-account /tmp/fcm-sa.json

With `--record N` it also keeps, for each of the first N messages:send requests, an `Arrival`: the
message's `data.notification_id`, its device, `time.time()` when the request reached the handler and
the status answered (about 350 bytes each with FCM-length tokens); past N it only counts them.
`bench/notifications.py` measures end-to-end latency and exactly-once delivery with them.
`GET /emulator/arrivals` returns them as `{"arrivals": [[notification_id, token, at, status], ...],
"dropped": n}`; `DELETE` forgets them and starts again from 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, quote

import msgspec
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt
from jose.exceptions import JOSEError

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME_SECONDS = 3600

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_OUTAGE_MESSAGES = {
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
}


def google_error(code: int, message: str, fcm_error: str | None = None) -> bytes:
    """An error body as Google APIs send it; `fcm_error` adds the FcmError detail firebase-admin maps."""
    error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS_NAMES.get(code, "UNKNOWN")}
    if fcm_error:
        error["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_error}
        ]
    return msgspec.json.encode({"error": error})


_TOKEN_ERRORS: dict[str, tuple[int, bytes]] = {
    "unregistered": (404, google_error(404, "Requested entity was not found.", "UNREGISTERED")),
    "invalid": (
        400,
        google_error(400, "The registration token is not a valid FCM registration token", "INVALID_ARGUMENT"),
    ),
    "mismatch": (403, google_error(403, "SenderId mismatch", "SENDER_ID_MISMATCH")),
    "quota": (
        429,
        google_error(429, "Quota exceeded for sending messages to this device.", "QUOTA_EXCEEDED"),
    ),
    "unavailable": (503, google_error(503, _OUTAGE_MESSAGES[503], "UNAVAILABLE")),
}
_UNAUTHENTICATED = google_error(
    401,
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential.",
)
_NOT_FOUND = google_error(404, "The requested URL was not found on this server.")
_METHOD_NOT_ALLOWED = google_error(405, "Method not allowed.")
_HEADERS_JSON = (b"content-type", b"application/json; charset=UTF-8")
# firebase-admin 7.7 deprecates Message.token (a DeprecationWarning) for Message.fid, the Firebase
# installation ID; both address one device.
_TARGETS = ("fid", "token", "topic", "condition")


class Arrival(msgspec.Struct, frozen=True, array_like=True):
    """When a messages:send request for one device arrived: what `--record` keeps (compact, no body)."""

    notification_id: str  # the message's data.notification_id; "" without one
    token: str
    at: float  # time.time() as the handler started
    status: int


class Received(msgspec.Struct, frozen=True):
    """One messages:send request that passed auth, and the status it was answered with."""

    token: str  # the message's fid or token; "" for a topic or condition, or a body without a message
    message: dict[str, Any]
    at: float
    status: int
    validate_only: bool = False


def _message_problem(body: Any) -> str | None:
    """Why FCM would reject this request body as INVALID_ARGUMENT, or None."""
    if not isinstance(body, dict) or not isinstance(message := body.get("message"), dict):
        return "Invalid JSON payload received. 'message' must be an object."
    if not isinstance(body.get("validate_only", False), bool):
        return "Invalid value at 'validate_only' (TYPE_BOOL)."
    targets = [key for key in _TARGETS if key in message]
    if len(targets) != 1:
        return "Exactly one of message.fid, message.token, message.topic or message.condition must be set."
    if not isinstance(message[targets[0]], str) or not message[targets[0]]:
        return f"Invalid value at 'message.{targets[0]}': a non-empty string is required."
    data = message.get("data")
    if data is not None and (
        not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values())
    ):
        return "Invalid value at 'message.data': the values of data must be strings."
    return None


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_HEADERS_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _EmbeddedConfig(uvicorn.Config):
    # uvicorn.Config configures the process's logging (dictConfig, uvicorn.* levels and handlers).
    # The emulator shares its process with tests or the API server: leave their logging alone.
    def configure_logging(self) -> None:
        pass


class FcmEmulator:
    """The FCM HTTP v1 API and its OAuth token endpoint, on a uvicorn thread of its own."""

    def __init__(
        self,
        *,
        project_id: str = "telehealth-dev",
        host: str = "127.0.0.1",
        port: int = 0,
        keep_records: bool = True,
        record_arrivals: int = 0,
    ) -> None:
        self.project_id = project_id
        self.host = host
        self.port = port
        # False for a long-running process: counts in `statuses` only, not every message in memory.
        self.keep_records = keep_records
        # Up to this many `Arrival`s kept (0: none); past it they are only counted in `arrivals_dropped`.
        self.record_arrivals = record_arrivals
        self.arrivals: list[Arrival] = []
        self.arrivals_dropped = 0
        self.slow_seconds = 2.0
        self.received: list[Received] = []
        self.statuses: Counter[int] = Counter()
        self.token_exchanges = 0
        self.client_email = f"firebase-adminsdk-emulator@{project_id}.iam.gserviceaccount.com"
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public_key = jwk.construct(
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            algorithm="RS256",
        )
        self._key_id = secrets.token_hex(20)
        self._client_id = str(secrets.randbelow(10**21))
        self._access_tokens: dict[str, float] = {}  # token → monotonic expiry
        self._message_ids = itertools.count(1)
        self._message_id_suffix = secrets.token_hex(8)
        # Read on every request by the emulator thread, replaced whole by the controls: no lock needed.
        self._outage: tuple[int, bytes] | None = None
        self._gate: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle

    def start(self, timeout: float = 10.0) -> Self:
        """Serve on a daemon thread; returns once serving, with `port` set to the real port."""
        if self._thread is not None:
            raise RuntimeError("FcmEmulator: already started")
        # Bound here, not by uvicorn: a taken port raises OSError in the caller, the real port is known
        # at once, and uvicorn does not log a second "Uvicorn running on" next to the API server's.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        config = _EmbeddedConfig(
            self._asgi,
            access_log=False,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            server_header=False,
            # Longer than httpx's 5 s pool expiry, so idle connections are closed by the client: a
            # server closing one as the client reuses it fails that request.
            timeout_keep_alive=120,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=self._serve, args=(server, sock), name="fcm-emulator", daemon=True)
        self._server, self._thread = server, thread
        self.port = sock.getsockname()[1]
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"FcmEmulator: the server on {self.url} did not start")
            time.sleep(0.005)
        return self

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            self._loop = runner.get_loop()
            runner.run(server.serve(sockets=[sock]))

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.release()
        # Don't wait for slow or held responses still in flight: they are cancelled.
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)
        self._server = self._thread = self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Addresses and credentials

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FcmEmulator: port 0 is chosen at start(); start it first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def send_url(self) -> str:
        return f"{self.url}/v1/projects/{self.project_id}/messages:send"

    def service_account_info(self) -> dict[str, str]:
        """A service-account key file's content, whose token_uri is this emulator."""
        private_key = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self._key_id,
            "private_key": private_key,
            "client_email": self.client_email,
            "client_id": self._client_id,
            # Google's values, as in a downloaded key: google-auth never fetches them.
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{quote(self.client_email)}",
            "universe_domain": "googleapis.com",
        }

    def write_service_account(self, path: Path) -> Path:
        """Write `service_account_info()` as JSON, readable by the owner only (it holds a private key)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # the mode given to open() applies to new files only
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(self.service_account_info(), file, indent=2)
        return path

    # Controls, callable from any thread

    def outage(self, status: int | None) -> None:
        """While set, every messages:send answers `status` with Google's error; None ends it."""
        if status is None:
            self._outage = None
            return
        message = _OUTAGE_MESSAGES.get(status, f"Emulated outage: HTTP {status}.")
        fcm_error = _STATUS_NAMES[status] if status in _OUTAGE_MESSAGES else None
        self._outage = (status, google_error(status, message, fcm_error))

    def hold(self) -> None:
        """Record messages:send requests as they arrive but answer none until `release()`."""
        if self._gate is None:
            # Bound to the emulator's loop on first wait, there; set only from that loop (release()).
            self._gate = asyncio.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits on the gate
                self._loop.call_soon_threadsafe(gate.set)

    def revoke_tokens(self) -> None:
        """Forget every access token issued, as Google does when a key is revoked: sends get 401."""
        self._access_tokens = {}

    def reset(self) -> None:
        """Forget records and counts, end any outage and hold. Issued access tokens stay valid."""
        self.outage(None)
        self.release()
        self.received.clear()
        self.statuses.clear()
        self.token_exchanges = 0
        self.arrivals, self.arrivals_dropped = [], 0

    # Records

    def snapshot(self) -> list[Received]:
        return list(self.received)

    def sent_to(self, token: str) -> list[Received]:
        """The messages delivered to `token`: answered 200 and not validate-only."""
        return [r for r in self.snapshot() if r.token == token and r.status == 200 and not r.validate_only]

    # Its own timeout rather than asyncio.timeout() around it: the error then tells what the emulator saw.
    async def wait_for(
        self,
        predicate: Callable[[FcmEmulator], bool],
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Poll `predicate(self)` from the caller's event loop until true; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                name = getattr(predicate, "__qualname__", repr(predicate))
                raise TimeoutError(f"FcmEmulator: {name} still false after {timeout} s; {self._describe()}")
            await asyncio.sleep(0.01)

    def _describe(self) -> str:
        records = self.snapshot()
        statuses = ", ".join(f"{count}× {status}" for status, count in sorted(self.statuses.items()))
        last = "; ".join(f"{r.token or '(topic/condition)'} → {r.status}" for r in records[-5:])
        return (
            f"{len(records)} send requests recorded ({statuses or 'none'}), last: {last or 'none'}; "
            f"{self.token_exchanges} token exchanges; outage={self._outage and self._outage[0]}, "
            f"held={self._gate is not None}"
        )

    # The ASGI app, on the emulator's thread

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; nothing else is served
            return
        path: str = scope["path"]
        if path.startswith("/v1/projects/") and path.endswith("/messages:send"):
            if scope["method"] != "POST":
                return await _respond(send, 405, _METHOD_NOT_ALLOWED)
            project = path[len("/v1/projects/") : -len("/messages:send")]
            return await self._send_message(project, scope, await _read_body(receive), send)
        if path == "/token":
            if scope["method"] != "POST":
                return await _respond(send, 405, _METHOD_NOT_ALLOWED)
            return await self._token(await _read_body(receive), send)
        if path == "/emulator/stats":
            stats = {
                "received": sum(self.statuses.values()),
                "statuses": {str(status): count for status, count in self.statuses.items()},
                "token_exchanges": self.token_exchanges,
            }
            return await _respond(send, 200, msgspec.json.encode(stats))
        if path == "/emulator/arrivals":
            if scope["method"] == "DELETE":
                self.arrivals, self.arrivals_dropped = [], 0
                return await _respond(send, 200, b"{}")
            if scope["method"] != "GET":
                return await _respond(send, 405, _METHOD_NOT_ALLOWED)
            arrivals = {"arrivals": self.arrivals, "dropped": self.arrivals_dropped}
            return await _respond(send, 200, msgspec.json.encode(arrivals))
        await _respond(send, 404, _NOT_FOUND)

    async def _token(self, raw: bytes, send: Send) -> None:
        form = parse_qs(raw.decode("utf-8", "replace"))
        grant_type = form.get("grant_type", [""])[0]
        if grant_type != JWT_BEARER_GRANT:
            body = {
                "error": "unsupported_grant_type",
                "error_description": f"Invalid grant_type: {grant_type}",
            }
            return await _respond(send, 400, msgspec.json.encode(body))
        try:
            claims = jwt.decode(
                form.get("assertion", [""])[0],
                self._public_key,
                algorithms=["RS256"],
                issuer=self.client_email,
                # aud is checked below: jose compares it with one audience, two are accepted.
                # (require_aud would turn verify_aud back on.)
                options={"verify_aud": False, "require_exp": True, "require_iss": True},
            )
            if claims.get("aud") not in (self.token_uri, GOOGLE_TOKEN_URI):
                raise JOSEError(f"Invalid audience {claims.get('aud')!r}")
        except JOSEError as exc:
            body = {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
            return await _respond(send, 400, msgspec.json.encode(body))
        access_token = f"ya29.emulator-{secrets.token_urlsafe(32)}"
        self._access_tokens[access_token] = time.monotonic() + TOKEN_LIFETIME_SECONDS
        self.token_exchanges += 1
        answer = {"access_token": access_token, "expires_in": TOKEN_LIFETIME_SECONDS, "token_type": "Bearer"}
        await _respond(send, 200, msgspec.json.encode(answer))

    async def _send_message(self, project: str, scope: Scope, raw: bytes, send: Send) -> None:
        arrived = time.time()
        access_token = _bearer(scope["headers"])
        expiry = self._access_tokens.get(access_token) if access_token else None
        if expiry is None or expiry < time.monotonic():
            return await _respond(send, 401, _UNAUTHENTICATED)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = None
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            message = {}
        token = message.get("fid", message.get("token"))
        token = token if isinstance(token, str) else ""
        validate_only = isinstance(body, dict) and body.get("validate_only") is True

        if self._outage is not None:
            status, answer = self._outage
        elif project != self.project_id:
            status = 403
            answer = google_error(
                403, f"Permission 'cloudmessaging.messages.create' denied on resource 'projects/{project}'."
            )
        elif problem := _message_problem(body):
            status, answer = 400, google_error(400, problem, "INVALID_ARGUMENT")
        else:
            status, answer = _TOKEN_ERRORS.get(token.partition("-")[0], (200, b""))

        self.statuses[status] += 1
        if self.keep_records:
            self.received.append(Received(token, message, arrived, status, validate_only))
        if self.record_arrivals:
            self._record_arrival(message, token, arrived, status)
        if (gate := self._gate) is not None:
            await gate.wait()
        if status == 200:
            if token.startswith("slow-"):
                await asyncio.sleep(self.slow_seconds)
            # FCM's ids look like "0:1700000000000000%31bd1c9631bd1c96"; dry runs get a fixed fake one.
            message_id = (
                "fake_message_id"
                if validate_only
                else f"0:{next(self._message_ids)}%{self._message_id_suffix}"
            )
            answer = msgspec.json.encode({"name": f"projects/{project}/messages/{message_id}"})
        await _respond(send, status, answer)

    def _record_arrival(self, message: dict[str, Any], token: str, at: float, status: int) -> None:
        if len(self.arrivals) >= self.record_arrivals:
            self.arrivals_dropped += 1
            return
        data = message.get("data")
        notification_id = data.get("notification_id") if isinstance(data, dict) else None
        self.arrivals.append(
            Arrival(notification_id if isinstance(notification_id, str) else "", token, at, status)
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m notifications.fcm_emulator",
        description="Serve the FCM HTTP v1 API locally until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--project-id", default="telehealth-dev")
    parser.add_argument(
        "--service-account", type=Path, help="write the matching service-account JSON here (mode 0600)"
    )
    parser.add_argument(
        "--record",
        type=int,
        default=0,
        metavar="N",
        help="keep the arrival time of the first N messages (GET /emulator/arrivals); 0: counts only",
    )
    args = parser.parse_args(argv)
    if args.record < 0:
        parser.error("--record must be >= 0")

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    with FcmEmulator(
        project_id=args.project_id,
        host=args.host,
        port=args.port,
        keep_records=False,
        record_arrivals=args.record,
    ) as emulator:
        if args.service_account:
            emulator.write_service_account(args.service_account)
        print(f"FCM emulator listening on {emulator.url}", flush=True)
        stopping.wait()


if __name__ == "__main__":
    main()
