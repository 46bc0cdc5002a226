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
from pathlib import Path
from typing import Any

import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from litestar import Litestar

import notifications
from api.app import create_app
from api.identity.personal_id import sex_digit
from api.settings import Settings
from notifications.fcm_emulator import FcmEmulator

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


def pushing_in_process(settings: Settings, fcm: FcmEmulator, tmp_path: Path) -> Settings:
    """`settings` with the notification worker inside the API process, pushing to the FCM
    emulator, polling only every 30 s: so only a wake-up can explain a quick push."""
    account = fcm.write_service_account(tmp_path / "service-account.json")
    return msgspec.structs.replace(
        settings,
        notification_worker="in_process",
        fcm_credentials_file=str(account),
        fcm_endpoint=fcm.send_url,
        notification_poll_seconds=30.0,
    )


# --- booking: a test's own doctor, service and schedule ---------------------------------------
# The session database is shared, so booking tests each work on a doctor nobody else books.

CLINIC_TZ = dt.timezone(dt.timedelta(hours=7))  # Asia/Ho_Chi_Minh keeps +07:00 all year
EVERY_DAY = range(1, 8)


def clinic_today() -> dt.date:
    return dt.datetime.now(CLINIC_TZ).date()


def clinic_at(day: dt.date, hhmm: str) -> dt.datetime:
    """`day` at `hh:mm` on the clinic's wall clock, as an aware datetime."""
    return dt.datetime.combine(day, dt.time.fromisoformat(hhmm), tzinfo=CLINIC_TZ)


@dataclass
class OwnClinic:
    """A doctor and a service inserted for one test at a demo facility, with one schedule."""

    facility_id: uuid.UUID
    doctor_id: uuid.UUID
    service_id: uuid.UUID
    schedule_id: uuid.UUID
    price_vnd: int
    duration_minutes: int

    def booking(self, start: dt.datetime, **extra: Any) -> dict[str, Any]:
        """A POST /v1/appointments body for this doctor and service."""
        return {
            "doctor_id": str(self.doctor_id),
            "service_id": str(self.service_id),
            "start": start.isoformat(),
            **extra,
        }

    def availability(self, day_from: dt.date, day_to: dt.date | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "doctor_id": str(self.doctor_id),
            "date_from": day_from.isoformat(),
            "date_to": (day_to or day_from).isoformat(),
            **extra,
        }


async def insert_doctor(db: Any, facility_id: uuid.UUID, *, personal_id: str | None = None) -> uuid.UUID:
    doctor_id: uuid.UUID = await db.fetchval(
        """INSERT INTO doctors (facility_id, code, full_name, title, personal_id, video)
           VALUES ($1, $2, 'Bác sĩ Kiểm Thử Đặt Lịch', 'BS', $3, true) RETURNING id""",
        facility_id,
        f"BS-T-{uuid.uuid4().hex[:10].upper()}",
        personal_id,
    )
    return doctor_id


async def insert_service(
    db: Any, facility_id: uuid.UUID, *, duration: int = 15, price: int = 50_000, prepaid: bool = False
) -> uuid.UUID:
    service_id: uuid.UUID = await db.fetchval(
        """INSERT INTO services (facility_id, code, name, duration_minutes, price_vnd, video_offered,
                                 prepayment_required)
           VALUES ($1, $2, 'Khám kiểm thử đặt lịch', $3, $4, true, $5) RETURNING id""",
        facility_id,
        f"SV-T-{uuid.uuid4().hex[:10].upper()}",
        duration,
        price,
        prepaid,
    )
    return service_id


async def insert_schedule(
    db: Any,
    facility_id: uuid.UUID,
    doctor_id: uuid.UUID,
    service_id: uuid.UUID,
    *,
    windows: tuple[tuple[str, str], ...] = (("08:00", "12:00"),),
    weekdays: Any = EVERY_DAY,
    capacity: int = 1,
    buffer_minutes: int = 0,
    modes: tuple[str, ...] = ("in_person",),
    horizon_days: int = 30,
    release_time: dt.time = dt.time(7, 0),
    valid_from: dt.date | None = None,
    valid_until: dt.date | None = None,
) -> uuid.UUID:
    weekly = [{"weekday": d, "start": s, "end": e} for d in weekdays for s, e in windows]
    schedule_id: uuid.UUID = await db.fetchval(
        """INSERT INTO schedules (facility_id, doctor_id, service_id, weekly, capacity, buffer_minutes, modes,
                                  horizon_days, release_time, valid_from, valid_until)
           VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11) RETURNING id""",
        facility_id,
        doctor_id,
        service_id,
        json.dumps(weekly),
        capacity,
        buffer_minutes,
        list(modes),
        horizon_days,
        release_time,
        valid_from or clinic_today(),
        valid_until,
    )
    return schedule_id


async def own_clinic(
    db: Any,
    facility_code: str,
    *,
    duration: int = 15,
    price: int = 50_000,
    prepaid: bool = False,
    doctor_personal_id: str | None = None,
    **schedule: Any,
) -> OwnClinic:
    """A fresh doctor and service at the demo facility `facility_code` and a schedule for them
    (every day 08:00–12:00 clinic time, capacity 1, in person, valid from today, unless told)."""
    facility_id: uuid.UUID = await db.fetchval("SELECT id FROM facilities WHERE code = $1", facility_code)
    assert facility_id is not None, facility_code
    doctor_id = await insert_doctor(db, facility_id, personal_id=doctor_personal_id)
    service_id = await insert_service(db, facility_id, duration=duration, price=price, prepaid=prepaid)
    schedule_id = await insert_schedule(db, facility_id, doctor_id, service_id, **schedule)
    return OwnClinic(facility_id, doctor_id, service_id, schedule_id, price, duration)


async def sessions_for_many(db: Any, settings: Settings, count: int) -> list[Session]:
    """`count` distinct citizens, each with a live session and an access token, made in two
    statements instead of `count` sign-ins (200 sign-ins through the API take about 8 s).

    The token is the one sign-in issues (api.identity.tokens); there is no refresh token.
    """
    from api.identity.tokens import issue_access_token

    citizens = [Citizen() for _ in range(count)]
    users = await db.fetch(
        """INSERT INTO users (personal_id, full_name, birthdate, sex)
           SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::text[]) RETURNING id""",
        [c.personal_id for c in citizens],
        [c.name for c in citizens],
        [c.born for c in citizens],
        [c.gender for c in citizens],
    )
    sessions = await db.fetch(
        "INSERT INTO auth_sessions (user_id) SELECT unnest($1::uuid[]) RETURNING id, user_id",
        [u["id"] for u in users],
    )
    return [
        Session(
            issue_access_token(settings, user_id=s["user_id"], session_id=s["id"]),
            "",
            {"id": str(s["user_id"])},
        )
        for s in sessions
    ]
