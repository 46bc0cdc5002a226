"""The FCM emulator, driven by the real firebase-admin: token exchange, sends, errors, outages, holds."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import firebase_admin
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from firebase_admin import credentials, exceptions, messaging
from firebase_admin._retry import HttpxRetry
from jose import jwt

from notifications.fcm_emulator import GOOGLE_TOKEN_URI, JWT_BEARER_GRANT, FcmEmulator

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "telehealth-test"


@pytest.fixture(scope="module")
def emulator() -> Iterator[FcmEmulator]:
    with FcmEmulator(project_id=PROJECT) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: FcmEmulator) -> None:
    emulator.reset()


def open_app(certificate: dict[str, str] | str, send_url: str) -> Any:
    """A firebase-admin app whose credential and messaging service talk to an emulator."""
    app = firebase_admin.initialize_app(
        credentials.Certificate(certificate), {"projectId": PROJECT}, name=f"fcm-test-{uuid.uuid4().hex}"
    )
    messaging._get_messaging_service(app)._fcm_url = send_url
    return app


async def close_app(app: Any) -> None:
    # delete_app() closes the messaging service with asyncio.run(), which raises inside a running
    # loop. Close its httpx client here, on the loop its connections belong to; then delete_app()
    # on a worker thread, where that asyncio.run() closes an already closed client: a no-op.
    await messaging._get_messaging_service(app)._async_client.aclose()
    await asyncio.to_thread(firebase_admin.delete_app, app)


@pytest.fixture
async def fcm_app(emulator: FcmEmulator) -> AsyncIterator[Any]:
    app = open_app(emulator.service_account_info(), emulator.send_url)
    yield app
    await close_app(app)


def without_backoff(app: Any) -> None:
    # firebase-admin retries 500 and 503 four times, waiting 0, 1, 2 then 4 s. Keep the retries, drop the waits.
    transport = messaging._get_messaging_service(app)._async_client._mounts["http://"]
    transport._retry = HttpxRetry(max_retries=4, status_forcelist=[500, 503], backoff_factor=0)


async def send(app: Any, *fids: str, **fields: Any) -> Any:
    """One batch through the library; its per-message responses."""
    batch = await messaging.send_each_async([messaging.Message(fid=fid, **fields) for fid in fids], app=app)
    return batch.responses


def assertion(emulator: FcmEmulator, key: Any = None, algorithm: str = "RS256", **claims: Any) -> str:
    """A JWT-bearer assertion as google-auth makes one, signed with the emulator's key unless told."""
    now = int(time.time())
    payload = {
        "iss": emulator.client_email,
        "aud": GOOGLE_TOKEN_URI,
        "iat": now,
        "exp": now + 3600,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
    }
    payload.update(claims)
    signing_key = key or emulator.service_account_info()["private_key"]
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, signing_key, algorithm=algorithm)


async def exchange(client: httpx.AsyncClient, emulator: FcmEmulator, signed: str) -> httpx.Response:
    return await client.post(emulator.token_uri, data={"grant_type": JWT_BEARER_GRANT, "assertion": signed})


async def test_send_returns_message_id_and_records_the_message(emulator: FcmEmulator, fcm_app: Any) -> None:
    notification = messaging.Notification(title="Lịch hẹn", body="Bác sĩ sẽ gọi lúc 9:00")
    [response] = await send(fcm_app, "device-1", notification=notification, data={"kind": "appointment"})

    assert response.success, response.exception
    assert response.message_id.startswith(f"projects/{PROJECT}/messages/0:")
    [received] = emulator.sent_to("device-1")
    assert received.message == {
        "fid": "device-1",
        "notification": {"title": "Lịch hẹn", "body": "Bác sĩ sẽ gọi lúc 9:00"},
        "data": {"kind": "appointment"},
    }
    assert abs(received.at - time.time()) < 5

    # The access token is reused; a dry run is answered like FCM's but delivers nothing; a topic works.
    dry = await messaging.send_each_async([messaging.Message(fid="device-1")], dry_run=True, app=fcm_app)
    assert dry.responses[0].message_id == f"projects/{PROJECT}/messages/fake_message_id"
    topic = await messaging.send_each_async([messaging.Message(topic="clinic-news")], app=fcm_app)
    assert topic.success_count == 1
    assert len(emulator.sent_to("device-1")) == 1
    assert [r.token for r in emulator.snapshot()] == ["device-1", "device-1", ""]
    assert emulator.token_exchanges == 1


async def test_token_prefixes_map_to_firebase_admin_exceptions(emulator: FcmEmulator, fcm_app: Any) -> None:
    without_backoff(fcm_app)
    expected: dict[str, tuple[Any, int]] = {
        "device-2": (None, 200),
        "unregistered-2": (messaging.UnregisteredError, 404),
        "invalid-2": (exceptions.InvalidArgumentError, 400),
        "mismatch-2": (messaging.SenderIdMismatchError, 403),
        "quota-2": (messaging.QuotaExceededError, 429),
        "unavailable-2": (exceptions.UnavailableError, 503),
    }
    responses = await send(fcm_app, *expected)

    for (fid, (exception_type, status)), response in zip(expected.items(), responses, strict=True):
        if exception_type is None:
            assert response.success, response.exception
        else:
            assert type(response.exception) is exception_type, (fid, response.exception)
            assert response.exception.http_response.status_code == status
    # The library retried the 503 four times; every other message was answered once.
    tokens = [r.token for r in emulator.snapshot()]
    assert tokens.count("unavailable-2") == 5
    assert all(tokens.count(fid) == 1 for fid in expected if fid != "unavailable-2")


async def test_missing_or_unknown_bearer_is_refused(emulator: FcmEmulator) -> None:
    async with httpx.AsyncClient() as client:
        for headers in (
            {},
            {"Authorization": "Bearer ya29.never-issued"},
            {"Authorization": "Basic dXNlcg=="},
        ):
            response = await client.post(emulator.send_url, json={"message": {"fid": "x"}}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["status"] == "UNAUTHENTICATED"
    assert emulator.snapshot() == []


async def test_token_endpoint_verifies_the_assertion(emulator: FcmEmulator) -> None:
    other_key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    refused = {
        "forged": assertion(emulator, key=other_key),
        "wrong issuer": assertion(emulator, iss="someone@else.iam.gserviceaccount.com"),
        "wrong audience": assertion(emulator, aud="https://example.com/token"),
        "expired": assertion(emulator, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "no expiry": assertion(emulator, exp=None),
        "HS256": assertion(emulator, key="shared-secret", algorithm="HS256"),
        "not a JWT": "not-a-jwt",
    }
    async with httpx.AsyncClient() as client:
        for case, signed in refused.items():
            response = await exchange(client, emulator, signed)
            assert response.status_code == 400, case
            assert response.json()["error"] == "invalid_grant", case
        wrong_grant = await client.post(emulator.token_uri, data={"grant_type": "client_credentials"})
        assert wrong_grant.json()["error"] == "unsupported_grant_type"
        assert emulator.token_exchanges == 0

        # The emulator's own token URI is accepted as audience too.
        granted = await exchange(client, emulator, assertion(emulator, aud=emulator.token_uri))
        assert granted.status_code == 200
        assert granted.json()["expires_in"] == 3600
        assert granted.json()["token_type"] == "Bearer"
        bearer = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        sent = await client.post(emulator.send_url, json={"message": {"token": "device-3"}}, headers=bearer)
        assert sent.status_code == 200
        assert sent.json()["name"].startswith(f"projects/{PROJECT}/messages/")
    assert emulator.token_exchanges == 1


async def test_invalid_requests_are_answered_like_fcm(emulator: FcmEmulator) -> None:
    async with httpx.AsyncClient() as client:
        granted = await exchange(client, emulator, assertion(emulator))
        bearer = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        invalid = {
            "data not strings": {"message": {"fid": "device-4", "data": {"count": 3}}},
            "two targets": {"message": {"fid": "device-4", "topic": "news"}},
            "no target": {"message": {"notification": {"title": "?"}}},
            "no message": {"validate_only": True},
        }
        for case, body in invalid.items():
            response = await client.post(emulator.send_url, json=body, headers=bearer)
            assert response.status_code == 400, case
            assert response.json()["error"]["status"] == "INVALID_ARGUMENT", case
        not_json = await client.post(emulator.send_url, content=b"{", headers=bearer)
        assert not_json.status_code == 400
        other_project = emulator.send_url.replace(PROJECT, "someone-elses")
        response = await client.post(other_project, json={"message": {"fid": "device-4"}}, headers=bearer)
        assert response.status_code == 403
        assert response.json()["error"]["status"] == "PERMISSION_DENIED"
    assert [r.status for r in emulator.snapshot()] == [400, 400, 400, 400, 400, 403]
    assert emulator.sent_to("device-4") == []


async def test_outage_fails_sends_after_the_library_retries(emulator: FcmEmulator, fcm_app: Any) -> None:
    without_backoff(fcm_app)
    emulator.outage(503)
    [response] = await send(fcm_app, "device-5")
    assert type(response.exception) is exceptions.UnavailableError
    assert [r.status for r in emulator.snapshot()] == [503] * 5

    emulator.outage(500)
    [response] = await send(fcm_app, "device-5")
    assert type(response.exception) is exceptions.InternalError

    emulator.outage(None)
    [response] = await send(fcm_app, "device-5")
    assert response.success
    assert len(emulator.sent_to("device-5")) == 1


async def test_a_send_retried_through_a_short_outage_succeeds(emulator: FcmEmulator, fcm_app: Any) -> None:
    # The library's real backoff: the first retry is immediate, the second comes a second later.
    emulator.outage(503)
    sending = asyncio.create_task(send(fcm_app, "device-6"))
    await emulator.wait_for(lambda e: len(e.received) >= 2)
    emulator.outage(None)

    [response] = await sending
    assert response.success
    assert [r.status for r in emulator.snapshot()] == [503, 503, 200]


async def test_held_responses_wait_for_release(emulator: FcmEmulator, fcm_app: Any) -> None:
    emulator.hold()
    sending = asyncio.create_task(send(fcm_app, "device-7", "device-8"))
    await emulator.wait_for(lambda e: len(e.received) == 2)
    await asyncio.sleep(0.1)
    # FCM has accepted both; the sender has heard nothing yet.
    assert not sending.done()
    assert emulator.sent_to("device-7") and emulator.sent_to("device-8")

    emulator.release()
    responses = await asyncio.wait_for(sending, timeout=5)
    assert all(r.success for r in responses)


async def test_slow_prefix_delays_only_that_message(
    emulator: FcmEmulator, fcm_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulator, "slow_seconds", 0.3)
    await send(fcm_app, "device-9")  # the token exchange, out of the timing

    async def timed(fid: str) -> float:
        started = time.monotonic()
        [response] = await send(fcm_app, fid)
        assert response.success, response.exception
        return time.monotonic() - started

    sent_at = time.time()
    fast, slow = await asyncio.gather(timed("device-9"), timed("slow-9"))
    assert slow >= 0.3 > fast
    assert emulator.sent_to("slow-9")[0].at - sent_at < 0.3  # recorded on arrival, not on answer


async def test_reset_keeps_issued_tokens(emulator: FcmEmulator, fcm_app: Any) -> None:
    await send(fcm_app, "device-10")
    emulator.outage(503)
    emulator.hold()
    emulator.reset()

    [response] = await send(fcm_app, "device-10")
    assert response.success
    assert len(emulator.received) == 1
    assert emulator.token_exchanges == 0


async def test_wait_for_times_out_with_what_it_saw(emulator: FcmEmulator) -> None:
    def never(_: FcmEmulator) -> bool:
        return False

    with pytest.raises(TimeoutError, match=r"never still false after 0.05 s; 0 send requests recorded"):
        await emulator.wait_for(never, timeout=0.05)


async def test_command_line_emulator(tmp_path: Path) -> None:
    service_account = tmp_path / "fcm-service-account.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "notifications.fcm_emulator",
        "--project-id",
        PROJECT,
        "--service-account",
        str(service_account),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
        url = line.split()[-1]
        assert line.startswith("FCM emulator listening on http://127.0.0.1:")
        assert stat.S_IMODE(service_account.stat().st_mode) == 0o600
        assert json.loads(service_account.read_text())["token_uri"] == f"{url}/token"

        app = open_app(str(service_account), f"{url}/v1/projects/{PROJECT}/messages:send")
        try:
            [response] = await send(app, "device-11")
        finally:
            await close_app(app)
        assert response.success, response.exception
        async with httpx.AsyncClient() as client:
            stats = (await client.get(f"{url}/emulator/stats")).json()
        assert stats == {"received": 1, "statuses": {"200": 1}, "token_exchanges": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
