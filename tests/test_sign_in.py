"""POST /v1/auth/vneid: signing in with a VNeID ID token, over HTTP against a real database.

Tests that count JWKS fetches use an app of their own (`serve`) with its own stand-in issuer,
so the JWKS cache starts empty and no other test's sign-ins or key rotations are counted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk
from redis.asyncio import Redis

from api.app import create_app
from api.identity import vneid
from api.settings import Settings
from tests.conftest import make_settings
from tests.factories import Citizen, TestIssuer, b64, child_of, client_of, personal_id, serve


def documentation_ip() -> str:
    """An address of the IPv6 documentation range that no other test run uses."""
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


@pytest.fixture
def own_issuer() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[TestIssuer]:
    """Someone else's issuer with its own keys and JWKS server: any fetch of it is recorded (and fails
    the test that caused it, and every later one)."""
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture
def cold(database_url: str, redis_url: str, own_issuer: TestIssuer) -> Settings:
    """Settings of a fresh app trusting `own_issuer`, whose JWKS nobody has fetched yet.

    The app is started inside each test (`serve`): its lifespan must begin and end in one task.
    """
    return make_settings(database_url, redis_url, own_issuer)


async def post_token(http: Any, token: str) -> Any:
    return await http.post("/v1/auth/vneid", json={"id_token": token})


async def users_with(db: Any, pid: str) -> int:
    return await db.fetchval("SELECT count(*) FROM users WHERE personal_id = $1", pid)


def masked(pid: str) -> str:
    return pid[:3] + "*" * 7 + pid[-2:]


def other_rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# Signing in.


async def test_sign_in_returns_a_token_pair_and_the_full_own_profile(client, issuer, db):
    citizen = Citizen(name="Lò Văn Pọm", born=dt.date(1985, 7, 2))
    response = await post_token(client, issuer.id_token(citizen))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int) and 0 < body["expires_in"] <= 900
    assert body["access_token"] and body["refresh_token"]
    assert body["access_token"] != body["refresh_token"]
    user = body["user"]
    assert user["personal_id"] == citizen.personal_id  # the owner sees it in full
    assert user["name"] == "Lò Văn Pọm"
    assert user["birthdate"] == "1985-07-02"
    assert user["sex"] == "male"
    assert user["roles"] == ["citizen"]
    assert user["staff"] == []

    row = await db.fetchrow(
        "SELECT id, full_name, birthdate, sex FROM users WHERE personal_id = $1", citizen.personal_id
    )
    assert row is not None
    assert str(row["id"]) == user["id"]
    assert (row["full_name"], row["birthdate"], row["sex"]) == ("Lò Văn Pọm", dt.date(1985, 7, 2), "male")

    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]


async def test_es256_token_from_the_ec_key_is_accepted(client, issuer, db):
    citizen = Citizen(gender="female", born=dt.date(2001, 1, 9))
    response = await post_token(client, issuer.id_token(citizen, alg="ES256", kid="ec-1"))
    assert response.status_code == 200, response.text
    assert response.json()["user"]["sex"] == "female"
    assert await users_with(db, citizen.personal_id) == 1


async def test_signing_in_again_updates_the_name_and_keeps_one_row(client, issuer, db):
    citizen = Citizen(name="Quàng Thị Lả", gender="female", phone_number="0912000111")
    first = await post_token(client, issuer.id_token(citizen))
    assert first.status_code == 200

    citizen.name = "Quàng Thị Lả Mới"
    citizen.phone_number = "0988000222"
    second = await post_token(client, issuer.id_token(citizen))

    assert second.status_code == 200
    assert second.json()["user"]["id"] == first.json()["user"]["id"]
    assert second.json()["user"]["name"] == "Quàng Thị Lả Mới"
    rows = await db.fetch(
        "SELECT id, full_name, phone FROM users WHERE personal_id = $1", citizen.personal_id
    )
    assert len(rows) == 1
    assert rows[0]["full_name"] == "Quàng Thị Lả Mới"
    assert rows[0]["phone"] == "0912000111"  # a phone already on file is not overwritten by VNeID
    sessions = await db.fetchval("SELECT count(*) FROM auth_sessions WHERE user_id = $1", rows[0]["id"])
    assert sessions == 2


async def test_dependents_become_guardianships_listed_with_masked_personal_ids(client, issuer, db):
    daughter = child_of(dt.date(2018, 6, 1), "female", "Lò Thị Na")
    son = child_of(dt.date(2021, 2, 3), "male", "Lò Văn Tú")
    citizen = Citizen(dependents=[daughter, son])
    response = await post_token(client, issuer.id_token(citizen))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"]["roles"] == ["citizen", "guardian"]
    rows = await db.fetch(
        """SELECT d.personal_id, d.full_name, d.sex, g.relationship, g.source
             FROM guardianships g JOIN users d ON d.id = g.dependent_id JOIN users p ON p.id = g.guardian_id
            WHERE p.personal_id = $1 ORDER BY d.birthdate""",
        citizen.personal_id,
    )
    assert [tuple(r) for r in rows] == [
        (daughter["personal_id"], "Lò Thị Na", "female", "child", "vneid"),
        (son["personal_id"], "Lò Văn Tú", "male", "child", "vneid"),
    ]

    listed = await client.get(
        "/v1/me/dependents", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert listed.status_code == 200
    items = listed.json()
    assert [(d["name"], d["personal_id"], d["sex"], d["source"]) for d in items] == [
        ("Lò Thị Na", masked(daughter["personal_id"]), "female", "vneid"),
        ("Lò Văn Tú", masked(son["personal_id"]), "male", "vneid"),
    ]
    assert daughter["personal_id"] not in listed.text
    assert son["personal_id"] not in listed.text


async def test_vneid_guardianship_follows_the_claim_but_a_staff_one_stays(client, issuer, db):
    kept, dropped, confirmed = child_of(), child_of(name="Lò Văn Sơn"), child_of(name="Lò Thị Hoa")
    citizen = Citizen()
    assert (await post_token(client, issuer.id_token(citizen))).status_code == 200
    guardian_id = await db.fetchval("SELECT id FROM users WHERE personal_id = $1", citizen.personal_id)
    # A guardianship a facility's front desk confirmed (source 'staff').
    confirmed_id = await db.fetchval(
        "INSERT INTO users (personal_id, full_name, birthdate, sex) VALUES ($1, $2, $3, 'female') RETURNING id",
        confirmed["personal_id"],
        confirmed["name"],
        dt.date.fromisoformat(confirmed["birthdate"]),
    )
    await db.execute(
        "INSERT INTO guardianships (guardian_id, dependent_id, relationship, source) VALUES ($1, $2, 'child', 'staff')",
        guardian_id,
        confirmed_id,
    )

    async def guardianships() -> dict[str, str]:
        rows = await db.fetch(
            """SELECT d.personal_id, g.source FROM guardianships g JOIN users d ON d.id = g.dependent_id
                WHERE g.guardian_id = $1""",
            guardian_id,
        )
        return {r["personal_id"]: r["source"] for r in rows}

    # VNeID lists two children and also the staff-confirmed one.
    citizen.dependents = [kept, dropped, confirmed]
    assert (await post_token(client, issuer.id_token(citizen))).status_code == 200
    assert await guardianships() == {
        kept["personal_id"]: "vneid",
        dropped["personal_id"]: "vneid",
        confirmed["personal_id"]: "staff",
    }

    # A later sign-in lists only one: the other VNeID-sourced link goes, the staff one stays.
    citizen.dependents = [kept]
    response = await post_token(client, issuer.id_token(citizen))
    assert response.status_code == 200
    assert await guardianships() == {kept["personal_id"]: "vneid", confirmed["personal_id"]: "staff"}
    listed = await client.get(
        "/v1/me/dependents", headers={"Authorization": f"Bearer {response.json()['access_token']}"}
    )
    assert {d["personal_id"] for d in listed.json()} == {
        masked(kept["personal_id"]),
        masked(confirmed["personal_id"]),
    }

    # No dependents in the claim: only the staff-confirmed guardianship is left, still a guardian.
    citizen.dependents = []
    response = await post_token(client, issuer.id_token(citizen))
    assert response.status_code == 200
    assert await guardianships() == {confirmed["personal_id"]: "staff"}
    assert "guardian" in response.json()["user"]["roles"]


async def test_guardian_role_goes_when_the_last_dependent_does(client, issuer):
    citizen = Citizen(dependents=[child_of()])
    first = await post_token(client, issuer.id_token(citizen))
    assert first.json()["user"]["roles"] == ["citizen", "guardian"]
    citizen.dependents = []
    second = await post_token(client, issuer.id_token(citizen))
    assert second.json()["user"]["roles"] == ["citizen"]


async def test_a_dependent_with_an_invalid_personal_id_is_skipped(client, issuer, db):
    good = child_of()
    bad = child_of(dt.date(2019, 1, 1), "male")
    bad["personal_id"] = "999" + bad["personal_id"][3:]  # unknown province
    citizen = Citizen(dependents=[good, bad])
    response = await post_token(client, issuer.id_token(citizen))

    assert response.status_code == 200, response.text
    listed = await client.get(
        "/v1/me/dependents", headers={"Authorization": f"Bearer {response.json()['access_token']}"}
    )
    assert [d["personal_id"] for d in listed.json()] == [masked(good["personal_id"])]
    assert await users_with(db, bad["personal_id"]) == 0


def _bad_province() -> Citizen:
    return Citizen(personal_id="999" + personal_id(born=1990)[3:])


def _sex_digit_of_the_other_sex() -> Citizen:
    return Citizen(gender="male", personal_id=personal_id(born=1990, sex="female"))


def _year_not_the_birth_year() -> Citizen:
    return Citizen(born=dt.date(1990, 3, 14), personal_id=personal_id(born=1991))


def _century_not_the_birth_century() -> Citizen:
    return Citizen(born=dt.date(1990, 3, 14), personal_id=personal_id(born=2090))


def _unicode_digit() -> Citizen:
    return Citizen(personal_id=personal_id(born=1990)[:-1] + "٣")


@pytest.mark.parametrize(
    "make_citizen",
    [
        _bad_province,
        _sex_digit_of_the_other_sex,
        _year_not_the_birth_year,
        _century_not_the_birth_century,
        _unicode_digit,
    ],
)
async def test_invalid_personal_id_in_sub_is_refused_and_creates_no_user(client, issuer, db, make_citizen):
    citizen = make_citizen()
    response = await post_token(client, issuer.id_token(citizen))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_personal_id"
    assert await users_with(db, citizen.personal_id) == 0


async def test_clock_skew_within_the_leeway_is_accepted(client, issuer):
    now = int(time.time())
    token = issuer.id_token(Citizen(), iat=now + 10, exp=now - 10)  # both within 30 s of our clock
    response = await post_token(client, token)
    assert response.status_code == 200, response.text


# The JWT attack set: each token is refused with 401 `invalid_id_token`, creates no user and
# makes no fetch the verification did not need.

Forge = Callable[[TestIssuer, TestIssuer, Citizen], str]


def _key_location(name: str) -> Forge:
    """Signed with the attacker's key, pointing at the attacker's JWKS in a `jku`/`x5u` header."""

    def forge(issuer: TestIssuer, attacker: TestIssuer, citizen: Citizen) -> str:
        return attacker.id_token(citizen, headers={name: attacker.jwks_url})

    return forge


def _embedded_jwk(issuer: TestIssuer, attacker: TestIssuer, citizen: Citizen) -> str:
    public = jwk.RSAKey(attacker.rsa_pem, "RS256").public_key().to_dict()
    return attacker.id_token(citizen, headers={"jwk": public})


def _tampered_payload(issuer: TestIssuer, attacker: TestIssuer, citizen: Citizen) -> str:
    """A genuine token whose payload was swapped for another person's: the signature no longer fits."""
    header, _, signature = issuer.id_token(Citizen()).split(".")
    payload = b64(json.dumps(issuer.base_claims(citizen)).encode())
    return f"{header}.{payload}.{signature}"


def _claims(**overrides: Any) -> Forge:
    def forge(issuer: TestIssuer, attacker: TestIssuer, citizen: Citizen) -> str:
        now = int(time.time())
        values = {k: v(now) if callable(v) else v for k, v in overrides.items()}
        return issuer.id_token(citizen, **values)

    return forge


# Refused from the header alone: no key is looked up, so nothing is fetched from anywhere.
HEADER_ATTACKS: dict[str, Forge] = {
    "alg_none": lambda i, a, c: i.forged(c, {"alg": "none", "kid": "rsa-1"}),
    "alg_none_typ_jwt": lambda i, a, c: i.forged(c, {"alg": "none", "kid": "rsa-1", "typ": "JWT"}),
    "alg_None": lambda i, a, c: i.forged(c, {"alg": "None", "kid": "rsa-1"}),
    "hs256_keyed_with_rsa_public_pem": lambda i, a, c: i.forged(
        c, {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, hmac_key=i.rsa_public_pem
    ),
    "kid_path": lambda i, a, c: i.id_token(c, kid="../../etc/passwd"),
    "kid_sql": lambda i, a, c: i.id_token(c, kid="' OR 1=1 --"),
    "kid_url": lambda i, a, c: i.id_token(c, kid="http://127.0.0.1:1/jwks.json"),
    "no_kid": lambda i, a, c: i.forged(c, {"alg": "RS256"}),
    "jku": _key_location("jku"),
    "x5u": _key_location("x5u"),
    "jku_with_known_kid_and_our_key": lambda i, a, c: i.id_token(c, headers={"jku": a.jwks_url}),
    "embedded_jwk": _embedded_jwk,
    "not_a_jwt": lambda i, a, c: "not-a-jwt-at-all",
}

# Refused after looking up the issuer's key: one JWKS fetch (from the configured URL) at most.
CLAIM_ATTACKS: dict[str, Forge] = {
    "expired": _claims(exp=lambda now: now - 45, iat=lambda now: now - 345),
    "expired_long_ago": _claims(exp=lambda now: now - 86_400, iat=lambda now: now - 86_700),
    "iat_far_in_the_future": _claims(iat=lambda now: now + 3_600, exp=lambda now: now + 3_900),
    "wrong_aud": _claims(aud="another-relying-party"),
    "wrong_aud_list": _claims(aud=["another-relying-party"]),
    "wrong_iss": _claims(iss="https://vneid.evil.example"),
    "missing_iat": _claims(iat=None),
    "missing_exp": _claims(exp=None),
    "missing_aud": _claims(aud=None),
    "missing_iss": _claims(iss=None),
    "missing_sub": _claims(sub=None),
    "unknown_rsa_key_claiming_kid_rsa_1": lambda i, a, c: i.id_token(c, key=a.rsa_pem),
    "es256_claiming_the_rsa_kid": lambda i, a, c: i.id_token(c, alg="ES256", kid="rsa-1"),
    "rs256_claiming_the_ec_kid": lambda i, a, c: i.id_token(c, alg="RS256", kid="ec-1"),
    "tampered_payload": _tampered_payload,
}


async def _assert_refused(response: Any, db: Any, citizen: Citizen) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_id_token"
    assert response.headers.get("www-authenticate") == "Bearer"
    assert await users_with(db, citizen.personal_id) == 0


@pytest.mark.parametrize("forge", HEADER_ATTACKS.values(), ids=HEADER_ATTACKS.keys())
async def test_header_attack_is_refused_without_any_fetch(cold, own_issuer, attacker, db, forge):
    citizen = Citizen()
    async with serve(cold) as http:
        response = await post_token(http, forge(own_issuer, attacker, citizen))
    await _assert_refused(response, db, citizen)
    assert own_issuer.requests == []  # not even our own JWKS: the cache was empty and stays so
    assert attacker.requests == []


@pytest.mark.parametrize("forge", CLAIM_ATTACKS.values(), ids=CLAIM_ATTACKS.keys())
async def test_claim_or_signature_attack_is_refused(cold, own_issuer, attacker, db, forge):
    citizen = Citizen()
    async with serve(cold) as http:
        response = await post_token(http, forge(own_issuer, attacker, citizen))
    await _assert_refused(response, db, citizen)
    assert own_issuer.requests in ([], ["/jwks.json"])
    assert attacker.requests == []


async def test_the_attack_tokens_fail_for_their_flaw_alone(cold, own_issuer, db):
    """The control: the same forging helpers make an accepted token when nothing is wrong."""
    citizen = Citizen()
    async with serve(cold) as http:
        response = await post_token(http, _claims()(own_issuer, own_issuer, citizen))
    assert response.status_code == 200, response.text
    assert await users_with(db, citizen.personal_id) == 1


# The JWKS cache: refreshed on an unknown kid, at most once per cool-down.


async def test_unknown_kid_fetches_the_jwks_at_most_once_per_cooldown(cold, own_issuer, db):
    citizen = Citizen()
    async with serve(cold) as http:
        first = await post_token(http, own_issuer.id_token(citizen, kid="rsa-9"))
        await _assert_refused(first, db, citizen)
        assert own_issuer.requests == ["/jwks.json"]

        again = await post_token(http, own_issuer.id_token(citizen, kid="rsa-10"))
        await _assert_refused(again, db, citizen)
        flood = await asyncio.gather(
            *(post_token(http, own_issuer.id_token(citizen, kid=f"made-up-{n}")) for n in range(20))
        )
        assert {r.status_code for r in flood} == {401}
        assert own_issuer.requests == ["/jwks.json"]  # still the single fetch

        # The keys from that fetch serve the genuine token without another one.
        good = await post_token(http, own_issuer.id_token(citizen))
        assert good.status_code == 200, good.text
        assert own_issuer.requests == ["/jwks.json"]


async def test_unknown_kid_refetches_once_after_the_cooldown(
    monkeypatch, database_url, redis_url, own_issuer, db
):
    monkeypatch.setattr(vneid, "REFRESH_COOLDOWN_SECONDS", 1.0)
    async with serve(make_settings(database_url, redis_url, own_issuer)) as http:
        assert (await post_token(http, own_issuer.id_token(Citizen()))).status_code == 200
        assert own_issuer.requests == ["/jwks.json"]
        await asyncio.sleep(1.1)

        citizen = Citizen()
        flood = await asyncio.gather(
            *(post_token(http, own_issuer.id_token(citizen, kid=f"made-up-{n}")) for n in range(10))
        )
        assert {r.status_code for r in flood} == {401}
        assert own_issuer.requests == ["/jwks.json", "/jwks.json"]
        assert await users_with(db, citizen.personal_id) == 0


async def test_key_rotation_is_picked_up_with_one_refetch(
    monkeypatch, database_url, redis_url, own_issuer, db
):
    monkeypatch.setattr(vneid, "REFRESH_COOLDOWN_SECONDS", 1.0)
    async with serve(make_settings(database_url, redis_url, own_issuer)) as http:
        assert (await post_token(http, own_issuer.id_token(Citizen()))).status_code == 200
        assert own_issuer.requests == ["/jwks.json"]

        new_key = own_issuer.add_key("rsa-2")
        rotated = Citizen()
        # Within the cool-down the cache is not refreshed, not even for a genuine new kid.
        early = await post_token(http, own_issuer.id_token(rotated, kid="rsa-2", key=new_key))
        assert early.status_code == 401
        assert own_issuer.requests == ["/jwks.json"]

        await asyncio.sleep(1.1)
        response = await post_token(http, own_issuer.id_token(rotated, kid="rsa-2", key=new_key))
        assert response.status_code == 200, response.text
        assert await users_with(db, rotated.personal_id) == 1
        assert own_issuer.requests == ["/jwks.json", "/jwks.json"]

        # Both keys are now cached: neither needs a fetch.
        assert (
            await post_token(http, own_issuer.id_token(Citizen(), kid="rsa-2", key=new_key))
        ).status_code == 200
        assert (await post_token(http, own_issuer.id_token(Citizen()))).status_code == 200
        assert own_issuer.requests == ["/jwks.json", "/jwks.json"]
        # A token for the new kid signed with the old key is still refused.
        wrong = await post_token(http, own_issuer.id_token(Citizen(), kid="rsa-2"))
        assert wrong.status_code == 401


# Rate limit on sign-in, per client IP, counted in Redis.


async def test_sign_in_rate_limit_per_ip(database_url, redis_url, issuer, db):
    # Addresses no other run uses, so concurrent test runs on this Redis cannot interfere.
    ip, other_ip = documentation_ip(), documentation_ip()
    redis = Redis.from_url(redis_url)
    try:
        stale = [key async for key in redis.scan_iter(match=f"ratelimit:sign-in:{ip}:*")]
        if stale:
            await redis.delete(*stale)
    finally:
        await redis.aclose()
    if time.time() % 60 > 55:  # the four attempts must fall in one fixed one-minute window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)

    settings = make_settings(database_url, redis_url, issuer, sign_in_rate_per_minute=3)
    app = create_app(settings)
    async with app.lifespan(), client_of(app, ip) as http, client_of(app, other_ip) as other:
        for _ in range(3):
            assert (await post_token(http, issuer.id_token(Citizen()))).status_code == 200
        fourth = Citizen()
        response = await post_token(http, issuer.id_token(fourth))

        assert response.status_code == 429, response.text
        assert response.json()["code"] == "rate_limited"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert await users_with(db, fourth.personal_id) == 0

        # The limit is per IP: another address signs in at once.
        assert (await post_token(other, issuer.id_token(Citizen()))).status_code == 200
