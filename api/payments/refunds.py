"""Giving money back: a refund is requested in the transaction that decides it (a paid visit
cancelled within policy, a slot lost after payment, an invoice paid twice), and sent to the
provider's refund API by the payment housekeeping loop. Only a refund the provider confirmed
enters the ledger. A VietQR transfer cannot be reversed by API: its refund is `manual`, for the
facility's cashier.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
import uuid

import asyncpg
import httpx

from api.db import FairPool
from api.errors import ApiError
from api.payments import providers, queries, vnpay
from api.payments.accounts import Account, account_for
from api.settings import Settings

log = logging.getLogger("telehealth.payments")


async def refund_invoice(
    conn: asyncpg.Connection, invoice_id: uuid.UUID, amount_vnd: int | None, reason: str
) -> uuid.UUID | None:
    """Request a refund of `amount_vnd` (None: all that is left) of the invoice's payment."""
    attempt = await queries.paid_attempt(conn, invoice_id)
    if attempt is None:
        return None
    paid, refunded = await queries.ledger_totals(conn, invoice_id)
    left = paid - refunded - await queries.refunds_in_flight(conn, invoice_id)
    amount = left if amount_vnd is None else amount_vnd
    if amount <= 0 or amount > left:
        raise ApiError("refund_too_large")
    return await queries.request_refund(
        conn, invoice_id, attempt["id"], amount, reason, manual=attempt["provider"] == "vietqr"
    )


async def send_requested(pool: FairPool, settings: Settings, http: httpx.AsyncClient) -> int:
    """Send requested refunds to their providers; a confirmed one is written to the ledger."""
    async with pool.acquire() as conn, conn.transaction():
        due = await queries.claim_requested_refunds(conn, 20)
    for refund in due:
        try:
            async with pool.acquire() as conn:
                account = await account_for(conn, settings, refund["facility_id"], refund["provider"])
            reference = await _send(http, account, refund)
        except RefundProcessing as processing:
            if processing.args:
                async with pool.acquire() as conn:
                    await queries.note_refund_reference(conn, refund["id"], processing.args[0])
            continue
        except (ApiError, httpx.HTTPError):
            log.warning("refund %s not sent yet; will try again", refund["id"])
            continue
        async with pool.acquire() as conn, conn.transaction():
            await record_refund_done(conn, refund["id"], reference, "requested")
    return len(due)


async def record_refund_done(
    conn: asyncpg.Connection, refund_id: uuid.UUID, reference: str, from_status: str
) -> bool:
    """The money went back: the refund is done and enters the ledger, once even if two
    housekeeping passes (or two cashiers) finish it at the same moment."""
    done = await queries.finish_refund(conn, refund_id, reference, from_status)
    if done is None:
        return False
    await queries.add_ledger_entry(
        conn,
        done["invoice_id"],
        done["attempt_id"],
        "refund",
        done["amount_vnd"],
        done["provider"],
        reference,
    )
    return True


async def _send(http: httpx.AsyncClient, account: Account, refund: asyncpg.Record) -> str:
    provider = refund["provider"]
    if provider == "momo":
        request_id = uuid.uuid4().hex
        fields = {
            "amount": int(refund["amount_vnd"]),
            "description": "Hoan tien",
            "orderId": f"RF{refund['id'].hex[:30]}",
            "partnerCode": account.config["partner_code"],
            "requestId": request_id,
            "transId": int(refund["provider_transaction_id"]),
        }
        signed = "&".join(
            f"{k}={v}" for k, v in {"accessKey": account.config["access_key"], **fields}.items()
        )
        body = {**fields, "lang": "vi", "signature": _hmac256(account.secret("secret_key"), signed)}
        answer = await providers.post_json(
            http, f"{account.config['endpoint'].rstrip('/')}/v2/gateway/api/refund", body
        )
        if answer.get("resultCode") != 0:
            raise ApiError("payment_provider_unavailable")
        return str(answer.get("transId") or request_id)
    if provider == "zalopay":
        return await _zalopay_refund(http, account, refund)
    if provider == "vnpay":
        return await providers.vnpay_refund(http, account, refund)
    raise ApiError("payment_method_unavailable")


class RefundProcessing(Exception):
    """The provider took the refund but has not finished it: ask again on a later pass."""


async def _zalopay_refund(http: httpx.AsyncClient, account: Account, refund: asyncpg.Record) -> str:
    """ZaloPay may answer "processing" (3): the refund keeps its m_refund_id and is asked about
    with query_refund until it is done (1); only then does it enter the ledger."""
    app_id = str(account.config["app_id"])
    base = account.config["endpoint"].rstrip("/")
    m_refund_id = refund["provider_refund_id"]
    if m_refund_id:
        timestamp = str(int(time.time() * 1000))
        state = await providers.post_form(
            http,
            f"{base}/v2/query_refund",
            {
                "app_id": app_id,
                "m_refund_id": m_refund_id,
                "timestamp": timestamp,
                "mac": _hmac256(account.secret("key1"), f"{app_id}|{m_refund_id}|{timestamp}"),
            },
        )
        if state.get("return_code") == 1:
            return str(m_refund_id)
        if state.get("return_code") == 3:
            raise RefundProcessing
    m_refund_id = f"{dt.datetime.now(vnpay.GMT7):%y%m%d}_{app_id}_{refund['id'].hex[:15]}"
    timestamp = str(int(time.time() * 1000))
    description = "Hoan tien"
    form = {
        "app_id": app_id,
        "m_refund_id": m_refund_id,
        "zp_trans_id": str(refund["provider_transaction_id"]),
        "amount": str(refund["amount_vnd"]),
        "timestamp": timestamp,
        "description": description,
        "mac": _hmac256(
            account.secret("key1"),
            f"{app_id}|{refund['provider_transaction_id']}|{refund['amount_vnd']}|{description}|{timestamp}",
        ),
    }
    answer = await providers.post_form(http, f"{base}/v2/refund", form)
    if answer.get("return_code") == 1:
        return m_refund_id
    if answer.get("return_code") == 3:
        raise RefundProcessing(m_refund_id)
    raise ApiError("payment_provider_unavailable")


def _hmac256(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()
