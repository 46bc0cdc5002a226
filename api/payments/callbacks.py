"""Provider callbacks: verify exactly what was received, then hand a `Report` to `settle`.

Each provider's signature is checked on the bytes or fields as they arrived (never on
re-serialised JSON), with every active secret of the account the order belongs to (the
default account when the order is unknown), in constant time. Every callback is stored,
redacted, with its verification result, in the transaction that applies it.

What needs no database (parsing, redaction, checking the signature with the provider's
default account, which most orders are paid to) is done before a connection is taken. A
callback that account verifies is then settled by one statement when the order is indeed paid
to it and has no appointment to book (`settle_at_once`); any other is settled after looking
the order up (its facility's account, its appointment) with one query outside any transaction.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from api.db import FairPool
from api.payments import momo, queries, vnpay, zalopay
from api.payments.accounts import Account, account_of_attempt, default_account
from api.payments.bank_transfer import BankTransferNotice, verify_signature
from api.payments.redact import redact_callback
from api.payments.settle import Report, Result, settle, settle_at_once
from api.settings import Settings, secrets_of
from notifications.outbox import Waker

VNPAY_ANSWERS: dict[Result, tuple[str, str]] = {
    "applied": ("00", "Confirm Success"),
    "duplicate": ("02", "Order already confirmed"),
    "unknown_order": ("01", "Order not Found"),
    "wrong_amount": ("04", "Invalid amount"),
    "invalid_signature": ("97", "Invalid signature"),
    "pending": ("00", "Confirm Success"),
}
# Our memos (vietqr.memo_for): "TH" and ten Crockford base32 characters. Banks wrap the memo in
# their own text, which may hold look-alikes: every overlapping candidate is tried.
MEMO_CANDIDATES = re.compile(r"(?=(TH[0-9A-HJKMNP-TV-Z]{10}))")


def _account(settings: Settings, provider: str, attempt: asyncpg.Record | None) -> Account:
    return (
        account_of_attempt(settings, attempt) if attempt is not None else default_account(settings, provider)
    )


async def _settle_signed(
    pool: FairPool,
    settings: Settings,
    report: Report,
    signed_by: Callable[[Account], bool],
    now: dt.datetime,
    waker: Waker | None,
) -> Result:
    """Verify a callback (`signed_by`: whether an account's secrets and merchant code verify it)
    and settle it. Most orders are paid to the provider's default account: when that account
    verifies the callback, one statement settles it if the order is indeed its and needs nothing
    more (`settle_at_once`). Otherwise the callback is verified with the account of the order
    (as that statement found it, or as looked up) and settled by `settle`."""
    at_once = signed_by(default_account(settings, report.provider))
    async with pool.acquire() as conn:
        if at_once:
            result, attempt = await settle_at_once(conn, settings, report, now, waker=waker)
            if result is not None:
                return result
        else:
            attempt = (
                await queries.find_attempt(conn, report.provider, report.order_ref)
                if report.order_ref
                else None
            )
        valid = signed_by(_account(settings, report.provider, attempt))
        return await settle(conn, settings, report, now, signature_valid=valid, attempt=attempt, waker=waker)


async def vnpay_ipn(
    pool: FairPool, settings: Settings, params: dict[str, str], now: dt.datetime, waker: Waker | None = None
) -> dict[str, str]:
    ref = params.get("vnp_TxnRef", "")
    # VND x 100: anything but a whole number of VND is a wrong amount, never rounded.
    raw_amount = params.get("vnp_Amount", "")
    amount = int(raw_amount) // 100 if raw_amount.isdigit() and int(raw_amount) % 100 == 0 else -1
    paid = params.get("vnp_ResponseCode") == "00" and params.get("vnp_TransactionStatus") == "00"
    report = Report(
        provider="vnpay",
        order_ref=ref,
        transaction_id=params.get("vnp_TransactionNo") or None,
        amount_vnd=amount,
        outcome="paid" if paid else "failed",
        payload=redact_callback("vnpay", params),
    )

    def signed_by(account: Account) -> bool:
        return (
            vnpay.verify(params, account.secrets["hash_secret"])
            and params.get("vnp_TmnCode") == account.config["tmn_code"]
        )

    result = await _settle_signed(pool, settings, report, signed_by, now, waker)
    code, message = VNPAY_ANSWERS[result]
    return {"RspCode": code, "Message": message}


async def momo_ipn(
    pool: FairPool, settings: Settings, body: dict[str, Any], now: dt.datetime, waker: Waker | None = None
) -> Result:
    ref = str(body.get("orderId", ""))
    code = body.get("resultCode")
    amount = body.get("amount")
    report = Report(
        provider="momo",
        order_ref=ref,
        transaction_id=str(body["transId"]) if body.get("transId") not in (None, "", 0) else None,
        amount_vnd=amount if isinstance(amount, int) else None,
        outcome=momo.result_kind(code) if isinstance(code, int) else "failed",
        payload=redact_callback("momo", body),
    )

    def signed_by(account: Account) -> bool:
        return momo.verify_ipn(body, account.config["access_key"], account.secrets["secret_key"]) and (
            body.get("partnerCode") == account.config["partner_code"]
        )

    return await _settle_signed(pool, settings, report, signed_by, now, waker)


async def zalopay_callback(
    pool: FairPool, settings: Settings, body: dict[str, Any], now: dt.datetime, waker: Waker | None = None
) -> dict[str, Any]:
    data, mac = body.get("data"), body.get("mac")
    fields: dict[str, Any] = {}
    if isinstance(data, str):
        try:
            decoded = msgspec.json.decode(data)
            fields = decoded if isinstance(decoded, dict) else {}
        except msgspec.DecodeError:
            fields = {}
    ref = str(fields.get("app_trans_id", ""))
    amount = fields.get("amount")
    report = Report(
        provider="zalopay",
        order_ref=ref or None,
        transaction_id=str(fields["zp_trans_id"]) if fields.get("zp_trans_id") else None,
        amount_vnd=amount if isinstance(amount, int) else None,
        outcome="paid",  # ZaloPay calls back for successful payments only
        payload=redact_callback("zalopay", {"data": fields or data, "mac": mac, "type": body.get("type")}),
    )

    def signed_by(account: Account) -> bool:
        return (
            isinstance(data, str)
            and isinstance(mac, str)
            and zalopay.verify_callback(data, mac, account.secrets["key2"])
            and str(fields.get("app_id")) == str(account.config["app_id"])
        )

    result = await _settle_signed(pool, settings, report, signed_by, now, waker)
    if result == "invalid_signature":
        return {"return_code": -1, "return_message": "mac not equal"}
    return {"return_code": 1, "return_message": "success" if result == "applied" else result}


async def bank_transfer(
    pool: FairPool,
    settings: Settings,
    raw: bytes,
    signature: str | None,
    now: dt.datetime,
    waker: Waker | None = None,
) -> tuple[bool, str]:
    """(signature valid, what happened): applied, duplicate or unmatched (kept for staff)."""
    valid = verify_signature(raw, signature, secrets_of(settings.bank_webhook_secret))
    try:
        notice = msgspec.json.decode(raw, type=BankTransferNotice)
    except msgspec.DecodeError:
        notice = None
    payload = redact_callback(
        "bank",
        msgspec.json.decode(raw) if notice is not None else {"raw": raw[:2000].decode("utf-8", "replace")},
    )
    if not valid or notice is None:
        report = Report("vietqr", None, None, None, "failed", payload)
        async with pool.acquire() as conn:
            await settle(conn, settings, report, now, signature_valid=False)
        return False, "invalid_signature" if not valid else "invalid_body"
    candidates = MEMO_CANDIDATES.findall(notice.memo.upper())
    async with pool.acquire() as conn:
        attempt = await queries.find_vietqr_attempt(conn, candidates) if candidates else None
        account = account_of_attempt(settings, attempt) if attempt is not None else None
        reason = _unmatched(notice, attempt, account)
        if reason is not None:
            async with conn.transaction():
                await queries.keep_unmatched(
                    conn, notice, reason, attempt["facility_id"] if attempt else None
                )
                await queries.record_callback(
                    conn,
                    provider="vietqr",
                    payload=payload,
                    signature_valid=True,
                    attempt_id=attempt["id"] if attempt else None,
                    provider_transaction_id=notice.reference,
                    outcome=f"unmatched: {reason}",
                    source="callback",
                )
            return True, "unmatched"
        assert attempt is not None
        report = Report("vietqr", attempt["order_ref"], notice.reference, notice.amount, "paid", payload)
        result = await settle(conn, settings, report, now, attempt=attempt, waker=waker)
    return True, result


def _unmatched(
    notice: BankTransferNotice, attempt: asyncpg.Record | None, account: Account | None
) -> str | None:
    """Why a transfer cannot pay anything (kept for staff), or None when it pays its attempt."""
    if attempt is None or account is None:
        return "unknown memo"
    if notice.account != account.config["account"]:
        return "wrong account"
    if attempt["amount_vnd"] != notice.amount:
        return "wrong amount"
    return None
