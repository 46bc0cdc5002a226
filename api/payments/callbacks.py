"""Provider callbacks: verify exactly what was received, then hand a `Report` to `settle`.

Each provider's signature is checked on the bytes or fields as they arrived (never on
re-serialised JSON), with every active secret of the account the order belongs to (the
default account when the order is unknown), in constant time. Every callback is stored,
redacted, with its verification result, in the transaction that applies it.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import asyncpg
import msgspec

from api.payments import momo, queries, vnpay, zalopay
from api.payments.accounts import Account, account_for, default_account
from api.payments.bank_transfer import BankTransferNotice, verify_signature
from api.payments.redact import redact_callback
from api.payments.settle import Report, Result, settle
from api.settings import Settings, secrets_of

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


async def _account(
    conn: asyncpg.Connection, settings: Settings, provider: str, attempt: asyncpg.Record | None
) -> Account:
    if attempt is None:
        return default_account(settings, provider)
    facility_id = await queries.facility_of_invoice(conn, attempt["invoice_id"])
    return await account_for(conn, settings, facility_id, provider)


async def vnpay_ipn(
    conn: asyncpg.Connection, settings: Settings, params: dict[str, str], now: dt.datetime
) -> dict[str, str]:
    ref = params.get("vnp_TxnRef", "")
    attempt = await queries.find_attempt(conn, "vnpay", ref)
    account = await _account(conn, settings, "vnpay", attempt)
    valid = (
        vnpay.verify(params, account.secrets["hash_secret"])
        and params.get("vnp_TmnCode") == account.config["tmn_code"]
    )
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
    result = await settle(conn, settings, report, now, signature_valid=valid, attempt=attempt)
    code, message = VNPAY_ANSWERS[result]
    return {"RspCode": code, "Message": message}


async def momo_ipn(
    conn: asyncpg.Connection, settings: Settings, body: dict[str, Any], now: dt.datetime
) -> Result:
    ref = str(body.get("orderId", ""))
    attempt = await queries.find_attempt(conn, "momo", ref)
    account = await _account(conn, settings, "momo", attempt)
    valid = momo.verify_ipn(body, account.config["access_key"], account.secrets["secret_key"]) and (
        body.get("partnerCode") == account.config["partner_code"]
    )
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
    return await settle(conn, settings, report, now, signature_valid=valid, attempt=attempt)


async def zalopay_callback(
    conn: asyncpg.Connection, settings: Settings, body: dict[str, Any], now: dt.datetime
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
    attempt = await queries.find_attempt(conn, "zalopay", ref) if ref else None
    account = await _account(conn, settings, "zalopay", attempt)
    valid = (
        isinstance(data, str)
        and isinstance(mac, str)
        and zalopay.verify_callback(data, mac, account.secrets["key2"])
        and str(fields.get("app_id")) == str(account.config["app_id"])
    )
    amount = fields.get("amount")
    report = Report(
        provider="zalopay",
        order_ref=ref or None,
        transaction_id=str(fields["zp_trans_id"]) if fields.get("zp_trans_id") else None,
        amount_vnd=amount if isinstance(amount, int) else None,
        outcome="paid",  # ZaloPay calls back for successful payments only
        payload=redact_callback("zalopay", {"data": fields or data, "mac": mac, "type": body.get("type")}),
    )
    result = await settle(conn, settings, report, now, signature_valid=valid, attempt=attempt)
    if result == "invalid_signature":
        return {"return_code": -1, "return_message": "mac not equal"}
    return {"return_code": 1, "return_message": "success" if result == "applied" else result}


async def bank_transfer(
    conn: asyncpg.Connection, settings: Settings, raw: bytes, signature: str | None, now: dt.datetime
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
        await settle(conn, settings, report, now, signature_valid=False)
        return False, "invalid_signature" if not valid else "invalid_body"
    attempt = None
    for candidate in MEMO_CANDIDATES.findall(notice.memo.upper()):
        attempt = await queries.find_attempt(conn, "vietqr", candidate)
        if attempt is not None:
            break
    facility_id = await queries.facility_of_invoice(conn, attempt["invoice_id"]) if attempt else None
    account = await account_for(conn, settings, facility_id, "vietqr") if facility_id else None
    reason = _unmatched(notice, attempt, account)
    if reason is not None:
        await queries.keep_unmatched(conn, notice, reason, facility_id)
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
    result = await settle(conn, settings, report, now, attempt=attempt)
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
