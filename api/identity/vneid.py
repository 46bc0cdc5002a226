"""Verifying VNeID ID tokens: OIDC signatures against the issuer's JWKS, with python-jose.

Keys are selected by `kid` from a cached JWKS fetched from the configured URL only (never a
URL named in the token); an unknown `kid` triggers at most one refresh per cool-down, so a
flood of made-up ids cannot turn us into a fetch amplifier.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from typing import Any, Literal

import httpx
import msgspec
from jose import JWTError, jwt

from api.identity.tokens import REQUIRED_CLAIMS
from api.settings import VneidConfig

# Pinned asymmetric algorithms; anything else (none, HS*) is refused before any key lookup.
ALGORITHMS = ("RS256", "ES256")
_KID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
REFRESH_COOLDOWN_SECONDS = 30.0


class InvalidIdToken(Exception):
    pass


class Dependent(msgspec.Struct, frozen=True):
    personal_id: str
    name: str
    birthdate: dt.date
    relationship: str = "child"


class IdTokenClaims(msgspec.Struct, frozen=True):
    sub: str
    name: str
    birthdate: dt.date
    gender: Literal["male", "female"]
    phone_number: str | None = None
    dependents: list[Dependent] = []


class JwksCache:
    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._keys: dict[str, dict[str, Any]] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    async def key(self, kid: str) -> dict[str, Any] | None:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched_at >= REFRESH_COOLDOWN_SECONDS:
                await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        self.fetch_count += 1
        try:
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
                response = await client.get(self._url)
                response.raise_for_status()
                keys = response.json().get("keys", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return  # keep the keys we had; the token fails with an unknown kid
        self._keys = {k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)}


class VneidVerifier:
    def __init__(self, config: VneidConfig, *, leeway: int, timeout: float) -> None:
        self.config = config
        self.leeway = leeway
        self.jwks = JwksCache(config.jwks_url, timeout=timeout)

    async def verify(self, token: str) -> IdTokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise InvalidIdToken("malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise InvalidIdToken("algorithm not allowed")
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise InvalidIdToken("key-location headers are not accepted")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise InvalidIdToken("bad kid")
        key = await self.jwks.key(kid)
        if key is None:
            raise InvalidIdToken("unknown kid")
        if key.get("alg", alg) != alg:
            raise InvalidIdToken("algorithm does not match the key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                options={**REQUIRED_CLAIMS, "leeway": self.leeway},
            )
        except JWTError as exc:
            raise InvalidIdToken(str(exc)) from None
        if claims.get("iat", 0) > time.time() + self.leeway:
            raise InvalidIdToken("issued in the future")
        try:
            return msgspec.convert(claims, IdTokenClaims, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidIdToken(f"claims: {exc}") from None
