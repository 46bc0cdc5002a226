"""Test factories: personal IDs, citizens, a stand-in VNeID issuer with a served JWKS, signed-in sessions."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from litestar import Litestar

import notifications
from api.app import create_app
from api.identity.personal_id import sex_digit
from api.settings import Settings

_serial = itertools.count(random.randrange(100_000, 800_000))


def personal_id(*, born: int = 1990, sex: str = "male", province: str = "011") -> str:
    """A valid personal ID, unique within the test run."""
    return f"{province}{sex_digit(born, sex)}{born % 100:02d}{next(_serial):06d}"


@dataclass
class Citizen:
    name: str = "Nguyễn Văn Bình"
    born: dt.date = dt.date(1990, 3, 14)
    gender: str = "male"
    personal_id: str = ""
    phone_number: str | None = None
    dependents: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.personal_id:
            self.personal_id = personal_id(born=self.born.year, sex=self.gender)

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "sub": self.personal_id,
            "name": self.name,
            "birthdate": self.born.isoformat(),
            "gender": self.gender,
            "dependents": self.dependents,
        }
        if self.phone_number:
            claims["phone_number"] = self.phone_number
        return claims


def child_of(
    born: dt.date = dt.date(2018, 6, 1), sex: str = "female", name: str = "Lò Thị Na"
) -> dict[str, str]:
    return {
        "personal_id": personal_id(born=born.year, sex=sex),
        "name": name,
        "birthdate": born.isoformat(),
        "relationship": "child",
    }


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class _JwksHandler(BaseHTTPRequestHandler):
    server: _JwksHttpServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = json.dumps(self.server.jwks()).encode() if self.path == "/jwks.json" else b"{}"
        self.send_response(200 if self.path == "/jwks.json" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _JwksHttpServer(ThreadingHTTPServer):
    def __init__(self, jwks: Any) -> None:
        super().__init__(("127.0.0.1", 0), _JwksHandler)
        self.jwks = jwks
        self.requests: list[str] = []


class TestIssuer:
    """Plays VNeID: an RSA and an EC signing key, their JWKS served over real HTTP on loopback."""

    __test__ = False
    issuer = "https://vneid.test.gov.vn"
    audience = "telehealth-test"

    def __init__(self) -> None:
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_pem = self._pem(self.rsa_key)
        self.ec_pem = self._pem(self.ec_key)
        self.rotated: list[dict[str, Any]] = []
        self._server = _JwksHttpServer(self.jwks)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _pem(key: Any) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    @property
    def requests(self) -> list[str]:
        return self._server.requests

    @property
    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict[str, Any]:
        keys = [
            {**jwk.RSAKey(self.rsa_pem, "RS256").public_key().to_dict(), "kid": "rsa-1", "alg": "RS256"},
            {**jwk.ECKey(self.ec_pem, "ES256").public_key().to_dict(), "kid": "ec-1", "alg": "ES256"},
            *self.rotated,
        ]
        return {"keys": keys}

    def add_key(self, kid: str) -> bytes:
        """Rotate in a new RSA key under `kid` (as the issuer would); return its private PEM."""
        pem = self._pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.rotated.append({**jwk.RSAKey(pem, "RS256").public_key().to_dict(), "kid": kid, "alg": "RS256"})
        return pem

    def base_claims(self, citizen: Citizen, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + 300, **citizen.claims()}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def id_token(
        self,
        citizen: Citizen,
        *,
        alg: str = "RS256",
        kid: str = "rsa-1",
        key: bytes | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        pem = key or (self.rsa_pem if alg == "RS256" else self.ec_pem)
        return jwt.encode(
            self.base_claims(citizen, **claims),
            pem.decode(),
            algorithm=alg,
            headers={"kid": kid, **(headers or {})},
        )

    def forged(self, citizen: Citizen, header: dict[str, Any], *, hmac_key: bytes | None = None) -> str:
        """A token python-jose would refuse to make: `alg: none`, or HS256 keyed with a public key."""
        signing_input = (
            f"{b64(json.dumps(header).encode())}.{b64(json.dumps(self.base_claims(citizen)).encode())}"
        )
        signature = (
            b64(hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()) if hmac_key else ""
        )
        return f"{signing_input}.{signature}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Session:
    access_token: str
    refresh_token: str
    user: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def sign_in(client: Any, issuer: TestIssuer, citizen: Citizen | None = None) -> Session:
    citizen = citizen or Citizen()
    response = await client.post("/v1/auth/vneid", json={"id_token": issuer.id_token(citizen)})
    assert response.status_code == 200, response.text
    body = response.json()
    return Session(body["access_token"], body["refresh_token"], body["user"])


async def grant_staff(db: Any, citizen: Citizen, facility_code: str, role: str) -> Any:
    """Register the citizen as staff at a demo facility; return the facility id."""
    facility_id = await db.fetchval("SELECT id FROM facilities WHERE code = $1", facility_code)
    await db.execute(
        "INSERT INTO staff (personal_id, facility_id, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        citizen.personal_id,
        facility_id,
        role,
    )
    return facility_id


def client_of(app: Litestar, client_ip: str = "127.0.0.1") -> httpx.AsyncClient:
    """Requests to `app` as if from `client_ip`, run concurrently in this event loop."""
    transport = httpx.ASGITransport(app=app, client=(client_ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver.local")


@asynccontextmanager
async def serve(
    app_or_settings: Litestar | Settings, *, client_ip: str = "127.0.0.1"
) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh app (own pool, own JWKS cache) run in this event loop, so concurrent requests overlap.

    The shared `client` fixture runs the app on another thread and handles one request at a
    time. Enter this in the test itself: the app's lifespan must end in the task it started in.
    """
    app = app_or_settings if isinstance(app_or_settings, Litestar) else create_app(app_or_settings)
    async with app.lifespan(), client_of(app, client_ip) as http:
        yield http


async def insert_user(db: Any, citizen: Citizen | None = None, *, locale: str = "vi") -> uuid.UUID:
    """A user row as sign-in would leave it, without going through HTTP."""
    citizen = citizen or Citizen()
    user_id: uuid.UUID = await db.fetchval(
        """INSERT INTO users (personal_id, full_name, birthdate, sex, locale)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        citizen.personal_id,
        citizen.name,
        citizen.born,
        citizen.gender,
        locale,
    )
    return user_id


async def insert_device(db: Any, user_id: uuid.UUID, token: str | None = None, *, locale: str = "vi") -> str:
    """A registered device; returns its FCM token (unique unless given; see fcm_emulator's prefixes)."""
    token = token or f"device-{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO devices (user_id, token, platform, locale) VALUES ($1, $2, 'android', $3)",
        user_id,
        token,
        locale,
    )
    return token


async def notify(
    db: Any, user_id: uuid.UUID, kind: str = "payment_failed", **options: Any
) -> uuid.UUID | None:
    """Enqueue one notification in its own transaction, as domain code would."""
    params = options.pop("params", None) or {"invoice_id": uuid.uuid4()}
    async with db.transaction():
        return await notifications.enqueue(db, user_id, kind, params, **options)
