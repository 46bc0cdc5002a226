"""Our own tokens: short-lived access JWTs (python-jose, HS256 pinned) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

import msgspec
from jose import JWTError, jwt

from api.settings import Settings

ACCESS_ALGORITHM = "HS256"  # pinned: the header's `alg` is never trusted
ACCESS_TYPE = "access"
# Claims every JWT we accept must carry, ours and VNeID's alike (RFC 8725).
REQUIRED_CLAIMS = {f"require_{claim}": True for claim in ("exp", "iat", "aud", "iss", "sub")}


class AccessClaims(msgspec.Struct, frozen=True):
    sub: uuid.UUID  # the user
    sid: uuid.UUID  # the session
    iat: int
    exp: int
    jti: str


class InvalidToken(Exception):
    pass


def issue_access_token(settings: Settings, *, user_id: uuid.UUID, session_id: uuid.UUID) -> str:
    now = int(time.time())
    claims = {
        "typ": ACCESS_TYPE,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": str(user_id),
        "sid": str(session_id),
        "iat": now,
        "exp": now + settings.access_token_ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=ACCESS_ALGORITHM)


def verify_access_token(settings: Settings, token: str) -> AccessClaims:
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[ACCESS_ALGORITHM],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={**REQUIRED_CLAIMS, "require_jti": True, "leeway": 0},
        )
    except JWTError as exc:
        raise InvalidToken(str(exc)) from None
    if claims.get("typ") != ACCESS_TYPE:
        raise InvalidToken("not an access token")
    try:
        return msgspec.convert(claims, AccessClaims, strict=False)
    except msgspec.ValidationError:
        raise InvalidToken("malformed claims") from None


class VerifiedTokens:
    """The access tokens this process has already verified, so each is verified once.

    The app sends the same signed bytes on every request for 15 minutes. Their signature and
    fixed claims cannot change, so a token seen before skips python-jose (a fifth of the CPU
    of an authenticated request, bench/README.md); its expiry is still checked every time, and
    the user, roles and session are still read from the database. Oldest entries go first.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._claims: dict[str, AccessClaims] = {}

    def verify(self, settings: Settings, token: str) -> AccessClaims:
        claims = self._claims.get(token)
        if claims is None:
            claims = verify_access_token(settings, token)
            if len(self._claims) >= self.capacity:
                del self._claims[next(iter(self._claims))]  # dicts keep insertion order
            self._claims[token] = claims
        elif int(time.time()) > claims.exp:  # whole seconds, as python-jose compares
            del self._claims[token]
            raise InvalidToken("expired")
        return claims


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> bytes:
    """Only the hash is stored, so a database leak does not hand out sessions."""
    return hashlib.sha256(token.encode()).digest()
