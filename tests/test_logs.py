"""Logs carry request ids, routes and statuses, never tokens or full personal IDs."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import api.directory.queries
from api.observability import JsonFormatter, redact
from tests.factories import Citizen

DEMO_DOCTOR_ID = "011080000101"
BEARER_CREDENTIAL = re.compile(r"(?i)bearer\s+(?!\[redacted\])\S")
TWELVE_DIGITS = re.compile(r"(?<!\d)\d{12}(?!\d)")


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["logger"] == "telehealth.access"]

    def access_for(self, request_id: str) -> dict[str, Any]:
        lines = [e for e in self.access() if e["request_id"] == request_id]
        assert len(lines) == 1, (request_id, self.access())
        return lines[0]


def _not_the_test_client(record: logging.LogRecord) -> bool:
    """httpx in this test process logs the test client's own requests; those are not the app's lines."""
    return not (record.name.startswith("httpx") and "testserver" in record.getMessage())


@pytest.fixture
def logs(app) -> Iterator[Captured]:
    """Every record reaching the root logger, formatted exactly as the app's own handler formats it."""
    root = logging.getLogger()
    # The app's handler (installed by create_app) must be the redacting JSON formatter.
    assert any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    captured = Captured()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_not_the_test_client)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


def assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret leaked into logs: {secret[:12]}…"
    assert not BEARER_CREDENTIAL.search(text), BEARER_CREDENTIAL.search(text)
    assert not TWELVE_DIGITS.search(text), TWELVE_DIGITS.search(text)


async def test_a_whole_session_leaves_no_secret_in_logs(client, issuer, logs, monkeypatch):
    citizen = Citizen(phone_number="0912345678")
    rid = {
        name: f"test-{name}-{uuid.uuid4().hex[:8]}"
        for name in ("signin", "refresh", "me", "bad", "q", "boom")
    }

    # A successful sign-in.
    id_token = issuer.id_token(citizen)
    response = await client.post(
        "/v1/auth/vneid", json={"id_token": id_token}, headers={"X-Request-ID": rid["signin"]}
    )
    assert response.status_code == 200, response.text
    tokens = response.json()
    user_id = tokens["user"]["id"]

    # A refresh.
    response = await client.post(
        "/v1/auth/refresh",
        json={"refresh_token": tokens["refresh_token"]},
        headers={"X-Request-ID": rid["refresh"]},
    )
    assert response.status_code == 200, response.text
    refreshed = response.json()

    # The profile, with the full personal ID in the response (not in the log).
    response = await client.get(
        "/v1/me",
        headers={"Authorization": f"Bearer {refreshed['access_token']}", "X-Request-ID": rid["me"]},
    )
    assert response.status_code == 200
    assert response.json()["personal_id"] == citizen.personal_id

    # A failed sign-in: an expired ID token.
    stranger = Citizen()
    bad_token = issuer.id_token(stranger, exp=int(time.time()) - 3600, iat=int(time.time()) - 4000)
    response = await client.post(
        "/v1/auth/vneid", json={"id_token": bad_token}, headers={"X-Request-ID": rid["bad"]}
    )
    assert response.status_code == 401

    # A personal ID typed into a search box.
    response = await client.get(
        "/v1/facilities", params={"q": DEMO_DOCTOR_ID}, headers={"X-Request-ID": rid["q"]}
    )
    assert response.status_code == 200

    # An unhandled error whose message carries a personal ID and a credential (as a driver error might).
    access_token = refreshed["access_token"]

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"Key (personal_id)=({citizen.personal_id}) failed; Authorization: Bearer {access_token}; "
            f'body {{"refresh_token": "{refreshed["refresh_token"]}"}}'
        )

    monkeypatch.setattr(api.directory.queries, "list_facilities", broken)
    response = await client.get(
        "/v1/facilities",
        headers={"Authorization": f"Bearer {access_token}", "X-Request-ID": rid["boom"]},
    )
    assert response.status_code == 500
    monkeypatch.undo()

    secrets = [
        id_token,
        bad_token,
        tokens["access_token"],
        tokens["refresh_token"],
        refreshed["access_token"],
        refreshed["refresh_token"],
        citizen.personal_id,
        stranger.personal_id,
        DEMO_DOCTOR_ID,
        citizen.phone_number or "",
        # Pieces of JWTs: the payload alone identifies the user and session.
        id_token.split(".")[1],
        refreshed["access_token"].split(".")[1],
    ]
    assert_clean(logs.text, secrets)

    # ... while the lines an operator needs are there.
    expected = {
        "signin": ("POST", "/v1/auth/vneid", 200),
        "refresh": ("POST", "/v1/auth/refresh", 200),
        "me": ("GET", "/v1/me", 200),
        "bad": ("POST", "/v1/auth/vneid", 401),
        "q": ("GET", "/v1/facilities", 200),
        "boom": ("GET", "/v1/facilities", 500),
    }
    for name, (method, route, status) in expected.items():
        line = logs.access_for(rid[name])
        assert (line["method"], line["route"], line["status"]) == (method, route, status), line
        assert line["level"] == "INFO"
        assert isinstance(line["ms"], float | int) and line["ms"] >= 0
    assert logs.access_for(rid["me"])["user_id"] == user_id
    assert logs.access_for(rid["boom"])["user_id"] == user_id
    assert logs.access_for(rid["signin"])["user_id"] is None

    # The unhandled error is logged with its traceback, masked.
    errors = [e for e in logs.entries if e["logger"] == "telehealth.errors"]
    assert len(errors) == 1
    assert errors[0]["level"] == "ERROR"
    assert "RuntimeError" in errors[0]["exc"]
    assert f"{citizen.personal_id[:3]}*******{citizen.personal_id[-2:]}" in errors[0]["exc"]
    assert "Bearer [redacted]" in errors[0]["exc"]


async def test_access_line_names_the_route_template_not_the_path(client, logs):
    facility_id = (await client.get("/v1/facilities", params={"limit": 1})).json()["items"][0]["id"]
    request_id = f"tmpl-{uuid.uuid4().hex[:10]}"
    response = await client.get(
        f"/v1/facilities/{facility_id}/services", params={"limit": 5}, headers={"X-Request-ID": request_id}
    )
    assert response.status_code == 200, response.text
    line = logs.access_for(request_id)
    assert line["route"] == "/v1/facilities/{facility_id}/services"
    assert facility_id not in logs.text
    assert "limit=5" not in logs.text


async def test_unmatched_paths_are_logged_without_the_path(client, logs):
    request_id = f"unmatched-{uuid.uuid4().hex[:8]}"
    response = await client.get(
        f"/v1/patients/{DEMO_DOCTOR_ID}/records", headers={"X-Request-ID": request_id}
    )
    assert response.status_code == 404
    line = logs.access_for(request_id)
    assert line["route"] == "unmatched"
    assert line["status"] == 404
    assert "/v1/patients" not in logs.text
    assert_clean(logs.text, [DEMO_DOCTOR_ID])


async def test_generated_request_ids_survive_redaction(client, logs):
    """A generated id with a run of 12 digits must still be findable in the logs."""
    ids = [(await client.get("/health/live")).headers["x-request-id"] for _ in range(40)]
    # An id of the generated shape that happens to hold a run of 12 digits, every time.
    hexlike = "5f1c2a3b4d5e4f123456789012abcdef"
    response = await client.get("/health/live", headers={"X-Request-ID": hexlike})
    assert response.headers["x-request-id"] == hexlike
    ids.append(hexlike)
    logged = [e["request_id"] for e in logs.access()]
    assert logged == ids


async def test_a_request_id_carrying_a_personal_id_is_replaced(client, logs):
    """The access line is not redacted after the fact, so what a client sends must be safe first."""
    for sent in (DEMO_DOCTOR_ID, f"req-{DEMO_DOCTOR_ID}-abc"):
        response = await client.get("/health/live", headers={"X-Request-ID": sent})
        assert response.status_code == 200
        echoed = response.headers["x-request-id"]
        assert DEMO_DOCTOR_ID not in echoed
        assert logs.access_for(echoed)["route"] == "/health/live"
    assert_clean(logs.text, [DEMO_DOCTOR_ID])


async def test_an_unknown_method_is_logged_as_other(client, logs):
    response = await client.request("PROPFIND", "/health/live", headers={"X-Request-ID": "propfind-0001"})
    assert response.status_code == 405
    assert logs.access_for("propfind-0001")["method"] == "OTHER"


# --- redact() -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi_jkl", "Authorization: Bearer [redacted]"),
        ("authorization: bearer   a1b2c3", "authorization: Bearer [redacted]"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl end", "token [jwt redacted] end"),
        ("unsigned eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0. end", "unsigned [jwt redacted] end"),
        ("citizen 011080000101 signed in", "citizen 011*******01 signed in"),
        (
            "Key (personal_id)=(011080000101) already exists",
            "Key (personal_id)=(011*******01) already exists",
        ),
        ("/v1/people/011080000101?x=1", "/v1/people/011*******01?x=1"),
        ('"sub": "011080000101"', '"sub": "011*******01"'),
        ("refresh_token=abcDEF123&x=1", "refresh_token=[redacted]&x=1"),
        ('{"refresh_token": "abcDEF123", "a": 1}', '{"refresh_token": "[redacted]", "a": 1}'),
        ("{'id_token': 'abc'}", "{'id_token': '[redacted]'}"),
        ('{\\"access_token\\": \\"abc\\"}', '{\\"access_token\\": \\"[redacted]\\"}'),
        ("ticket=XYZ", "ticket=[redacted]"),
    ],
)
def test_redact_masks_secrets(raw, expected):
    assert redact(raw) == expected


@pytest.mark.parametrize(
    "text",
    [
        "GET /health/live 200 in 3.2 ms",
        "phone 0912345678",  # 10 digits: not a personal ID
        "order 0110800001019",  # 13 digits
        "request 5f1c2a3b4d5e4f123456789012abcdef",  # a hex request id containing 12 digits
        "user e4f7428a-e746-4274-b984-123456789012",  # a UUID whose last group is all digits
        '"token_type": "Bearer"',
    ],
)
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_redact_is_idempotent():
    raw = 'Bearer abc 011080000101 refresh_token=x eyJa.eyJb.c {"id_token": "y"}'
    once = redact(raw)
    assert redact(once) == once
    assert "011080000101" not in once


def test_formatter_masks_fields_messages_and_tracebacks():
    formatter = JsonFormatter()
    try:
        raise ValueError("duplicate key 011080000101")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "telehealth.test", logging.ERROR, __file__, 1, "body %s", ('{"refresh_token": "r3fr3sh"}',), exc_info
    )
    record.headers = {"authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}
    record.personal_id = "011080000101"
    line = formatter.format(record)
    entry = json.loads(line)
    assert entry["logger"] == "telehealth.test"
    assert entry["level"] == "ERROR"
    assert "r3fr3sh" not in line
    assert "011080000101" not in line
    assert entry["personal_id"] == "011*******01"
    assert "eyJ" not in line
    assert "ValueError: duplicate key 011*******01" in entry["exc"]
