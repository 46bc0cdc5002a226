"""Sending pushes through FCM with firebase-admin.

Each sender is its own named firebase-admin app, so several can live in one process (tests,
the in-process dev worker) without sharing the HTTP client that `send_each_async` binds to the
first event loop it runs on.

Relies on firebase-admin internals, which is why pyproject pins `firebase-admin==7.7.0`:
- `messaging._get_messaging_service(app)._fcm_url` is replaced to send to another endpoint
  (the local FCM emulator); the library has no public option for it.
- `close()` closes the service's `_async_client` itself, because the library's own
  `delete_app` closes it with `asyncio.run`, which fails inside a running event loop.
- The service's `HttpxAsyncClient._async_client` (the `httpx.AsyncClient` it sends with) is
  replaced by `FcmHttpClient` (notifications/transport.py) on the same mounted retrying transports
  (`_async_client._mounts`), whose `_wrapped_transport` becomes our keep-alive HTTP/1.1 pool, whose
  `_retry` settings copy themselves without `copy.deepcopy`, and whose auth is `CurrentToken`.
  `send_each_async` itself (message encoding, retries of 500/503, error classes) is unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Generator
from typing import Any, Literal

import firebase_admin
import httpx
import msgspec
from firebase_admin import credentials, exceptions, messaging
from firebase_admin._retry import HttpxRetry
from google.auth.transport.requests import Request as GoogleAuthRequest

from notifications.transport import FcmHttpClient, Http11Transport

MAX_PER_CALL = 500  # send_each_async refuses more

# FCM's answers that mean "this token will never work again": stop sending to the device.
TOKEN_REJECTED: tuple[type[Exception], ...] = (
    messaging.UnregisteredError,
    messaging.SenderIdMismatchError,
    exceptions.InvalidArgumentError,
)


class Push(msgspec.Struct, frozen=True):
    device_id: uuid.UUID
    token: str
    title: str
    body: str
    data: dict[str, str]


class PushResult(msgspec.Struct, frozen=True):
    device_id: uuid.UUID
    outcome: Literal["sent", "token_rejected", "failed"]
    message_id: str | None = None
    error: str | None = None


class FcmSender:
    def __init__(self, service_account: dict[str, Any], *, endpoint: str | None, timeout: float) -> None:
        info = service_account
        self._app = firebase_admin.initialize_app(
            credentials.Certificate(info),
            {"projectId": info["project_id"], "httpTimeout": timeout},
            name=f"telehealth-push-{uuid.uuid4()}",
        )
        self._service: Any = messaging._get_messaging_service(self._app)
        if endpoint:
            self._service._fcm_url = endpoint
        self._credential = self._app.credential.get_credential()
        self._refreshing = asyncio.Lock()
        # Under firebase-admin's retrying transports, a lean HTTP/1.1 pool instead of httpcore,
        # and over them a lean httpx client instead of the stock one (transport.py).
        self._transport = Http11Transport(connections=64, timeout=timeout)
        wrapper = self._service._async_client  # firebase-admin's HttpxAsyncClient
        for retrying in wrapper._mounts.values():
            retrying._wrapped_transport = self._transport
            retrying._retry = _RetrySettings.of(retrying._retry)
        stock: httpx.AsyncClient = wrapper._async_client  # never sent with: no connection to close
        client = FcmHttpClient(
            headers=stock.headers,
            timeout=stock.timeout,
            auth=CurrentToken(self._credential),
            mounts=wrapper._mounts,
            transport=self._transport,  # unused (both schemes are mounted), instead of an httpcore pool
        )
        # Pushes are a few hundred bytes of JSON: not worth a compressed answer.
        client.headers["Accept-Encoding"] = "identity"
        wrapper._async_client = client

    async def send(self, pushes: list[Push]) -> list[PushResult]:
        """Send each push; one result per push, in order. Never raises for a failed device."""
        await self._fresh_credential()
        chunks = [pushes[start : start + MAX_PER_CALL] for start in range(0, len(pushes), MAX_PER_CALL)]
        # Chunks at once: the connection pool bounds what is in flight, and no chunk's tail waits
        # for the one before it.
        batches = await asyncio.gather(
            *(messaging.send_each_async([_message(p) for p in chunk], app=self._app) for chunk in chunks)
        )
        return [
            _result(push, response)
            for chunk, batch in zip(chunks, batches, strict=True)
            for push, response in zip(chunk, batch.responses, strict=True)
        ]

    async def _fresh_credential(self) -> None:
        # google-auth refreshes the OAuth token with a blocking HTTP call inside the request;
        # do it in a thread beforehand so the event loop never waits on it. One refresh at a
        # time: the worker's passes run side by side (Worker.lanes).
        if self._credential.valid:
            return
        async with self._refreshing:
            if not self._credential.valid:
                await asyncio.to_thread(self._credential.refresh, GoogleAuthRequest())

    async def close(self) -> None:
        await self._service._async_client.aclose()
        await self._transport.aclose()
        firebase_admin._apps.pop(self._app.name, None)


class _RetrySettings(HttpxRetry):  # type: ignore[misc]  # firebase-admin ships no type hints
    """firebase-admin's retry settings (same values, same logic). The retrying transport copies them
    for each request with `copy.deepcopy`, about a tenth of a push's CPU; a shallow copy with its
    own history list is all a request needs."""

    @classmethod
    def of(cls, settings: HttpxRetry) -> _RetrySettings:
        twin = cls.__new__(cls)
        twin.__dict__.update(copy.deepcopy(settings.__dict__))
        return twin

    def copy(self) -> _RetrySettings:
        twin = object.__new__(_RetrySettings)
        twin.__dict__.update(self.__dict__)
        twin.history = list(self.history)
        return twin


class CurrentToken(httpx.Auth):
    """The service account's OAuth token on each request.

    firebase-admin's own auth flow builds a `requests` session per request in case the token
    needs refreshing: an eighth of a push's CPU. Here the token is refreshed before each batch
    (`_fresh_credential`, in a thread), so the header is all a request needs. A 401 (a token
    revoked early) fails that push as transient and makes the next batch refresh first.
    """

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._credential.token}"
        response = yield request
        if response.status_code == 401:
            self._credential.token = None  # `valid` is False now: the next batch refreshes


_ANDROID = messaging.AndroidConfig(priority="high")  # only read by the encoder: one for all


def _message(push: Push) -> messaging.Message:
    # `fid`: firebase-admin 7.7 deprecates `token=` for the same registration token.
    return messaging.Message(
        fid=push.token,
        notification=messaging.Notification(title=push.title, body=push.body),
        data=push.data,
        android=_ANDROID,
    )


def _result(push: Push, response: messaging.SendResponse) -> PushResult:
    if response.success:
        return PushResult(push.device_id, "sent", message_id=response.message_id)
    error = response.exception
    code = getattr(error, "code", type(error).__name__)
    outcome: Literal["token_rejected", "failed"] = (
        "token_rejected" if isinstance(error, TOKEN_REJECTED) else "failed"
    )
    return PushResult(push.device_id, outcome, error=f"{code}: {type(error).__name__}")
