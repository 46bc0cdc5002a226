"""The embedded dev issuer: signs VNeID-shaped ID tokens so the real verification path runs locally.

Only mounted when the app runs in dev mode (production refuses to start with it). Its RSA
key lives in `<data_dir>/dev-issuer/key.pem` so the server and `telehealth dev-token` agree.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt
from jose.backends.base import Key

from api.identity.vneid import Dependent
from api.settings import Settings

KID = "dev-issuer-1"


def _key_path(settings: Settings) -> Path:
    return settings.data_path / "dev-issuer" / "key.pem"


def load_or_create_key(settings: Settings) -> bytes:
    path = _key_path(settings)
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:  # O_EXCL: when two processes race, the first file wins and both use it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return pem


def public_jwks(settings: Settings) -> dict[str, Any]:
    public = jwk.RSAKey(load_or_create_key(settings), "RS256").public_key().to_dict()  # type: ignore[misc]
    return {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}


def mint_id_token(
    settings: Settings,
    *,
    personal_id: str,
    name: str,
    birthdate: dt.date,
    gender: str,
    phone_number: str | None = None,
    dependents: list[Dependent] = (),  # type: ignore[assignment]
    lifetime: int = 600,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.dev_issuer_url,
        "aud": settings.vneid.audience,
        "sub": personal_id,
        "iat": now,
        "exp": now + lifetime,
        "name": name,
        "birthdate": birthdate.isoformat(),
        "gender": gender,
        "dependents": [
            {
                "personal_id": d.personal_id,
                "name": d.name,
                "birthdate": d.birthdate.isoformat(),
                "relationship": d.relationship,
            }
            for d in dependents
        ],
    }
    if phone_number:
        claims["phone_number"] = phone_number
    return jwt.encode(
        claims, _signing_key(load_or_create_key(settings)), algorithm="RS256", headers={"kid": KID}
    )


@functools.lru_cache(maxsize=4)
def _signing_key(pem: bytes) -> Key:
    # Parsing and checking an RSA key takes ~40 ms; a benchmark signing in 1,000 people felt it.
    return jwk.construct(pem.decode(), "RS256")
