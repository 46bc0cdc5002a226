"""Bank-transfer notices: the signed webhook a bank or aggregator sends for each incoming transfer.

VietQR itself has no callback, so this notice is what ties money on our account to an
invoice (through the memo). The signature is a hex HMAC-SHA256 of the raw body, checked
before the body is decoded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Sequence
from typing import Annotated

import msgspec

SIGNATURE_HEADER = "X-Signature"


def verify_signature(raw_body: bytes, header: str | None, secrets: Sequence[str]) -> bool:
    """Whether `header` is the hex HMAC-SHA256 of `raw_body` under one of the active secrets.

    Constant-time; hex letter case and surrounding spaces are ignored; a missing header fails.
    """
    if not header or not secrets:
        return False
    received = header.strip().lower().encode("utf-8", "replace")
    results = [hmac.compare_digest(_expected(raw_body, secret), received) for secret in secrets]
    return any(results)  # every secret is tried, so timing does not tell which one matched


def _expected(raw_body: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest().encode()


class BankTransferNotice(msgspec.Struct, frozen=True):
    """One incoming transfer as the bank reports it.

    Unknown fields are accepted and ignored, unlike our request bodies: banks and aggregators
    add fields of their own, and a notice for real money must not be refused over one. The
    signature, not the shape, is what makes the notice trustworthy.
    `memo` is the bank's free text (often our memo wrapped in the bank's own prefixes), so it
    is long; `received_at` must carry its offset.
    """

    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    amount: Annotated[int, msgspec.Meta(ge=1, le=10**13)]
    memo: Annotated[str, msgspec.Meta(max_length=500)]
    received_at: Annotated[dt.datetime, msgspec.Meta(tz=True)]
