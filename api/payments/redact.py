"""Redaction of provider callbacks before they are stored.

Callbacks are kept for reconciliation and disputes, but their signatures (and anything that
looks like a key, secret or token) are useless there and dangerous in a leak: a stored
signature next to its signed data helps nobody but an attacker testing guesses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

REDACTED = "[redacted]"

# Fields each provider signs its callbacks with, by exact name.
_PROVIDER_FIELDS: Mapping[str, frozenset[str]] = {
    "vnpay": frozenset({"vnp_SecureHash", "vnp_SecureHashType"}),
    "momo": frozenset({"signature"}),
    "zalopay": frozenset({"mac"}),
    "bank_transfer": frozenset({"signature"}),
}
# Words of a field name (split at `_`, `-` and camelCase) that mark it sensitive.
_WORDS = frozenset(
    {"signature", "sig", "hash", "mac", "hmac", "secret", "key", "token", "password", "passwd", "checksum"}
)
# Fragments of the squashed, lower-case name, for names written without separators.
_FRAGMENTS = ("signature", "securehash", "secret", "password", "hmac", "checksum", "apikey", "accesskey")
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")


@functools.lru_cache(maxsize=4096)  # the same few field names, callback after callback
def _sensitive(provider: str, key: str) -> bool:
    if key in _PROVIDER_FIELDS.get(provider, frozenset()):
        return True
    if any(word.lower() in _WORDS for word in _WORD.findall(key)):
        return True
    squashed = re.sub(r"[^a-z0-9]", "", key.lower())
    return any(fragment in squashed for fragment in _FRAGMENTS)


def _redact(provider: str, value: object) -> object:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and _sensitive(provider, key) else _redact(provider, item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(provider, item) for item in value]
    return value


def redact_callback(provider: str, payload: Mapping[str, object]) -> dict[str, object]:
    """A copy of `payload` with signature, mac, hash, key, secret and token values replaced.

    Nested objects and lists are walked too; the input is left unchanged. An unknown provider
    still gets the generic rules, since storing a callback must never fail.
    """
    return {
        key: REDACTED if _sensitive(provider, key) else _redact(provider, value)
        for key, value in payload.items()
    }
