"""VNPay (API 2.1.0): the pay URL we send the browser to, and the signature on it and on the IPN.

VNPay signs a canonical query string rather than the bytes on the wire, so both directions
rebuild that string the same way: non-empty `vnp_*` parameters, sorted by key, each key and
value form-encoded with `quote_plus`. Encoders disagree on a few characters (`~`, `*`), which
is one more reason to keep free text out of the parameters: `build_pay_params` reduces the
order info to ASCII letters, digits and spaces.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from urllib.parse import quote_plus

# VNPay states every time in GMT+7; a fixed offset, not a zone, is exactly what it means.
GMT7 = dt.timezone(dt.timedelta(hours=7), "GMT+7")

_UNSIGNED = frozenset({"vnp_SecureHash", "vnp_SecureHashType"})
_DATE_FORMAT = "%Y%m%d%H%M%S"
_ORDER_INFO_MAX = 255

RESPONSE_CODES: Mapping[str, str] = MappingProxyType(
    {
        "00": "Confirm Success",  # also the answer when a failed payment was recorded
        "01": "Order not found",
        "02": "Order already confirmed",
        "04": "Invalid amount",
        "97": "Invalid signature",
        "99": "Unknown error",
    }
)
"""`RspCode` → `Message` for the JSON answer to an IPN call."""


def signing_string(params: Mapping[str, str]) -> str:
    """The canonical string VNPay signs: the same for the pay URL and the IPN."""
    signed = sorted(
        (key, value)
        for key, value in params.items()
        if key.startswith("vnp_") and key not in _UNSIGNED and value != ""
    )
    return "&".join(f"{_quote_plus(key)}={_quote_plus(value)}" for key, value in signed)


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _quote_plus(text: str) -> str:
    """`quote_plus`, without its work for text it leaves as it is (most keys and values)."""
    return text if _UNRESERVED.fullmatch(text) else quote_plus(text)


def sign(params: Mapping[str, str], secret: str) -> str:
    """`vnp_SecureHash`: lowercase hex HMAC-SHA512 of the signing string."""
    return _hash(secret, signing_string(params).encode())


def _hash(secret: str, signed: bytes) -> str:
    return hmac.new(secret.encode(), signed, hashlib.sha512).hexdigest()


def pay_url(base_url: str, params: Mapping[str, str], secret: str) -> str:
    """The gateway URL for the browser: the signing string itself is the query, plus the hash.

    Building the query from the signed string (instead of `urlencode`) guarantees VNPay sees
    exactly what was signed.
    """
    if "?" in base_url or "#" in base_url:
        raise ValueError("base_url must not carry a query or fragment")
    return f"{base_url}?{signing_string(params)}&vnp_SecureHash={sign(params, secret)}"


def verify(params: Mapping[str, str], secrets: Sequence[str]) -> bool:
    """Whether `vnp_SecureHash` was made with one of the active secrets (two during rotation).

    `params` are the decoded query parameters as received. Comparison is constant-time and
    ignores the hash's letter case (some clients upper-case hex).
    """
    received = params.get("vnp_SecureHash", "")
    if not received or not secrets:
        return False
    received_bytes = received.lower().encode("utf-8", "replace")
    signed = signing_string(params).encode()
    results = [hmac.compare_digest(_hash(secret, signed).encode(), received_bytes) for secret in secrets]
    return any(results)  # every secret is tried, so timing does not tell which one matched


def clean_order_info(text: str) -> str:
    """Order info as VNPay wants it: ASCII letters, digits and single spaces.

    Vietnamese letters lose their marks (`Khám` → `Kham`, `đ` → `d`) so the text stays readable;
    anything else becomes a space.
    """
    text = text.replace("đ", "d").replace("Đ", "D")
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = re.sub(r"[^A-Za-z0-9]+", " ", text).strip()
    return text[:_ORDER_INFO_MAX].rstrip()


def _vnpay_time(moment: dt.datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("datetimes must be timezone-aware")
    return moment.astimezone(GMT7).strftime(_DATE_FORMAT)


def build_pay_params(
    *,
    tmn_code: str,
    amount_vnd: int,
    txn_ref: str,
    order_info: str,
    return_url: str,
    ip_addr: str,
    created_at: dt.datetime,
    expires_at: dt.datetime,
    locale: str,
    bank_code: str | None = None,
) -> dict[str, str]:
    """The unsigned `vnp_*` parameters for a payment; `pay_url` signs them.

    `vnp_SecureHashType` is left out on purpose: 2.1.0 rejects it.
    """
    if isinstance(amount_vnd, bool) or not isinstance(amount_vnd, int) or amount_vnd <= 0:
        raise ValueError("amount_vnd must be a positive integer")
    if locale not in ("vn", "en"):
        raise ValueError("locale must be 'vn' or 'en'")
    if not tmn_code or not txn_ref:
        raise ValueError("tmn_code and txn_ref are required")
    create_date, expire_date = _vnpay_time(created_at), _vnpay_time(expires_at)
    if expires_at <= created_at:
        raise ValueError("expires_at must be after created_at")
    info = clean_order_info(order_info)
    if not info:
        raise ValueError("order_info has no letters or digits")
    params = {
        "vnp_Version": "2.1.0",
        "vnp_Command": "pay",
        "vnp_TmnCode": tmn_code,
        "vnp_Amount": str(amount_vnd * 100),
        "vnp_CreateDate": create_date,
        "vnp_ExpireDate": expire_date,
        "vnp_CurrCode": "VND",
        "vnp_IpAddr": ip_addr,
        "vnp_Locale": locale,
        "vnp_OrderInfo": info,
        "vnp_OrderType": "other",
        "vnp_ReturnUrl": return_url,
        "vnp_TxnRef": txn_ref,
    }
    if bank_code:
        params["vnp_BankCode"] = bank_code
    return params
