"""Our access and refresh tokens over HTTP: bearer checks, rotation, reuse, logout, role changes, PATCH /v1/me.

Bad access tokens are made by re-signing the claims of a working one with one thing changed,
so each is refused for that one flaw (the control test shows the unchanged copy works).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from jose import jwt

from api.identity.tokens import InvalidToken, VerifiedTokens, issue_access_token
from api.settings import Settings
from tests.conftest import make_settings
from tests.factories import Citizen, Session, TestIssuer, b64, grant_staff, serve, sign_in


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reissue(
    token: str,
    secret: str,
    *,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **changes: Any,
) -> str:
    """The claims of `token` with `changes` applied (None removes a claim), signed again."""
    claims = jwt.get_unverified_claims(token)
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def unsigned(token: str, header: dict[str, Any]) -> str:
    """The claims of `token` under another header, with no signature (`alg: none`)."""
    claims = jwt.get_unverified_claims(token)
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


async def refresh(http: Any, token: str) -> Any:
    return await http.post("/v1/auth/refresh", json={"refresh_token": token})


def assert_problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    if status == 401:
        assert response.headers.get("www-authenticate") == "Bearer"


@pytest.fixture
async def session(client, issuer) -> Session:
    return await sign_in(client, issuer, Citizen())


# Bearer authentication of GET /v1/me.


async def test_no_token_is_unauthorized(client):
    response = await client.get("/v1/me")
    assert_problem(response, 401, "unauthorized")


async def test_a_reissued_copy_of_a_working_token_works(client, settings, session):
    """The control for the cases below: re-signing unchanged claims gives a token that is accepted."""
    response = await client.get("/v1/me", headers=bearer(reissue(session.access_token, settings.jwt_secret)))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == session.user["id"]


@dataclass
class Ctx:
    settings: Settings
    issuer: TestIssuer
    session: Session
    citizen: Citizen
    other_user_id: str


BadToken = Callable[[Ctx], str]


def _changed(**changes: Any) -> BadToken:
    def make(ctx: Ctx) -> str:
        now = int(time.time())
        values = {k: v(now) if callable(v) else v for k, v in changes.items()}
        return reissue(ctx.session.access_token, ctx.settings.jwt_secret, **values)

    return make


BAD_TOKENS: dict[str, BadToken] = {
    "garbage": lambda ctx: "garbage",
    "three_garbage_parts": lambda ctx: "abc.def.ghi",
    "truncated_signature": lambda ctx: ctx.session.access_token[:-6],
    "expired": _changed(iat=lambda now: now - 905, exp=lambda now: now - 5),
    "signed_with_another_secret": lambda ctx: reissue(ctx.session.access_token, "x" * 48),
    "alg_none": lambda ctx: unsigned(ctx.session.access_token, {"alg": "none", "typ": "JWT"}),
    "alg_None": lambda ctx: unsigned(ctx.session.access_token, {"alg": "None"}),
    "hs512_with_our_secret": lambda ctx: reissue(
        ctx.session.access_token, ctx.settings.jwt_secret, algorithm="HS512"
    ),
    "refresh_token_as_bearer": lambda ctx: ctx.session.refresh_token,
    "vneid_id_token_as_bearer": lambda ctx: ctx.issuer.id_token(ctx.citizen),
    "typ_refresh": _changed(typ="refresh"),
    "typ_id": _changed(typ="id"),
    "typ_missing": _changed(typ=None),
    "wrong_aud": _changed(aud="another-app"),
    "wrong_iss": _changed(iss="https://evil.example"),
    "missing_aud": _changed(aud=None),
    "missing_iss": _changed(iss=None),
    "missing_exp": _changed(exp=None),
    "missing_iat": _changed(iat=None),
    "missing_sub": _changed(sub=None),
    "missing_jti": _changed(jti=None),
    "sub_not_a_uuid": _changed(sub="011090123456"),
    "sid_not_a_uuid": _changed(sid="not-a-session"),
    "unknown_session": _changed(sid=lambda now: str(uuid.uuid4())),
    "another_users_sub_on_this_session": lambda ctx: reissue(
        ctx.session.access_token, ctx.settings.jwt_secret, sub=ctx.other_user_id
    ),
}


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_bad_access_token_is_refused(client, issuer, settings, session, make):
    other = await sign_in(client, issuer, Citizen())
    ctx = Ctx(settings, issuer, session, Citizen(), other.user["id"])
    response = await client.get("/v1/me", headers=bearer(make(ctx)))
    assert_problem(response, 401, "invalid_token")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc.def.ghi"],
)
async def test_malformed_authorization_header_is_refused(client, header):
    response = await client.get("/v1/me", headers={"Authorization": header})
    assert_problem(response, 401, "invalid_token")


async def test_a_bad_token_is_refused_even_on_a_public_route(client):
    """A presented token is checked everywhere; it is not silently ignored."""
    response = await client.get("/v1/facilities", headers=bearer("garbage"))
    assert_problem(response, 401, "invalid_token")


# Refresh-token rotation and reuse detection.


async def test_refresh_rotates_the_pair(client, session, db):
    response = await refresh(client, session.refresh_token)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["refresh_token"] != session.refresh_token
    assert body["access_token"] != session.access_token
    assert body["user"]["id"] == session.user["id"]
    assert body["user"]["personal_id"] == session.user["personal_id"]
    assert (await client.get("/v1/me", headers=bearer(body["access_token"]))).status_code == 200

    # Rotation again and again stays on one session.
    token = body["refresh_token"]
    for _ in range(3):
        response = await refresh(client, token)
        assert response.status_code == 200, response.text
        token = response.json()["refresh_token"]
    sessions = await db.fetchval(
        "SELECT count(*) FROM auth_sessions WHERE user_id = $1", uuid.UUID(session.user["id"])
    )
    assert sessions == 1


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(client, session, db):
    rotated = (await refresh(client, session.refresh_token)).json()

    reused = await refresh(client, session.refresh_token)
    assert_problem(reused, 401, "refresh_token_reused")

    # The thief's copy is spent, and the pair the legitimate client just got is dead too.
    after = await refresh(client, rotated["refresh_token"])
    assert after.status_code == 401
    assert after.json()["code"] in {"invalid_refresh_token", "refresh_token_reused"}
    assert_problem(await client.get("/v1/me", headers=bearer(rotated["access_token"])), 401, "invalid_token")
    assert_problem(await client.get("/v1/me", headers=session.headers), 401, "invalid_token")

    row = await db.fetchrow(
        "SELECT revoked_at, revoke_reason FROM auth_sessions WHERE user_id = $1",
        uuid.UUID(session.user["id"]),
    )
    assert row["revoked_at"] is not None
    assert row["revoke_reason"] == "refresh_token_reused"


async def test_unknown_refresh_token_is_refused(client):
    response = await refresh(client, "this-token-was-never-issued-by-us")
    assert_problem(response, 401, "invalid_refresh_token")


async def test_refresh_tokens_are_stored_only_as_hashes(client, session, db):
    session_id = await db.fetchval(
        "SELECT id FROM auth_sessions WHERE user_id = $1", uuid.UUID(session.user["id"])
    )
    stored = await db.fetch("SELECT token_hash FROM refresh_tokens WHERE session_id = $1", session_id)
    assert len(stored) == 1
    assert bytes(stored[0]["token_hash"]) == hashlib.sha256(session.refresh_token.encode()).digest()
    assert session.refresh_token.encode() not in bytes(stored[0]["token_hash"])


async def test_concurrent_refreshes_with_one_token_have_exactly_one_winner(database_url, redis_url, issuer):
    """Twenty clients present one refresh token at once, over many rounds (the race is narrow)."""
    rounds: list[list[tuple[int, str | None]]] = []
    async with serve(make_settings(database_url, redis_url, issuer, db_pool_max=25)) as http:
        for _ in range(25):
            session = await sign_in(http, issuer, Citizen())

            async def attempt(token: str = session.refresh_token) -> Any:
                await asyncio.sleep(random.random() * 0.01)  # arrivals spread around the winner's commit
                return await refresh(http, token)

            responses = await asyncio.gather(*(attempt() for _ in range(20)))
            rounds.append(
                sorted((r.status_code, r.json()["code"] if r.status_code != 200 else None) for r in responses)
            )

    for outcome in rounds:
        assert outcome == [(200, None)] + [(401, "refresh_token_reused")] * 19, outcome


async def test_a_refresh_racing_a_logout_of_its_session_never_fails_with_a_5xx(
    database_url, redis_url, issuer
):
    """Whichever commits first, the session ends up logged out and the refresh gets 200 or 401."""
    async with serve(make_settings(database_url, redis_url, issuer)) as http:
        for _ in range(25):
            session = await sign_in(http, issuer, Citizen())

            async def refresh_soon(token: str = session.refresh_token) -> Any:
                await asyncio.sleep(random.random() * 0.005)
                return await refresh(http, token)

            refreshed, logged_out = await asyncio.gather(
                refresh_soon(), http.post("/v1/auth/logout", json={}, headers=session.headers)
            )
            assert logged_out.status_code == 204, logged_out.text
            assert refreshed.status_code in (200, 401), refreshed.text
            if refreshed.status_code == 200:  # it came first: the new pair belongs to the ended session
                new_headers = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
                assert_problem(await http.get("/v1/me", headers=new_headers), 401, "invalid_token")
            assert_problem(await http.get("/v1/me", headers=session.headers), 401, "invalid_token")


# Logout.


async def test_logout_ends_this_session_only(client, issuer, db):
    citizen = Citizen()
    phone, laptop = await sign_in(client, issuer, citizen), await sign_in(client, issuer, citizen)

    response = await client.post("/v1/auth/logout", json={}, headers=phone.headers)
    assert response.status_code == 204

    assert_problem(await client.get("/v1/me", headers=phone.headers), 401, "invalid_token")
    assert_problem(await refresh(client, phone.refresh_token), 401, "invalid_refresh_token")
    assert (await client.get("/v1/me", headers=laptop.headers)).status_code == 200
    assert (await refresh(client, laptop.refresh_token)).status_code == 200
    reasons = await db.fetch(
        "SELECT revoke_reason FROM auth_sessions WHERE user_id = $1 ORDER BY created_at",
        uuid.UUID(phone.user["id"]),
    )
    assert [r["revoke_reason"] for r in reasons] == ["logout", None]


async def test_logout_needs_a_signed_in_caller(client):
    assert_problem(await client.post("/v1/auth/logout", json={}), 401, "unauthorized")


async def test_logout_everywhere_ends_every_session_of_the_user(client, issuer, db):
    citizen = Citizen()
    sessions = [await sign_in(client, issuer, citizen) for _ in range(3)]
    bystander = await sign_in(client, issuer, Citizen())

    response = await client.post("/v1/auth/logout", json={"everywhere": True}, headers=sessions[0].headers)
    assert response.status_code == 204

    for s in sessions:
        assert_problem(await client.get("/v1/me", headers=s.headers), 401, "invalid_token")
        assert_problem(await refresh(client, s.refresh_token), 401, "invalid_refresh_token")
    live = await db.fetchval(
        "SELECT count(*) FROM auth_sessions WHERE user_id = $1 AND revoked_at IS NULL",
        uuid.UUID(sessions[0].user["id"]),
    )
    assert live == 0
    # Someone else is not affected, and the same person can sign in again.
    assert (await client.get("/v1/me", headers=bystander.headers)).status_code == 200
    again = await sign_in(client, issuer, citizen)
    assert (await client.get("/v1/me", headers=again.headers)).status_code == 200


async def test_logout_rejects_unknown_fields(client, session):
    response = await client.post(
        "/v1/auth/logout", json={"everywhere": True, "all": 1}, headers=session.headers
    )
    assert_problem(response, 422, "validation_failed")
    assert (await client.get("/v1/me", headers=session.headers)).status_code == 200


# Staff roles are read on every request.


async def test_staff_role_changes_take_effect_on_the_next_request(client, issuer, db):
    citizen = Citizen(name="Bác sĩ Điêu Chính")
    facility_id = await grant_staff(db, citizen, "BVDK-DB", "doctor")
    session = await sign_in(client, issuer, citizen)
    assert session.user["roles"] == ["citizen", "doctor"]
    assert session.user["staff"] == [{"facility_id": str(facility_id), "role": "doctor"}]

    await db.execute("DELETE FROM staff WHERE personal_id = $1", citizen.personal_id)
    me = await client.get("/v1/me", headers=session.headers)
    assert me.status_code == 200
    assert me.json()["roles"] == ["citizen"]
    assert me.json()["staff"] == []

    # And a role granted while signed in shows up just as fast, with the same token.
    await grant_staff(db, citizen, "BVDK-DB", "facility_staff")
    me = await client.get("/v1/me", headers=session.headers)
    assert me.json()["roles"] == ["citizen", "facility_staff"]


# PATCH /v1/me.


async def profile(db: Any, session: Session) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT personal_id, full_name, phone, health_insurance_number, locale FROM users WHERE id = $1",
        uuid.UUID(session.user["id"]),
    )
    return dict(row)


async def test_phone_is_stored_in_national_form(client, session, db):
    response = await client.patch("/v1/me", json={"phone": "+84 912 345 678"}, headers=session.headers)
    assert response.status_code == 200, response.text
    assert response.json()["phone"] == "0912345678"
    assert (await profile(db, session))["phone"] == "0912345678"
    assert (await client.get("/v1/me", headers=session.headers)).json()["phone"] == "0912345678"


@pytest.mark.parametrize("phone", ["12345", "0212345678", "091٢345678", "+1 415 555 0100", ""])
async def test_invalid_phone_is_refused(client, session, db, phone):
    before = await profile(db, session)
    response = await client.patch("/v1/me", json={"phone": phone}, headers=session.headers)
    assert_problem(response, 422, "invalid_phone")
    assert await profile(db, session) == before


async def test_null_clears_the_phone(client, session, db):
    await client.patch("/v1/me", json={"phone": "0987654321"}, headers=session.headers)
    assert (await profile(db, session))["phone"] == "0987654321"

    response = await client.patch("/v1/me", json={"phone": None}, headers=session.headers)
    assert response.status_code == 200
    assert response.json()["phone"] is None
    assert (await profile(db, session))["phone"] is None


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("0123456789", "0123456789"),  # social-insurance number
        ("DN4011234567890", "DN4011234567890"),  # legacy card code
        ("te1 01-1234567890", "TE1011234567890"),  # typed loosely
        ("own personal id", None),  # the ID card instead of the insurance card
    ],
)
async def test_insurance_number_in_each_accepted_form(client, session, db, typed, stored):
    if typed == "own personal id":
        typed = stored = session.user["personal_id"]
    response = await client.patch("/v1/me", json={"health_insurance_number": typed}, headers=session.headers)
    assert response.status_code == 200, response.text
    assert response.json()["health_insurance_number"] == stored
    assert (await profile(db, session))["health_insurance_number"] == stored


@pytest.mark.parametrize(
    "number", ["DN6011234567890", "012345678", "999099012345", "٠١٢٣٤٥٦٧٨٩", "DN40112345678"]
)
async def test_invalid_insurance_number_is_refused(client, session, db, number):
    before = await profile(db, session)
    response = await client.patch("/v1/me", json={"health_insurance_number": number}, headers=session.headers)
    assert_problem(response, 422, "invalid_insurance_number")
    assert await profile(db, session) == before


async def test_locale_can_be_set_to_english(client, session, db):
    response = await client.patch("/v1/me", json={"locale": "en"}, headers=session.headers)
    assert response.status_code == 200
    assert response.json()["locale"] == "en"
    assert (await profile(db, session))["locale"] == "en"


@pytest.mark.parametrize(
    "body",
    [
        {"role": "admin"},
        {"roles": ["admin"]},
        {"personal_id": "001099012345"},
        {"name": "Someone Else"},
        {"phone": "0912345678", "role": "admin"},  # a valid change does not sneak through beside it
        {"locale": "fr"},
        {"phone": 912345678},
    ],
)
async def test_unknown_or_invalid_fields_are_refused_and_nothing_changes(client, session, db, body):
    before = await profile(db, session)
    response = await client.patch("/v1/me", json=body, headers=session.headers)
    assert_problem(response, 422, "validation_failed")
    assert await profile(db, session) == before
    me = (await client.get("/v1/me", headers=session.headers)).json()
    assert me["roles"] == ["citizen"]
    assert me["personal_id"] == session.user["personal_id"]


async def test_one_invalid_field_refuses_the_whole_update(client, session, db):
    before = await profile(db, session)
    response = await client.patch(
        "/v1/me", json={"phone": "0912345678", "health_insurance_number": "nope"}, headers=session.headers
    )
    assert_problem(response, 422, "invalid_insurance_number")
    assert await profile(db, session) == before


async def test_profile_update_needs_a_signed_in_caller(client):
    assert_problem(await client.patch("/v1/me", json={"locale": "en"}), 401, "unauthorized")


def test_a_verified_token_is_remembered_until_it_expires(settings):
    """Verified once per process, but expiry is still checked on every use."""
    verified = VerifiedTokens()
    token = issue_access_token(settings, user_id=uuid.uuid4(), session_id=uuid.uuid4())
    expires = int(time.time()) + 1
    short = reissue(token, settings.jwt_secret, exp=expires)
    assert verified.verify(settings, short).exp == expires
    assert verified.verify(settings, short) is verified.verify(settings, short)
    time.sleep(expires + 1.05 - time.time())  # python-jose counts whole seconds
    with pytest.raises(InvalidToken):
        verified.verify(settings, short)
    with pytest.raises(InvalidToken):
        verified.verify(settings, short)  # forgotten, then refused by python-jose too


def test_a_forged_token_is_not_remembered(settings):
    verified = VerifiedTokens()
    token = issue_access_token(settings, user_id=uuid.uuid4(), session_id=uuid.uuid4())
    forged = reissue(token, "x" * 48)
    for _ in range(2):
        with pytest.raises(InvalidToken):
            verified.verify(settings, forged)
    assert verified.verify(settings, token).sub


def test_the_remembered_tokens_are_bounded(settings):
    verified = VerifiedTokens(capacity=3)
    tokens = [issue_access_token(settings, user_id=uuid.uuid4(), session_id=uuid.uuid4()) for _ in range(5)]
    for token in tokens:
        verified.verify(settings, token)
    assert list(verified._claims) == tokens[2:]
