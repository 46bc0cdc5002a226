"""MoMo (AIO API v2): the create request and the IPN signature.

MoMo signs `key=value` pairs joined with `&` in a fixed key order, raw values, no encoding,
with HMAC-SHA256 and the secret key. The order below is v2's; v1 samples use another, so
the orders are spelled out here once and tested against the published field lists.
`accessKey` is part of the signed string but is not sent in the create body.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Literal

CREATE_FIELDS: tuple[str, ...] = (
    "accessKey",
    "amount",
    "extraData",
    "ipnUrl",
    "orderId",
    "orderInfo",
    "partnerCode",
    "redirectUrl",
    "requestId",
    "requestType",
)
IPN_FIELDS: tuple[str, ...] = (
    "accessKey",
    "amount",
    "extraData",
    "message",
    "orderId",
    "orderInfo",
    "orderType",
    "partnerCode",
    "payType",
    "requestId",
    "responseTime",
    "resultCode",
    "transId",
)

REQUEST_TYPES = frozenset({"captureWallet", "payWithMethod", "payWithATM"})
MIN_AMOUNT = 1_000
MAX_AMOUNT = 50_000_000

_PAID = frozenset({0, 9000})  # 9000 "authorized" is final for one-step payments
_PENDING = frozenset({1000, 7000, 7002, 8000})


def _signed_string(order: Sequence[str], fields: Mapping[str, str | int], access_key: str) -> str:
    values = {**fields, "accessKey": access_key}
    return "&".join(f"{name}={values[name]}" for name in order)


def _hmac(secret_key: str, message: str) -> str:
    return hmac.new(secret_key.encode(), message.encode(), hashlib.sha256).hexdigest()


def create_signature(fields: Mapping[str, str | int], access_key: str, secret_key: str) -> str:
    """Signature of a create request; `fields` holds every `CREATE_FIELDS` name but `accessKey`.

    A missing field raises `KeyError`: signing a partial request would only fail at MoMo.
    """
    return _hmac(secret_key, _signed_string(CREATE_FIELDS, fields, access_key))


def ipn_signature(fields: Mapping[str, str | int], access_key: str, secret_key: str) -> str:
    """Signature MoMo puts on an IPN; `fields` holds every `IPN_FIELDS` name but `accessKey`."""
    return _hmac(secret_key, _signed_string(IPN_FIELDS, fields, access_key))


def _wire_value(value: object) -> str | None:
    """The text MoMo signed for a JSON value: strings as they are, integers in decimal.

    Anything else (null, floats, booleans, objects) is not something MoMo sends in a signed
    field, so it cannot verify.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def verify_ipn(body: Mapping[str, object], access_key: str, secret_keys: Sequence[str]) -> bool:
    """Whether an IPN body was signed with one of the active secret keys (two during rotation).

    Constant-time comparison; a missing or odd-typed field is simply not verified.
    """
    received = body.get("signature")
    if not isinstance(received, str) or not received or not secret_keys:
        return False
    fields: dict[str, str | int] = {}
    for name in IPN_FIELDS[1:]:
        value = _wire_value(body.get(name))
        if value is None:
            return False
        fields[name] = value
    received_bytes = received.lower().encode("utf-8", "replace")
    results = [
        hmac.compare_digest(ipn_signature(fields, access_key, key).encode(), received_bytes)
        for key in secret_keys
    ]
    return any(results)


def result_kind(result_code: int) -> Literal["paid", "pending", "failed"]:
    """What a `resultCode` means for our attempt: only 0 and 9000 are money received."""
    if result_code in _PAID:
        return "paid"
    if result_code in _PENDING:
        return "pending"
    return "failed"


def build_create_body(
    *,
    partner_code: str,
    access_key: str,
    secret_key: str,
    request_id: str,
    amount: int,
    order_id: str,
    order_info: str,
    redirect_url: str,
    ipn_url: str,
    request_type: str = "captureWallet",
    extra_data: str = "",
    lang: str = "vi",
) -> dict[str, str | int]:
    """The JSON body for `POST /v2/gateway/api/create`, signed; `accessKey` is signed, not sent."""
    if isinstance(amount, bool) or not isinstance(amount, int) or not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise ValueError(f"amount must be an integer from {MIN_AMOUNT} to {MAX_AMOUNT} VND")
    if request_type not in REQUEST_TYPES:
        raise ValueError(f"request_type must be one of {sorted(REQUEST_TYPES)}")
    if lang not in ("vi", "en"):
        raise ValueError("lang must be 'vi' or 'en'")
    body: dict[str, str | int] = {
        "partnerCode": partner_code,
        "requestId": request_id,
        "amount": amount,
        "orderId": order_id,
        "orderInfo": order_info,
        "redirectUrl": redirect_url,
        "ipnUrl": ipn_url,
        "requestType": request_type,
        "extraData": extra_data,
        "lang": lang,
    }
    body["signature"] = create_signature(body, access_key, secret_key)
    return body
