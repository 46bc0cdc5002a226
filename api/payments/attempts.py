"""Starting a payment: one attempt per tap on "pay", each with what the app needs to pay.

An invoice may collect several attempts (the patient tries MoMo, gives up, scans a VietQR);
the partial unique index on `payment_attempts` lets only one of them ever be `paid`. The
amount is always the invoice's, which came from the service price: never from the client.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import httpx

from api.booking import queries as booking_queries
from api.errors import ApiError
from api.payments import momo, providers, queries, vietqr, vnpay, zalopay
from api.payments.accounts import account_for
from api.payments.models import PaymentCreate, PaymentOut
from api.settings import Settings


def payment_out(row: asyncpg.Record) -> PaymentOut:
    return PaymentOut(
        id=row["id"],
        invoice_id=row["invoice_id"],
        method=row["provider"],
        status=row["status"],
        amount_vnd=row["amount_vnd"],
        expires_at=row["expires_at"],
        redirect_url=row["redirect_url"],
        deeplink=row["deeplink"],
        qr_payload=row["qr_payload"],
    )


def order_ref(method: str, attempt_id: uuid.UUID, now: dt.datetime) -> str:
    """How the provider will know this attempt: unique per provider (and per day for VNPay)."""
    if method == "zalopay":
        return zalopay.app_trans_id(now, attempt_id.hex[:20])
    if method == "vietqr":
        return vietqr.memo_for(attempt_id)
    return attempt_id.hex


async def start(
    conn: asyncpg.Connection,
    settings: Settings,
    http: httpx.AsyncClient,
    invoice: asyncpg.Record,
    data: PaymentCreate,
    client_ip: str,
    now: dt.datetime,
) -> PaymentOut:
    locked = await queries.lock_invoice(conn, invoice["id"])
    assert locked is not None
    if locked["status"] != "pending" or locked["amount_vnd"] <= 0:
        raise ApiError("invoice_not_payable")
    expires_at = now + dt.timedelta(minutes=settings.payment_minutes)
    if locked["appointment_id"] is not None:
        appointment = await booking_queries.get_appointment(conn, locked["appointment_id"])
        assert appointment is not None
        if appointment["status"] == "held":
            if appointment["hold_expires_at"] <= now:
                raise ApiError("hold_expired")
            expires_at = min(expires_at, appointment["hold_expires_at"])
    if data.method == "momo" and not momo.MIN_AMOUNT <= locked["amount_vnd"] <= momo.MAX_AMOUNT:
        raise ApiError("payment_method_unavailable")  # MoMo takes 1,000 to 50,000,000 VND
    account = await account_for(conn, settings, locked["facility_id"], data.method)
    attempt_id = uuid.uuid4()
    ref = order_ref(data.method, attempt_id, now)
    row = await queries.insert_attempt(
        conn,
        {
            "id": attempt_id,
            "invoice_id": locked["id"],
            "provider": data.method,
            "order_ref": ref,
            "amount_vnd": locked["amount_vnd"],
            "expires_at": expires_at,
        },
    )
    amount = int(locked["amount_vnd"])
    base = settings.public_base_url.rstrip("/")
    return_url = data.return_url or f"{base}/v1/payments/return"
    description = f"Thanh toan hoa don {str(locked['id'])[:8]}"
    redirect_url = deeplink = qr_payload = None
    if data.method == "vnpay":
        params = vnpay.build_pay_params(
            tmn_code=account.config["tmn_code"],
            amount_vnd=amount,
            txn_ref=ref,
            order_info=description,
            return_url=return_url,
            ip_addr=client_ip,
            created_at=row["created_at"],  # querydr and refund name the payment by this date
            expires_at=expires_at,
            locale="vn",
        )
        redirect_url = vnpay.pay_url(account.config["pay_url"], params, account.secret("hash_secret"))
    elif data.method == "momo":
        redirect_url, deeplink = await providers.momo_create(
            http,
            account,
            order_id=ref,
            amount=amount,
            order_info=description,
            redirect_url=return_url,
            ipn_url=f"{base}/v1/payments/callbacks/momo",
        )
    elif data.method == "zalopay":
        redirect_url = await providers.zalopay_create(
            http,
            account,
            app_trans_id=ref,
            amount=amount,
            description=description,
            callback_url=f"{base}/v1/payments/callbacks/zalopay",
            redirect_url=return_url,
        )
    else:
        qr_payload = vietqr.build_payload(
            bank_bin=account.config["bank_bin"],
            account=account.config["account"],
            amount_vnd=amount,
            memo=ref,
            dynamic=True,
        )
    return payment_out(await queries.set_attempt_links(conn, row["id"], redirect_url, deeplink, qr_payload))
