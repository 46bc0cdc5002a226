"""ZaloPay (OpenAPI v2): the create request's mac and the callback's mac.

Two keys, two directions: key1 signs what we send, key2 signs what ZaloPay sends back. The
callback mac covers the `data` string exactly as received, so it is checked before that
string is parsed and never against a re-serialized copy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Sequence

# ZaloPay dates `app_trans_id` in GMT+7; a fixed offset is exactly what it means.
GMT7 = dt.timezone(dt.timedelta(hours=7), "GMT+7")

APP_TRANS_ID_MAX = 40


def _hmac(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def create_mac(
    app_id: int | str,
    app_trans_id: str,
    app_user: str,
    amount: int,
    app_time: int,
    embed_data: str,
    item: str,
    key1: str,
) -> str:
    """Hex HMAC-SHA256 with key1 over `app_id|app_trans_id|app_user|amount|app_time|embed_data|item`."""
    message = "|".join(
        str(part) for part in (app_id, app_trans_id, app_user, amount, app_time, embed_data, item)
    )
    return _hmac(key1, message)


def verify_callback(data: str, mac: str, key2s: Sequence[str]) -> bool:
    """Whether the callback's `mac` is the key2 HMAC of the raw `data` string (two keys during rotation)."""
    if not mac or not key2s:
        return False
    received = mac.lower().encode("utf-8", "replace")
    results = [hmac.compare_digest(_hmac(key2, data).encode(), received) for key2 in key2s]
    return any(results)


def app_trans_id(now: dt.datetime, suffix: str) -> str:
    """`yymmdd_suffix` with the date in GMT+7: ZaloPay rejects ids whose prefix is not today there."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if not suffix:
        raise ValueError("suffix is required")
    value = f"{now.astimezone(GMT7):%y%m%d}_{suffix}"
    if len(value) > APP_TRANS_ID_MAX or not value.isascii():
        raise ValueError(f"app_trans_id must be ASCII and at most {APP_TRANS_ID_MAX} characters")
    return value


def build_create_body(
    *,
    app_id: int,
    app_user: str,
    app_trans_id: str,
    app_time: int,
    amount: int,
    description: str,
    callback_url: str,
    key1: str,
    item: str = "[]",
    embed_data: str = "{}",
) -> dict[str, str | int]:
    """The body for `POST /v2/create`, with its mac.

    `item` and `embed_data` are JSON strings and are sent exactly as signed. `app_time` is Unix
    milliseconds; `amount` is plain VND (not × 100).
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError("amount must be a positive integer")
    return {
        "app_id": app_id,
        "app_user": app_user,
        "app_trans_id": app_trans_id,
        "app_time": app_time,
        "amount": amount,
        "item": item,
        "embed_data": embed_data,
        "description": description,
        "callback_url": callback_url,
        "mac": create_mac(app_id, app_trans_id, app_user, amount, app_time, embed_data, item, key1),
    }
