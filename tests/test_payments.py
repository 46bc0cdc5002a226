"""Payments end to end: starting each method against local provider sandboxes, every provider's
callbacks (valid, tampered, wrong amount, unknown order, duplicate, late failure, pending),
bank-transfer notices, 50 identical callbacks at once, a hold expiring while its payment
arrives, reconciliation of missed callbacks, refunds, and the ledger/invoice invariant.

The providers are played by tests/payment_providers.py (MoMo, ZaloPay and VNPay on loopback,
each checking our requests the way the provider does). The app runs with settings pointing at
them; callbacks are delivered to it as the provider would (same body, same query string).
Every test books its own doctor and service and its own patient, so the shared session database
never makes one test see another's rows. What is asserted is what a patient or the provider
would notice: status codes, the provider's answers, and rows in the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.booking.housekeeping import expire_and_offer
from api.errors import ApiError
from api.payments import ledger, reconcile, refunds, vietqr, vnpay
from api.settings import Settings, secrets_of
from notifications.templates import check_params, render
from tests.conftest import make_settings
from tests.factories import (
    OwnClinic,
    Session,
    clinic_at,
    clinic_today,
    insert_device,
    insert_user,
    own_clinic,
    pushing_in_process,
    serve,
    sessions_for_many,
)
from tests.payment_providers import BankNotifier, MomoSandbox, VnpaySandbox, ZaloPaySandbox

HOME = "PK-BINHAN"
PUBLIC = "https://api.telehealth.test"
PRICE = 150_000
BANK_NEW, BANK_OLD = "bank-secret-2026", "bank-secret-2025"
# Rotation: the app has moved to a new secret; the provider still signs with the old one.
NEXT_VNPAY, NEXT_MOMO, NEXT_ZALO_KEY2 = "vnpay-next-secret", "momo-next-secret", "zalopay-next-key2"

VNPAY_IPN = "/v1/payments/callbacks/vnpay"
MOMO_IPN = "/v1/payments/callbacks/momo"
ZALO_CALLBACK = "/v1/payments/callbacks/zalopay"
BANK_NOTICE = "/v1/payments/callbacks/bank-transfer"
PROVIDERS = ("vnpay", "momo", "zalopay", "vietqr")
TOUCHED: list[uuid.UUID] = []  # every invoice this module made, for the final ledger check


# --- the providers, the settings, the app ------------------------------------------------------


@pytest.fixture(scope="module")
def momo_box() -> Iterator[MomoSandbox]:
    with MomoSandbox() as box:
        yield box


@pytest.fixture(scope="module")
def zalo_box() -> Iterator[ZaloPaySandbox]:
    with ZaloPaySandbox() as box:
        yield box


@pytest.fixture(scope="module")
def vnpay_box() -> Iterator[VnpaySandbox]:
    with VnpaySandbox() as box:
        yield box


@pytest.fixture(scope="module")
def bank() -> BankNotifier:
    return BankNotifier(BANK_NEW)


def sandbox_overrides(
    momo_box: MomoSandbox, zalo_box: ZaloPaySandbox, vnpay_box: VnpaySandbox
) -> dict[str, Any]:
    return {
        "momo_endpoint": momo_box.url,
        "zalopay_endpoint": zalo_box.url,
        "vnpay_pay_url": vnpay_box.pay_base_url,
        "vnpay_api_url": vnpay_box.api_url,
        "public_base_url": PUBLIC,
        "bank_webhook_secret": f"{BANK_NEW},{BANK_OLD}",
    }


@pytest.fixture(scope="module")
def pay_settings(database_url, redis_url, issuer, momo_box, zalo_box, vnpay_box) -> Settings:
    return make_settings(database_url, redis_url, issuer, **sandbox_overrides(momo_box, zalo_box, vnpay_box))


@pytest.fixture(scope="module")
def rotated_settings(database_url, redis_url, issuer, momo_box, zalo_box, vnpay_box) -> Settings:
    """The same deployment after rotating every secret to "new,old": the sandboxes still sign
    with the old ones (the providers' defaults)."""
    return make_settings(
        database_url,
        redis_url,
        issuer,
        **sandbox_overrides(momo_box, zalo_box, vnpay_box),
        vnpay_hash_secret=f"{NEXT_VNPAY},{vnpay_box.hash_secret}",
        momo_secret_key=f"{NEXT_MOMO},{momo_box.secret_key}",
        zalopay_key2=f"{NEXT_ZALO_KEY2},{zalo_box.key2}",
    )


@pytest.fixture(scope="module")
async def http(pay_settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The app on the sandboxes (one request at a time; `serve` where requests must overlap)."""
    async with AsyncTestClient(app=create_app(pay_settings)) as client:
        yield client


@pytest.fixture(scope="module")
async def rotated_http(rotated_settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(rotated_settings)) as client:
        yield client


@pytest.fixture
async def outbound() -> AsyncIterator[httpx.AsyncClient]:
    """What the payment housekeeping loop calls the providers with."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


# --- a held, prepaid appointment and its invoice -----------------------------------------------


def day(offset: int) -> dt.date:
    return clinic_today() + dt.timedelta(days=offset)


@dataclass
class Held:
    clinic: OwnClinic
    patient: Session
    appointment_id: uuid.UUID
    invoice_id: uuid.UUID
    start: dt.datetime


async def new_patient(db: Any, settings: Settings) -> Session:
    return (await sessions_for_many(db, settings, 1))[0]


async def book(http: Any, patient: Session, clinic: OwnClinic, start: dt.datetime) -> httpx.Response:
    return await http.post(
        "/v1/appointments",
        json=clinic.booking(start),
        headers={**patient.headers, "Idempotency-Key": str(uuid.uuid4())},
    )


async def hold(
    http: Any,
    db: Any,
    settings: Settings,
    *,
    price: int = PRICE,
    clinic: OwnClinic | None = None,
    patient: Session | None = None,
    start: dt.datetime | None = None,
) -> Held:
    """A patient's held appointment for a prepaid service, with its pending invoice."""
    clinic = clinic or await own_clinic(db, HOME, prepaid=True, price=price)
    patient = patient or await new_patient(db, settings)
    start = start or clinic_at(day(3), "08:00")
    response = await book(http, patient, clinic, start)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "held" and body["invoice_id"], body
    TOUCHED.append(uuid.UUID(body["invoice_id"]))
    return Held(clinic, patient, uuid.UUID(body["id"]), uuid.UUID(body["invoice_id"]), start)


async def start_payment(
    http: Any,
    held: Held,
    method: str,
    *,
    key: str | None = None,
    session: Session | None = None,
    **extra: Any,
) -> httpx.Response:
    return await http.post(
        f"/v1/invoices/{held.invoice_id}/payments",
        json={"method": method, **extra},
        headers={**(session or held.patient).headers, "Idempotency-Key": key or str(uuid.uuid4())},
    )


async def started(http: Any, held: Held, method: str, **extra: Any) -> dict[str, Any]:
    response = await start_payment(http, held, method, **extra)
    assert response.status_code == 201, response.text
    return response.json()


async def order_ref(db: Any, payment: dict[str, Any]) -> str:
    ref: str = await db.fetchval(
        "SELECT order_ref FROM payment_attempts WHERE id = $1", uuid.UUID(payment["id"])
    )
    return ref


def problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


# --- what the patient and the ledger would see --------------------------------------------------


@dataclass
class Snapshot:
    invoice: str
    attempts: list[str]
    payments: list[int]
    refunds_in_ledger: list[int]
    appointments: list[tuple[str, int | None]]  # (status, queue number) of the patient's at that start
    receipts: int
    refund_rows: list[tuple[str, int]]


async def snapshot(db: Any, held: Held) -> Snapshot:
    invoice = await db.fetchval("SELECT status FROM invoices WHERE id = $1", held.invoice_id)
    attempts = await db.fetch(
        "SELECT status FROM payment_attempts WHERE invoice_id = $1 ORDER BY created_at", held.invoice_id
    )
    entries = await db.fetch(
        "SELECT kind, amount_vnd FROM ledger_entries WHERE invoice_id = $1 ORDER BY id", held.invoice_id
    )
    appointments = await db.fetch(
        """SELECT status, queue_number FROM appointments
            WHERE patient_id = $1 AND starts_at = $2 ORDER BY created_at""",
        uuid.UUID(held.patient.user["id"]),
        held.start,
    )
    receipts = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE kind = 'payment_received' AND subject = $1",
        f"invoice:{held.invoice_id}",
    )
    refund_rows = await db.fetch(
        "SELECT status, amount_vnd FROM refunds WHERE invoice_id = $1 ORDER BY created_at", held.invoice_id
    )
    return Snapshot(
        invoice,
        [r["status"] for r in attempts],
        [r["amount_vnd"] for r in entries if r["kind"] == "payment"],
        [r["amount_vnd"] for r in entries if r["kind"] == "refund"],
        [(r["status"], r["queue_number"]) for r in appointments],
        receipts,
        [(r["status"], r["amount_vnd"]) for r in refund_rows],
    )


async def assert_paid(db: Any, held: Held, amount: int = PRICE) -> Snapshot:
    """Paid once: invoice and attempt paid, one ledger payment, booked with a number, one receipt."""
    snap = await snapshot(db, held)
    assert snap.invoice == "paid", snap
    assert snap.attempts.count("paid") == 1, snap
    assert snap.payments == [amount], snap
    assert snap.refunds_in_ledger == [], snap
    assert len(snap.appointments) == 1 and snap.appointments[0][0] == "booked", snap
    assert snap.appointments[0][1] is not None and snap.appointments[0][1] >= 1, snap
    assert snap.receipts == 1, snap
    await assert_ledger_consistent(db, [held.invoice_id])
    return snap


async def assert_untouched(db: Any, held: Held) -> Snapshot:
    """Nothing happened: invoice and attempts pending, no money, still held, no receipt."""
    snap = await snapshot(db, held)
    assert snap.invoice == "pending", snap
    assert set(snap.attempts) <= {"pending"}, snap
    assert snap.payments == [] and snap.refunds_in_ledger == [], snap
    assert snap.appointments == [("held", None)], snap
    assert snap.receipts == 0, snap
    return snap


async def assert_ledger_consistent(db: Any, invoice_ids: list[uuid.UUID]) -> None:
    """The stored invoice state is the one the ledger implies (api.payments.ledger.invoice_status)."""
    rows = await db.fetch(
        """SELECT i.id, i.status, i.amount_vnd,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'payment'), 0) AS paid,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'refund'), 0) AS refunded
             FROM invoices i LEFT JOIN ledger_entries l ON l.invoice_id = i.id
            WHERE i.id = ANY($1::uuid[]) GROUP BY i.id""",
        invoice_ids,
    )
    assert len(rows) == len(set(invoice_ids))
    for row in rows:
        implied = ledger.invoice_status(
            int(row["amount_vnd"]), int(row["paid"]), int(row["refunded"]), voided=row["status"] == "void"
        )
        assert row["status"] == implied, dict(row)
        assert row["refunded"] <= row["paid"], dict(row)


async def callbacks_about(db: Any, provider: str, path: str, value: str) -> list[Any]:
    """Stored callbacks whose payload (a JSON path like '{vnp_TxnRef}') is `value`."""
    return await db.fetch(
        f"""SELECT signature_valid, outcome, source, attempt_id, payload FROM payment_callbacks
             WHERE provider = $1 AND payload #>> '{path}' = $2 ORDER BY received_at""",
        provider,
        value,
    )


# --- delivering callbacks as the providers do ---------------------------------------------------


async def vnpay_ipn(http: Any, params: dict[str, str]) -> httpx.Response:
    return await http.get(f"{VNPAY_IPN}?{urlencode(params)}")


async def momo_ipn(http: Any, body: dict[str, Any]) -> httpx.Response:
    return await http.post(
        MOMO_IPN, content=msgspec.json.encode(body), headers={"Content-Type": "application/json"}
    )


async def zalo_callback(http: Any, body: dict[str, Any]) -> httpx.Response:
    return await http.post(
        ZALO_CALLBACK, content=msgspec.json.encode(body), headers={"Content-Type": "application/json"}
    )


async def bank_notice(http: Any, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await http.post(BANK_NOTICE, content=body, headers=headers)


def notice(
    bank: BankNotifier, memo: str, amount: int = PRICE, *, reference: str | None = None, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    return bank.notice(
        reference or f"FT{uuid.uuid4().hex[:14].upper()}",
        "0011000000000",
        amount,
        memo,
        dt.datetime.now(dt.timezone(dt.timedelta(hours=7))),
        **extra,
    )


def flip_one_char(text: str, index: int) -> str:
    ch = text[index]
    return text[:index] + ("1" if ch != "1" else "2") + text[index + 1 :]


async def paid_through(
    method: str,
    http: Any,
    db: Any,
    held: Held,
    *,
    momo_box: MomoSandbox,
    zalo_box: ZaloPaySandbox,
    vnpay_box: VnpaySandbox,
    bank: BankNotifier,
) -> dict[str, Any]:
    """Start a payment with `method` and deliver the provider's successful callback."""
    payment = await started(http, held, method)
    ref = await order_ref(db, payment)
    if method == "vnpay":
        response = await vnpay_ipn(http, vnpay_box.ipn_params(payment["redirect_url"]))
        assert response.json()["RspCode"] == "00", response.text
    elif method == "momo":
        response = await momo_ipn(http, momo_box.pay(ref))
        assert response.status_code == 204, response.text
    elif method == "zalopay":
        response = await zalo_callback(http, zalo_box.pay(ref))
        assert response.json()["return_code"] == 1, response.text
    else:
        response = await bank_notice(http, *notice(bank, ref))
        assert response.status_code == 200 and response.json()["status"] == "applied", response.text
    return payment


# === Starting a payment =========================================================================


async def test_vnpay_start_gives_a_pay_url_the_gateway_accepts(http, db, pay_settings, vnpay_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    assert payment["method"] == "vnpay" and payment["status"] == "pending"
    assert payment["amount_vnd"] == PRICE
    url = payment["redirect_url"]
    assert url.startswith(vnpay_box.pay_base_url + "?")
    order = vnpay_box.visit(url)  # signature, merchant, amount format, dates: as VNPay checks them
    assert order.amount == PRICE
    assert order.txn_ref == await order_ref(db, payment)
    assert order.return_url == f"{PUBLIC}/v1/payments/return"
    # The real gateway page accepts it over HTTP as well.
    async with httpx.AsyncClient() as browser:
        page = await browser.get(url)
    assert page.status_code == 200, page.text
    params = dict(parse_qsl(urlsplit(url).query))
    assert "vnp_SecureHashType" not in params
    assert dt.datetime.strptime(params["vnp_ExpireDate"], "%Y%m%d%H%M%S") > dt.datetime.strptime(
        params["vnp_CreateDate"], "%Y%m%d%H%M%S"
    )


async def test_momo_start_creates_the_order_at_momo_with_a_valid_signature(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "momo", return_url="telehealth://paid")
    ref = await order_ref(db, payment)
    calls = [e for e in momo_box.received("/v2/gateway/api/create") if (e.body or {}).get("orderId") == ref]
    assert len(calls) == 1
    call = calls[0]
    assert call.status == 200 and call.answer["resultCode"] == 0, call.answer  # 13 would be a bad signature
    assert call.body["amount"] == PRICE
    assert call.body["ipnUrl"] == f"{PUBLIC}/v1/payments/callbacks/momo"
    assert call.body["redirectUrl"] == "telehealth://paid"
    assert "accessKey" not in call.body
    assert payment["redirect_url"] == call.answer["payUrl"]
    assert payment["deeplink"] == call.answer["deeplink"]
    assert momo_box.orders[ref].amount == PRICE


async def test_zalopay_start_creates_the_order_at_zalopay_with_a_valid_mac(http, db, pay_settings, zalo_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "zalopay")
    ref = await order_ref(db, payment)
    today = dt.datetime.now(dt.timezone(dt.timedelta(hours=7))).strftime("%y%m%d")
    assert ref.startswith(f"{today}_")
    calls = [e for e in zalo_box.received("/v2/create") if (e.body or {}).get("app_trans_id") == ref]
    assert len(calls) == 1
    call = calls[0]
    assert call.answer["return_code"] == 1, call.answer  # -402 would be a bad mac
    assert call.body["amount"] == str(PRICE)
    assert call.body["callback_url"] == f"{PUBLIC}/v1/payments/callbacks/zalopay"
    assert json.loads(call.body["embed_data"])["redirecturl"] == f"{PUBLIC}/v1/payments/return"
    assert payment["redirect_url"] == call.answer["order_url"]
    assert zalo_box.orders[ref].amount == PRICE


async def test_vietqr_start_gives_a_qr_with_amount_bank_and_memo(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vietqr")
    qr = vietqr.parse(payment["qr_payload"])
    assert qr["dynamic"] is True
    assert qr["amount_vnd"] == PRICE
    assert (qr["bank_bin"], qr["account"]) == (pay_settings.vietqr_bank_bin, pay_settings.vietqr_account)
    assert qr["memo"] == await order_ref(db, payment)
    assert qr["memo"] and qr["memo"].isascii() and qr["memo"].isalnum() and len(qr["memo"]) <= 25
    assert payment["redirect_url"] is None and payment["deeplink"] is None


async def test_the_amount_is_always_the_invoices(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings, price=230_000)
    # The client cannot name an amount at all...
    problem(await start_payment(http, held, "momo", amount_vnd=1_000), 422, "validation_failed")
    # ... and what reaches the provider and the attempt is the invoice's.
    payment = await started(http, held, "momo")
    assert payment["amount_vnd"] == 230_000
    assert momo_box.orders[await order_ref(db, payment)].amount == 230_000
    assert (
        await db.fetchval("SELECT amount_vnd FROM payment_attempts WHERE id = $1", uuid.UUID(payment["id"]))
        == 230_000
    )


async def test_an_idempotency_key_is_required_and_replays_the_same_attempt(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    response = await http.post(
        f"/v1/invoices/{held.invoice_id}/payments", json={"method": "vietqr"}, headers=held.patient.headers
    )
    assert response.status_code in (400, 422), response.text
    assert response.json()["code"] == "idempotency_key_required"
    key = str(uuid.uuid4())
    first = await start_payment(http, held, "vietqr", key=key)
    again = await start_payment(http, held, "vietqr", key=key)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 1
    )


async def test_a_paid_or_void_invoice_is_not_payable(
    http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "vietqr", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    for method in PROVIDERS:
        problem(await start_payment(http, held, method), 409, "invoice_not_payable")
    cancelled = await hold(http, db, pay_settings)
    response = await http.post(
        f"/v1/appointments/{cancelled.appointment_id}/cancel", headers=cancelled.patient.headers
    )
    assert response.status_code == 200, response.text
    problem(await start_payment(http, cancelled, "vnpay"), 409, "invoice_not_payable")
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", cancelled.invoice_id)
        == 0
    )


async def test_an_expired_hold_is_not_payable(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    await db.execute(
        "UPDATE appointments SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        held.appointment_id,
    )
    problem(await start_payment(http, held, "vietqr"), 409, "hold_expired")
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 0
    )


async def test_someone_elses_invoice_is_not_found(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    stranger = await new_patient(db, pay_settings)
    for method in PROVIDERS:
        problem(await start_payment(http, held, method, session=stranger), 404, "not_found")
    problem(await http.get(f"/v1/invoices/{held.invoice_id}", headers=stranger.headers), 404, "not_found")
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 0
    )


@pytest.mark.parametrize("method", ["momo", "zalopay"])
@pytest.mark.parametrize("status", [503, 500])
async def test_provider_down_answers_503_and_leaves_no_attempt(
    http, db, pay_settings, momo_box, zalo_box, method, status
):
    box = momo_box if method == "momo" else zalo_box
    held = await hold(http, db, pay_settings)
    box.outage(status)
    try:
        response = await start_payment(http, held, method)
    finally:
        box.outage(None)
    problem(response, 503, "payment_provider_unavailable")
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 0
    )
    # Once the provider is back, paying works.
    assert (await start_payment(http, held, method)).status_code == 201


async def test_a_provider_refusing_the_order_answers_503(rotated_http, db, pay_settings, momo_box):
    """Signed with a key MoMo does not know (13, "merchant authentication failed"): try again later."""
    held = await hold(rotated_http, db, pay_settings)
    response = await start_payment(rotated_http, held, "momo")  # this deployment signs with the next key
    problem(response, 503, "payment_provider_unavailable")
    assert momo_box.requests[-1].answer["resultCode"] == 13
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 0
    )


async def test_an_amount_momo_cannot_take_is_refused_cleanly(http, db, pay_settings):
    held = await hold(http, db, pay_settings, price=500)
    response = await start_payment(http, held, "momo")
    assert response.status_code < 500, response.text
    assert response.status_code in (409, 422), response.text
    assert (
        await db.fetchval("SELECT count(*) FROM payment_attempts WHERE invoice_id = $1", held.invoice_id) == 0
    )


# === VNPay IPN ===================================================================================


async def test_vnpay_ipn_pays_once_and_books(http, db, pay_settings, vnpay_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    assert (await snapshot(db, held)).appointments == [("held", None)]
    params = vnpay_box.ipn_params(payment["redirect_url"])
    response = await vnpay_ipn(http, params)
    assert response.status_code == 200
    assert response.json() == {"RspCode": "00", "Message": "Confirm Success"}
    await assert_paid(db, held)
    entry = await db.fetchrow("SELECT * FROM ledger_entries WHERE invoice_id = $1", held.invoice_id)
    assert (entry["provider"], entry["reference"]) == ("vnpay", params["vnp_TransactionNo"])
    stored = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", params["vnp_TxnRef"])
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(True, "paid")]
    assert json.loads(stored[0]["payload"])["vnp_SecureHash"] != params["vnp_SecureHash"]  # redacted
    # The same IPN again: "already confirmed", nothing more.
    again = await vnpay_ipn(http, params)
    assert again.json()["RspCode"] == "02"
    await assert_paid(db, held)
    # The patient sees it.
    invoice = (await http.get(f"/v1/invoices/{held.invoice_id}", headers=held.patient.headers)).json()
    assert (invoice["status"], invoice["paid_vnd"], invoice["refunded_vnd"]) == ("paid", PRICE, 0)
    assert [p["status"] for p in invoice["payments"]] == ["paid"]


async def test_a_payment_wakes_the_notification_worker_once_committed(
    db, pay_settings, vnpay_box, fcm_clean, tmp_path
):
    """A callback's transaction enqueues its messages without a NOTIFY (PostgreSQL serialises the
    commits of transactions that NOTIFY); the API wakes the workers once it has committed."""
    settings = pushing_in_process(pay_settings, fcm_clean, tmp_path)
    async with serve(settings) as app:
        held = await hold(app, db, settings)
        token = await insert_device(db, uuid.UUID(held.patient.user["id"]))
        payment = await started(app, held, "vnpay")
        await asyncio.sleep(0.5)  # the worker's first pass is done; now it waits
        response = await vnpay_ipn(app, vnpay_box.ipn_params(payment["redirect_url"]))
        assert response.json()["RspCode"] == "00", response.text
        wanted = {
            str(r["id"])
            for r in await db.fetch(
                """SELECT id FROM notifications WHERE user_id = $1
                    AND kind IN ('payment_received', 'appointment_booked')""",
                uuid.UUID(held.patient.user["id"]),
            )
        }
        assert len(wanted) == 2
        await fcm_clean.wait_for(lambda e: wanted <= set(data_ids(e.sent_to(token))), timeout=10)


def data_ids(received: list[Any]) -> list[str]:
    return [r.message["data"]["notification_id"] for r in received]


@pytest.mark.parametrize(
    "tamper",
    ["hash_byte", "amount_unsigned", "response_code_unsigned", "no_hash", "tmn_code_signed"],
)
async def test_vnpay_ipn_with_a_bad_signature_or_merchant_changes_nothing(
    http, db, pay_settings, vnpay_box, tamper
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    url = payment["redirect_url"]
    if tamper == "hash_byte":
        params = vnpay_box.ipn_params(url)
        params["vnp_SecureHash"] = flip_one_char(params["vnp_SecureHash"], 17)
    elif tamper == "amount_unsigned":
        params = vnpay_box.ipn_params(url, sign=False, vnp_Amount=str(PRICE * 100 + 100))
    elif tamper == "response_code_unsigned":
        params = vnpay_box.ipn_params(url, response_code="24")
        params["vnp_ResponseCode"], params["vnp_TransactionStatus"] = "00", "00"
    elif tamper == "no_hash":
        params = vnpay_box.ipn_params(url)
        del params["vnp_SecureHash"]
    else:  # signed correctly, but for another merchant
        params = vnpay_box.ipn_params(url, vnp_TmnCode="OTHERTMN")
    response = await vnpay_ipn(http, params)
    assert response.status_code == 200
    assert response.json()["RspCode"] == "97", response.text
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", params["vnp_TxnRef"])
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(False, "invalid_signature")]
    # The genuine IPN still works afterwards.
    if tamper == "response_code_unsigned":  # what VNPay really said: declined
        assert (await vnpay_ipn(http, vnpay_box.ipn_params(url, response_code="24"))).json()[
            "RspCode"
        ] == "00"
        assert (await snapshot(db, held)).attempts == ["failed"]
    else:
        assert (await vnpay_ipn(http, vnpay_box.ipn_params(url))).json()["RspCode"] == "00"
        await assert_paid(db, held)


@pytest.mark.parametrize(
    "vnp_amount", [str((PRICE - 1_000) * 100), str((PRICE + 1) * 100), str(PRICE * 10 * 100)]
)
async def test_vnpay_ipn_with_the_wrong_amount_answers_04(http, db, pay_settings, vnpay_box, vnp_amount):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    params = vnpay_box.ipn_params(payment["redirect_url"], vnp_Amount=vnp_amount)  # signed: VNPay says so
    response = await vnpay_ipn(http, params)
    assert response.json()["RspCode"] == "04", response.text
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", params["vnp_TxnRef"])
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(True, "wrong_amount")]


async def test_vnpay_ipn_amount_is_compared_exactly(http, db, pay_settings, vnpay_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    params = vnpay_box.ipn_params(payment["redirect_url"], vnp_Amount=str(PRICE * 100 + 50))
    assert (await vnpay_ipn(http, params)).json()["RspCode"] == "04"
    await assert_untouched(db, held)


async def test_vnpay_ipn_for_an_unknown_order_answers_01(http, db, pay_settings, vnpay_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    unknown = uuid.uuid4().hex
    params = vnpay_box.ipn_params(payment["redirect_url"], vnp_TxnRef=unknown)
    assert (await vnpay_ipn(http, params)).json()["RspCode"] == "01"
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", unknown)
    assert [(c["signature_valid"], c["outcome"], c["attempt_id"]) for c in stored] == [
        (True, "unknown_order", None)
    ]


async def test_vnpay_ipn_failure_then_late_failure_after_paid(http, db, pay_settings, vnpay_box):
    # A failed payment is recorded (00) and the patient told; the appointment is still held.
    held = await hold(http, db, pay_settings)
    failed = await started(http, held, "vnpay")
    response = await vnpay_ipn(http, vnpay_box.ipn_params(failed["redirect_url"], response_code="24"))
    assert response.json()["RspCode"] == "00"
    snap = await snapshot(db, held)
    assert (snap.invoice, snap.attempts, snap.payments, snap.appointments) == (
        "pending",
        ["failed"],
        [],
        [("held", None)],
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM notifications WHERE kind = 'payment_failed' AND subject = $1",
            f"invoice:{held.invoice_id}",
        )
        == 1
    )
    # A second attempt pays; a late failure for it afterwards changes nothing.
    second = await started(http, held, "vnpay")
    assert (await vnpay_ipn(http, vnpay_box.ipn_params(second["redirect_url"]))).json()["RspCode"] == "00"
    late = vnpay_box.ipn_params(second["redirect_url"], response_code="99")
    assert (await vnpay_ipn(http, late)).json()["RspCode"] in ("00", "02")
    snap = await assert_paid(db, held)
    assert snap.attempts == ["failed", "paid"]
    stored = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", late["vnp_TxnRef"])
    assert [c["outcome"] for c in stored] == ["paid", "late_failure_ignored"]


async def test_the_browser_return_url_never_pays(http, db, pay_settings, vnpay_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    params = vnpay_box.ipn_params(payment["redirect_url"])  # what VNPay appends to the return URL
    response = await http.get(f"/v1/payments/return?{urlencode(params)}")
    assert response.status_code == 200
    assert response.json()["status"] == "received"
    await assert_untouched(db, held)
    assert await callbacks_about(db, "vnpay", "{vnp_TxnRef}", params["vnp_TxnRef"]) == []


# === MoMo IPN ====================================================================================


async def test_momo_ipn_pays_once_and_books(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "momo")
    ref = await order_ref(db, payment)
    body = momo_box.pay(ref)
    response = await momo_ipn(http, body)
    assert response.status_code == 204 and response.content == b""
    await assert_paid(db, held)
    assert await db.fetchval(
        "SELECT reference FROM ledger_entries WHERE invoice_id = $1", held.invoice_id
    ) == str(body["transId"])
    # MoMo retries until it gets 204: duplicates change nothing.
    for _ in range(2):
        assert (await momo_ipn(http, body)).status_code == 204
    await assert_paid(db, held)
    stored = await callbacks_about(db, "momo", "{orderId}", ref)
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [
        (True, "paid"),
        (True, "duplicate"),
        (True, "duplicate"),
    ]
    assert json.loads(stored[0]["payload"])["signature"] == "[redacted]"


async def test_momo_ipn_authorized_9000_also_pays(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    assert (await momo_ipn(http, momo_box.pay(ref, result_code=9000))).status_code == 204
    await assert_paid(db, held)


@pytest.mark.parametrize(
    "tamper", ["signature_byte", "amount_unsigned", "result_unsigned", "partner_signed", "no_signature"]
)
async def test_momo_ipn_with_a_bad_signature_or_partner_changes_nothing(
    http, db, pay_settings, momo_box, tamper
):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    if tamper == "result_unsigned":
        momo_box.pay(ref, result_code=1006)  # declined at MoMo ...
        body = momo_box.ipn_for(ref, sign=False, resultCode=0)  # ... and "0" written in transit
    else:
        body = momo_box.pay(ref)
        if tamper == "signature_byte":
            body["signature"] = flip_one_char(body["signature"], 5)
        elif tamper == "amount_unsigned":
            body = momo_box.ipn_for(ref, sign=False, amount=PRICE + 1_000)
        elif tamper == "partner_signed":
            body = momo_box.ipn_for(ref, partnerCode="MOMOOTHER")
        else:
            del body["signature"]
    response = await momo_ipn(http, body)
    assert response.status_code == 204  # MoMo is answered, nothing applied
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "momo", "{orderId}", ref)
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(False, "invalid_signature")]


@pytest.mark.parametrize("code", [1000, 7000, 7002, 8000])
async def test_momo_pending_codes_leave_the_payment_pending(http, db, pay_settings, momo_box, code):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    response = await momo_ipn(http, momo_box.ipn_for(ref, resultCode=code))
    assert response.status_code == 204
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "momo", "{orderId}", ref)
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(True, "pending")]
    # ... and the final answer still pays.
    assert (await momo_ipn(http, momo_box.pay(ref))).status_code == 204
    await assert_paid(db, held)


async def test_momo_failure_after_paid_stays_paid(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    assert (await momo_ipn(http, momo_box.pay(ref))).status_code == 204
    late = momo_box.ipn_for(ref, resultCode=1006)
    assert (await momo_ipn(http, late)).status_code == 204
    await assert_paid(db, held)
    assert [c["outcome"] for c in await callbacks_about(db, "momo", "{orderId}", ref)] == [
        "paid",
        "late_failure_ignored",
    ]


async def test_momo_ipn_wrong_amount_and_unknown_order_change_nothing(http, db, pay_settings, momo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    momo_box.pay(ref)
    assert (await momo_ipn(http, momo_box.ipn_for(ref, amount=PRICE - 1_000))).status_code == 204
    await assert_untouched(db, held)
    unknown = uuid.uuid4().hex
    assert (await momo_ipn(http, momo_box.ipn_for(ref, orderId=unknown))).status_code == 204
    await assert_untouched(db, held)
    assert [c["outcome"] for c in await callbacks_about(db, "momo", "{orderId}", ref)] == ["wrong_amount"]
    assert [c["outcome"] for c in await callbacks_about(db, "momo", "{orderId}", unknown)] == [
        "unknown_order"
    ]


async def test_momo_ipn_that_is_not_json_is_answered_and_changes_nothing(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    await started(http, held, "momo")
    response = await http.post(MOMO_IPN, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    await assert_untouched(db, held)


# === ZaloPay callback ============================================================================


async def test_zalopay_callback_pays_once_and_books(http, db, pay_settings, zalo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "zalopay"))
    body = zalo_box.pay(ref)
    response = await zalo_callback(http, body)
    assert response.status_code == 200
    assert response.json() == {"return_code": 1, "return_message": "success"}
    await assert_paid(db, held)
    zp_trans_id = str(json.loads(body["data"])["zp_trans_id"])
    assert (
        await db.fetchval("SELECT reference FROM ledger_entries WHERE invoice_id = $1", held.invoice_id)
        == zp_trans_id
    )
    again = await zalo_callback(http, body)
    assert again.json()["return_code"] == 1  # a duplicate is "processed" too
    await assert_paid(db, held)
    stored = await callbacks_about(db, "zalopay", "{data,app_trans_id}", ref)
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(True, "paid"), (True, "duplicate")]
    assert json.loads(stored[0]["payload"])["mac"] == "[redacted]"


@pytest.mark.parametrize("tamper", ["mac_byte", "data_byte", "amount_unsigned", "app_id_signed", "no_mac"])
async def test_zalopay_callback_with_a_bad_mac_or_app_changes_nothing(
    http, db, pay_settings, zalo_box, tamper
):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "zalopay"))
    body = zalo_box.pay(ref)
    if tamper == "mac_byte":
        body["mac"] = flip_one_char(body["mac"], 3)
    elif tamper == "data_byte":
        body["data"] = body["data"].replace('"channel":38', '"channel":39')
    elif tamper == "amount_unsigned":
        body = zalo_box.callback_for(ref, sign=False, amount=PRICE * 2)
    elif tamper == "app_id_signed":
        body = zalo_box.callback_for(ref, app_id=9999)
    else:
        del body["mac"]
    response = await zalo_callback(http, body)
    assert response.status_code == 200
    assert response.json()["return_code"] == -1, response.text
    await assert_untouched(db, held)
    stored = await callbacks_about(db, "zalopay", "{data,app_trans_id}", ref)
    assert [(c["signature_valid"], c["outcome"]) for c in stored] == [(False, "invalid_signature")]


async def test_zalopay_callback_with_the_wrong_amount_changes_nothing(http, db, pay_settings, zalo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "zalopay"))
    zalo_box.pay(ref)
    response = await zalo_callback(http, zalo_box.callback_for(ref, amount=PRICE - 1))
    assert response.status_code == 200 and response.json()["return_code"] != -1
    await assert_untouched(db, held)
    assert [c["outcome"] for c in await callbacks_about(db, "zalopay", "{data,app_trans_id}", ref)] == [
        "wrong_amount"
    ]


# === Secrets in rotation ("new,old") =============================================================


async def test_callbacks_signed_with_the_previous_secret_still_verify(
    http, rotated_http, db, pay_settings, momo_box, zalo_box, vnpay_box
):
    """The app now has "new,old" for every secret; the providers still sign with the old one."""
    vn = await hold(http, db, pay_settings)
    vn_pay = await started(http, vn, "vnpay")
    assert (await vnpay_ipn(rotated_http, vnpay_box.ipn_params(vn_pay["redirect_url"]))).json()[
        "RspCode"
    ] == "00"
    await assert_paid(db, vn)

    mo = await hold(http, db, pay_settings)
    mo_ref = await order_ref(db, await started(http, mo, "momo"))
    assert (await momo_ipn(rotated_http, momo_box.pay(mo_ref))).status_code == 204
    await assert_paid(db, mo)

    zp = await hold(http, db, pay_settings)
    zp_ref = await order_ref(db, await started(http, zp, "zalopay"))
    assert (await zalo_callback(rotated_http, zalo_box.pay(zp_ref))).json()["return_code"] == 1
    await assert_paid(db, zp)


async def test_with_secrets_in_rotation_a_wrong_secret_still_fails(
    rotated_http, http, db, pay_settings, vnpay_box
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    params = vnpay_box.ipn_params(payment["redirect_url"])
    from api.payments import vnpay as vnpay_module

    params["vnp_SecureHash"] = vnpay_module.sign(params, "neither-new-nor-old")
    assert (await vnpay_ipn(rotated_http, params)).json()["RspCode"] == "97"
    await assert_untouched(db, held)


async def test_a_bank_notice_signed_with_the_previous_secret_still_verifies(http, db, pay_settings):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    body, headers = notice(BankNotifier(BANK_OLD), memo)
    response = await bank_notice(http, body, headers)
    assert response.status_code == 200 and response.json()["status"] == "applied", response.text
    await assert_paid(db, held)


# === Bank-transfer notices (VietQR) ==============================================================


@pytest.mark.parametrize(
    "wrap",
    [
        "{memo}",
        "MBVCB.3278614766.{memo}.CT tu 0011004123456 NGUYEN VAN A",
        "{lower}",
        "IBFT {memo} thanh toan kham",
    ],
)
async def test_a_bank_transfer_is_matched_by_its_memo(http, db, pay_settings, bank, wrap):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    body, headers = notice(bank, wrap.format(memo=memo, lower=memo.lower()), bank_code="VCB")
    response = await bank_notice(http, body, headers)
    assert response.status_code == 200
    assert response.json() == {"status": "applied"}
    await assert_paid(db, held)
    # The bank retries the same notice: one payment.
    again = await bank_notice(http, body, headers)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    await assert_paid(db, held)


async def test_a_memo_after_other_th_words_is_still_matched(http, db, pay_settings, bank):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    response = await bank_notice(http, *notice(bank, f"THANHTOANHOADON {memo}"))
    assert response.json() == {"status": "applied"}, response.text
    await assert_paid(db, held)


async def test_a_transfer_with_the_wrong_amount_or_an_unknown_memo_is_kept_unmatched(
    http, db, pay_settings, bank
):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    short_ref = f"FT{uuid.uuid4().hex[:12].upper()}"
    body, headers = notice(bank, f"MBVCB.1.{memo}.CT", PRICE - 50_000, reference=short_ref)
    response = await bank_notice(http, body, headers)
    assert response.status_code == 200 and response.json() == {"status": "unmatched"}
    # Sent again by the bank: still one row for staff.
    assert (await bank_notice(http, body, headers)).json() == {"status": "unmatched"}
    unknown_ref = f"FT{uuid.uuid4().hex[:12].upper()}"
    body, headers = notice(bank, "CHUYEN TIEN KHAM BENH", reference=unknown_ref)
    assert (await bank_notice(http, body, headers)).json() == {"status": "unmatched"}
    rows = await db.fetch(
        "SELECT reference, amount_vnd, reason, facility_id FROM unmatched_transfers WHERE reference = ANY($1) ORDER BY reason",
        [short_ref, unknown_ref],
    )
    assert [(r["reference"], r["amount_vnd"], r["reason"]) for r in rows] == [
        (unknown_ref, PRICE, "unknown memo"),
        (short_ref, PRICE - 50_000, "wrong amount"),
    ]
    assert rows[1]["facility_id"] == held.clinic.facility_id and rows[0]["facility_id"] is None
    await assert_untouched(db, held)
    # The right amount afterwards pays.
    assert (await bank_notice(http, *notice(bank, memo))).json() == {"status": "applied"}
    await assert_paid(db, held)


async def test_a_bank_notice_with_a_bad_signature_is_refused_and_kept(http, db, pay_settings, bank):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    reference = f"FT{uuid.uuid4().hex[:12].upper()}"
    body, headers = notice(bank, memo, reference=reference)
    bad = {**headers, "X-Signature": flip_one_char(headers["X-Signature"], 0)}
    problem(await bank_notice(http, body, bad), 401, "invalid_signature")
    tampered = body.replace(str(PRICE).encode(), str(PRICE + 1).encode())
    problem(await bank_notice(http, tampered, headers), 401, "invalid_signature")
    no_header = {"Content-Type": "application/json"}
    problem(await bank_notice(http, body, no_header), 401, "invalid_signature")
    forged = BankNotifier("not-our-secret").notice(
        reference, "0011000000000", PRICE, memo, "2026-01-01T08:00:00+07:00"
    )
    problem(await bank_notice(http, *forged), 401, "invalid_signature")
    await assert_untouched(db, held)
    stored = await db.fetch(
        "SELECT signature_valid, outcome FROM payment_callbacks WHERE provider = 'vietqr' AND payload::text LIKE $1",
        f"%{reference}%",
    )
    assert len(stored) == 4 and {(s["signature_valid"], s["outcome"]) for s in stored} == {
        (False, "invalid_signature")
    }
    assert await db.fetchval("SELECT count(*) FROM unmatched_transfers WHERE reference = $1", reference) == 0


async def test_a_signed_notice_that_is_not_a_transfer_is_refused_and_kept(http, db, pay_settings, bank):
    reference = f"FT{uuid.uuid4().hex[:12].upper()}"
    body = json.dumps({"reference": reference, "amount": "a lot"}).encode()
    response = await bank_notice(
        http, body, {"Content-Type": "application/json", "X-Signature": bank.sign(body)}
    )
    assert 400 <= response.status_code < 500 and response.status_code != 401, response.text
    stored = await db.fetch(
        "SELECT signature_valid FROM payment_callbacks WHERE provider = 'vietqr' AND payload::text LIKE $1",
        f"%{reference}%",
    )
    assert [s["signature_valid"] for s in stored] == [False]


async def test_a_transfer_to_another_account_does_not_pay(http, db, pay_settings, bank):
    held = await hold(http, db, pay_settings)
    memo = await order_ref(db, await started(http, held, "vietqr"))
    reference = f"FT{uuid.uuid4().hex[:12].upper()}"
    body, headers = bank.notice(reference, "9704229999999", PRICE, memo, dt.datetime.now(dt.UTC))
    response = await bank_notice(http, body, headers)
    assert response.status_code == 200 and response.json() == {"status": "unmatched"}, response.text
    await assert_untouched(db, held)


async def test_a_late_transfer_for_an_expired_vietqr_attempt_still_settles(
    http, db, pay_settings, pool, outbound, bank
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vietqr")
    memo = await order_ref(db, payment)
    await make_due(db, payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))  # no query API: expires
    assert (await snapshot(db, held)).attempts == ["expired"]
    assert (await bank_notice(http, *notice(bank, memo))).json() == {"status": "applied"}
    await assert_paid(db, held)


# === Real concurrency: 50 identical callbacks ====================================================


@pytest.mark.parametrize("method", ["vnpay", "momo"])
async def test_50_identical_callbacks_at_once_apply_once(http, db, pay_settings, vnpay_box, momo_box, method):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, method)
    ref = await order_ref(db, payment)
    async with serve(pay_settings) as app:
        if method == "vnpay":
            params = vnpay_box.ipn_params(payment["redirect_url"])
            responses = await asyncio.gather(*(vnpay_ipn(app, params) for _ in range(50)))
            assert all(r.status_code == 200 for r in responses), [
                r.text for r in responses if r.status_code != 200
            ]
            codes = sorted(r.json()["RspCode"] for r in responses)
            assert codes == ["00"] + ["02"] * 49, codes
        else:
            body = momo_box.pay(ref)
            responses = await asyncio.gather(*(momo_ipn(app, body) for _ in range(50)))
            assert [r.status_code for r in responses] == [204] * 50, [
                r.text for r in responses if r.status_code != 204
            ]
    await assert_paid(db, held)
    path = "{vnp_TxnRef}" if method == "vnpay" else "{orderId}"
    outcomes = [c["outcome"] for c in await callbacks_about(db, method, path, ref)]
    assert outcomes.count("paid") == 1 and outcomes.count("duplicate") == 49, outcomes
    assert (
        await db.fetchval(
            "SELECT count(*) FROM notifications WHERE kind = 'appointment_booked' AND subject = $1",
            f"appointment:{held.appointment_id}",
        )
        == 1
    )


async def test_two_providers_paying_one_invoice_at_once_keep_one_payment(
    http, db, pay_settings, vnpay_box, momo_box
):
    """The patient pays with VNPay and MoMo at the same moment: one attempt is paid, the other given back."""
    held = await hold(http, db, pay_settings)
    vn = await started(http, held, "vnpay")
    mo = await started(http, held, "momo")
    params = vnpay_box.ipn_params(vn["redirect_url"])
    body = momo_box.pay(await order_ref(db, mo))
    async with serve(pay_settings) as app:
        vn_answer, mo_answer = await asyncio.gather(vnpay_ipn(app, params), momo_ipn(app, body))
    assert vn_answer.json()["RspCode"] == "00" and mo_answer.status_code == 204
    snap = await snapshot(db, held)
    assert sorted(snap.attempts) == ["paid", "refunded"], snap
    assert snap.payments == [PRICE, PRICE] and snap.refund_rows == [("requested", PRICE)], snap
    assert [s for s, _ in snap.appointments] == ["booked"] and snap.receipts == 1, snap
    await assert_ledger_consistent(db, [held.invoice_id])


# === Orders without an appointment ===============================================================
# An invoice nothing else hangs on (as bench/payments.py makes them) is settled by a single
# statement when the provider's default account is its account (api/payments/settle.py,
# `settle_at_once`); a facility with an account of its own goes the long way.

NO_APPOINTMENT = "TYT-CHANUA"  # a facility whose own payment account one test sets up


async def direct_order(db: Any, facility: str = HOME, price: int = PRICE) -> tuple[uuid.UUID, uuid.UUID, str]:
    """A patient's pending invoice with no appointment and one pending VNPay attempt, written
    straight into the database: (invoice, attempt, order ref)."""
    patient = await insert_user(db)
    invoice_id: uuid.UUID = await db.fetchval(
        """INSERT INTO invoices (patient_id, facility_id, service_id, amount_vnd)
           SELECT $1, f.id, (SELECT s.id FROM services s WHERE s.facility_id = f.id LIMIT 1), $3
             FROM facilities f WHERE f.code = $2 RETURNING id""",
        patient,
        facility,
        price,
    )
    attempt_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO payment_attempts (id, invoice_id, provider, order_ref, amount_vnd, expires_at)
           VALUES ($1, $2, 'vnpay', $3, $4, now() + interval '15 minutes')""",
        attempt_id,
        invoice_id,
        attempt_id.hex,
        price,
    )
    TOUCHED.append(invoice_id)
    return invoice_id, attempt_id, attempt_id.hex


def signed_ipn(
    secret: str,
    tmn_code: str,
    ref: str,
    *,
    amount: int = PRICE,
    transaction_no: str | None = None,
    response_code: str = "00",
) -> dict[str, str]:
    """The IPN VNPay sends for an order, signed with `secret`."""
    params = {
        "vnp_Amount": str(amount * 100),
        "vnp_BankCode": "NCB",
        "vnp_OrderInfo": "Thanh toan hoa don",
        "vnp_PayDate": "20260105093000",
        "vnp_ResponseCode": response_code,
        "vnp_TmnCode": tmn_code,
        "vnp_TransactionNo": transaction_no or str(uuid.uuid4().int % 10**8),
        "vnp_TransactionStatus": "00" if response_code == "00" else "02",
        "vnp_TxnRef": ref,
    }
    params["vnp_SecureHash"] = vnpay.sign(params, secret)
    return params


def default_ipn(settings: Settings, ref: str, **options: Any) -> dict[str, str]:
    return signed_ipn(secrets_of(settings.vnpay_hash_secret)[0], settings.vnpay_tmn_code, ref, **options)


async def direct_state(db: Any, invoice_id: uuid.UUID) -> tuple[str, list[str], list[int], int]:
    """(invoice status, attempt statuses, ledger payments, receipts)."""
    invoice = await db.fetchval("SELECT status FROM invoices WHERE id = $1", invoice_id)
    attempts = await db.fetch(
        "SELECT status FROM payment_attempts WHERE invoice_id = $1 ORDER BY created_at", invoice_id
    )
    payments = await db.fetch(
        "SELECT amount_vnd FROM ledger_entries WHERE invoice_id = $1 AND kind = 'payment'", invoice_id
    )
    receipts = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE kind = 'payment_received' AND subject = $1",
        f"invoice:{invoice_id}",
    )
    return invoice, [r["status"] for r in attempts], [r["amount_vnd"] for r in payments], receipts


async def test_an_order_without_an_appointment_is_paid_once(http, db, pay_settings):
    invoice_id, attempt_id, ref = await direct_order(db)
    params = default_ipn(pay_settings, ref)
    assert (await vnpay_ipn(http, params)).json() == {"RspCode": "00", "Message": "Confirm Success"}
    assert await direct_state(db, invoice_id) == ("paid", ["paid"], [PRICE], 1)
    entry = await db.fetchrow("SELECT * FROM ledger_entries WHERE invoice_id = $1", invoice_id)
    assert (entry["attempt_id"], entry["provider"], entry["reference"]) == (
        attempt_id,
        "vnpay",
        params["vnp_TransactionNo"],
    )
    attempt = await db.fetchrow("SELECT * FROM payment_attempts WHERE id = $1", attempt_id)
    assert attempt["provider_transaction_id"] == params["vnp_TransactionNo"]
    # The receipt: to the patient, with exactly the params its template takes.
    receipt = await db.fetchrow(
        "SELECT * FROM notifications WHERE kind = 'payment_received' AND subject = $1",
        f"invoice:{invoice_id}",
    )
    patient = await db.fetchval("SELECT patient_id FROM invoices WHERE id = $1", invoice_id)
    assert receipt["user_id"] == patient
    assert receipt["dedupe_key"] == f"payment:{attempt_id}:payment_received:{patient}"
    stored = json.loads(receipt["params"])
    assert stored == check_params("payment_received", {"invoice_id": invoice_id, "amount": PRICE})
    assert "150.000" in render("payment_received", stored, "vi", receipt["id"]).body
    # The same IPN again: "already confirmed", nothing more.
    assert (await vnpay_ipn(http, params)).json()["RspCode"] == "02"
    assert await direct_state(db, invoice_id) == ("paid", ["paid"], [PRICE], 1)
    stored_callbacks = await callbacks_about(db, "vnpay", "{vnp_TxnRef}", ref)
    assert [(c["signature_valid"], c["outcome"], c["attempt_id"]) for c in stored_callbacks] == [
        (True, "paid", attempt_id),
        (True, "duplicate", attempt_id),
    ]
    await assert_ledger_consistent(db, [invoice_id])


async def test_50_identical_callbacks_for_an_order_without_an_appointment_apply_once(db, pay_settings):
    invoice_id, _, ref = await direct_order(db)
    params = default_ipn(pay_settings, ref)
    async with serve(pay_settings) as app:
        responses = await asyncio.gather(*(vnpay_ipn(app, params) for _ in range(50)))
    assert sorted(r.json()["RspCode"] for r in responses) == ["00"] + ["02"] * 49
    assert await direct_state(db, invoice_id) == ("paid", ["paid"], [PRICE], 1)
    outcomes = [c["outcome"] for c in await callbacks_about(db, "vnpay", "{vnp_TxnRef}", ref)]
    assert outcomes.count("paid") == 1 and outcomes.count("duplicate") == 49, outcomes


async def test_an_order_without_an_appointment_refuses_what_it_should(http, db, pay_settings):
    invoice_id, attempt_id, ref = await direct_order(db)
    # A wrong amount, an unknown order and a bad signature change nothing, and are kept.
    assert (await vnpay_ipn(http, default_ipn(pay_settings, ref, amount=PRICE - 1))).json()["RspCode"] == "04"
    unknown = uuid.uuid4().hex
    assert (await vnpay_ipn(http, default_ipn(pay_settings, unknown))).json()["RspCode"] == "01"
    forged = signed_ipn("not-the-secret", pay_settings.vnpay_tmn_code, ref)
    assert (await vnpay_ipn(http, forged)).json()["RspCode"] == "97"
    assert await direct_state(db, invoice_id) == ("pending", ["pending"], [], 0)
    assert [
        (c["signature_valid"], c["outcome"], c["attempt_id"])
        for c in await callbacks_about(db, "vnpay", "{vnp_TxnRef}", ref)
    ] == [
        (True, "wrong_amount", attempt_id),
        (False, "invalid_signature", None),
    ]
    assert [
        (c["outcome"], c["attempt_id"]) for c in await callbacks_about(db, "vnpay", "{vnp_TxnRef}", unknown)
    ] == [("unknown_order", None)]
    # A failure is recorded and told; a payment after it still pays; a late failure is ignored.
    assert (await vnpay_ipn(http, default_ipn(pay_settings, ref, response_code="24"))).json()[
        "RspCode"
    ] == "00"
    assert await direct_state(db, invoice_id) == ("pending", ["failed"], [], 0)
    told = await db.fetchval(
        "SELECT params FROM notifications WHERE kind = 'payment_failed' AND subject = $1",
        f"invoice:{invoice_id}",
    )
    assert json.loads(told) == check_params("payment_failed", {"invoice_id": invoice_id})
    assert (await vnpay_ipn(http, default_ipn(pay_settings, ref))).json()["RspCode"] == "00"
    assert (await vnpay_ipn(http, default_ipn(pay_settings, ref, response_code="99"))).json()[
        "RspCode"
    ] == "02"
    assert await direct_state(db, invoice_id) == ("paid", ["paid"], [PRICE], 1)
    assert [c["outcome"] for c in await callbacks_about(db, "vnpay", "{vnp_TxnRef}", ref)][-3:] == [
        "failed",
        "paid",
        "late_failure_ignored",
    ]


async def test_an_order_paid_to_its_facilitys_own_account_is_verified_with_that_account(
    http, db, pay_settings
):
    own_secret, own_tmn = "facility-own-secret", "OWNTMN01"
    facility_id = await db.fetchval("SELECT id FROM facilities WHERE code = $1", NO_APPOINTMENT)
    await db.execute(
        """INSERT INTO payment_accounts (facility_id, provider, config, secrets)
           VALUES ($1, 'vnpay', $2::jsonb, $3::jsonb)""",
        facility_id,
        json.dumps({"tmn_code": own_tmn, "pay_url": "https://pay.test", "api_url": "https://api.test"}),
        json.dumps({"hash_secret": [own_secret]}),
    )
    try:
        invoice_id, _, ref = await direct_order(db, NO_APPOINTMENT)
        # Signed as the default account would sign it: not this order's account.
        assert (await vnpay_ipn(http, default_ipn(pay_settings, ref))).json()["RspCode"] == "97"
        assert await direct_state(db, invoice_id) == ("pending", ["pending"], [], 0)
        assert (await vnpay_ipn(http, signed_ipn(own_secret, own_tmn, ref))).json()["RspCode"] == "00"
        assert await direct_state(db, invoice_id) == ("paid", ["paid"], [PRICE], 1)
        assert [
            (c["signature_valid"], c["outcome"])
            for c in await callbacks_about(db, "vnpay", "{vnp_TxnRef}", ref)
        ] == [
            (False, "invalid_signature"),
            (True, "paid"),
        ]
    finally:
        await db.execute("DELETE FROM payment_accounts WHERE facility_id = $1", facility_id)


# === A hold running out while its payment arrives ================================================


async def test_a_payment_after_the_hold_expired_retakes_the_free_slot(http, db, pay_settings, pool, momo_box):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    await db.execute(
        "UPDATE appointments SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        held.appointment_id,
    )
    assert await expire_and_offer(pool, pay_settings) >= 1
    snap = await snapshot(db, held)
    assert (snap.invoice, snap.appointments) == ("void", [("expired", None)])
    assert (await momo_ipn(http, momo_box.pay(ref))).status_code == 204
    snap = await snapshot(db, held)
    assert snap.invoice == "paid" and snap.payments == [PRICE] and snap.receipts == 1, snap
    assert [s for s, _ in snap.appointments] == ["expired", "booked"], snap
    assert snap.appointments[1][1] is not None and snap.refund_rows == []
    new_id = await db.fetchval("SELECT id FROM appointments WHERE invoice_id = $1", held.invoice_id)
    assert new_id != held.appointment_id  # the invoice moved to the re-taken appointment
    await assert_ledger_consistent(db, [held.invoice_id])


async def test_a_payment_after_the_slot_was_taken_by_someone_else_is_refunded(
    http, db, pay_settings, pool, momo_box, outbound
):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    await db.execute(
        "UPDATE appointments SET hold_expires_at = now() - interval '1 second' WHERE id = $1",
        held.appointment_id,
    )
    await expire_and_offer(pool, pay_settings)
    other = await new_patient(db, pay_settings)
    assert (await book(http, other, held.clinic, held.start)).status_code == 201
    assert (await momo_ipn(http, momo_box.pay(ref))).status_code == 204
    snap = await snapshot(db, held)
    assert snap.appointments == [("expired", None)], snap
    assert snap.invoice == "paid" and snap.payments == [PRICE], snap
    assert snap.refund_rows == [("requested", PRICE)], snap
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", PRICE)] and snap.refunds_in_ledger == [PRICE], snap
    assert snap.invoice == "refunded"
    await assert_ledger_consistent(db, [held.invoice_id])


async def later(delay: float, work: Any) -> Any:
    await asyncio.sleep(delay)
    return await work


async def nothing() -> None:
    return None


async def test_hold_expiry_racing_the_callback_has_one_consistent_outcome(
    http, db, pay_settings, pool, vnpay_box
):
    """The hold has just run out when VNPay's IPN arrives; housekeeping runs at the same moment and,
    in every other round, another patient tries to book the slot too. Whatever the interleaving:
    paid once, and either the patient's visit is booked (held one confirmed, or re-taken after
    expiry) and the other patient is told slot_taken, or the other patient has the slot and the
    payment is being refunded."""
    clinic = await own_clinic(db, HOME, prepaid=True, price=PRICE, windows=(("08:00", "11:00"),))
    outcomes: list[str] = []
    async with serve(pay_settings) as app:
        for round_ in range(10):
            start = clinic_at(day(3), f"{8 + round_ // 4:02d}:{(round_ % 4) * 15:02d}")
            held = await hold(http, db, pay_settings, clinic=clinic, start=start)
            payment = await started(http, held, "vnpay")
            params = vnpay_box.ipn_params(payment["redirect_url"])
            rival = await new_patient(db, pay_settings) if round_ % 2 else None
            await db.execute(
                "UPDATE appointments SET hold_expires_at = now() - interval '1 millisecond' WHERE id = $1",
                held.appointment_id,
            )

            # Housekeeping starts a little later each round, so each side wins some rounds.
            answer, _, other = await asyncio.gather(
                vnpay_ipn(app, params),
                later((round_ // 2) * 0.0005, expire_and_offer(pool, pay_settings)),
                book(app, rival, clinic, start) if rival else nothing(),
            )
            assert answer.status_code == 200 and answer.json()["RspCode"] == "00", answer.text
            snap = await snapshot(db, held)
            assert snap.invoice == "paid" and snap.payments == [PRICE] and snap.receipts == 1, snap
            statuses = [s for s, _ in snap.appointments]
            if statuses == ["booked"]:
                outcomes.append("booked")
            elif statuses == ["expired", "booked"]:
                outcomes.append("retaken")
            else:
                assert statuses == ["expired"], snap
                assert snap.refund_rows == [("requested", PRICE)], snap
                outcomes.append("refunded")
            if "booked" in statuses:
                assert snap.refund_rows == [], snap
                assert all(n is not None for s, n in snap.appointments if s == "booked"), snap
            if other is not None:
                assert other.status_code == (201 if outcomes[-1] == "refunded" else 409), other.text
            holding = await db.fetchval(
                """SELECT count(*) FROM appointments WHERE doctor_id = $1 AND starts_at = $2
                     AND status IN ('held', 'booked')""",
                clinic.doctor_id,
                start,
            )
            assert holding == 1
            await assert_ledger_consistent(db, [held.invoice_id])
    assert len(outcomes) == 10


async def test_a_payment_for_a_hold_the_patient_cancelled_is_refunded_not_rebooked(
    http, db, pay_settings, momo_box
):
    held = await hold(http, db, pay_settings)
    ref = await order_ref(db, await started(http, held, "momo"))
    response = await http.post(f"/v1/appointments/{held.appointment_id}/cancel", headers=held.patient.headers)
    assert response.status_code == 200, response.text
    assert (await momo_ipn(http, momo_box.pay(ref))).status_code == 204
    snap = await snapshot(db, held)
    assert snap.invoice == "paid" and snap.payments == [PRICE], snap
    assert [s for s, _ in snap.appointments] == ["cancelled"], snap
    assert snap.refund_rows == [("requested", PRICE)], snap


# === Reconciliation ==============================================================================


async def make_due(db: Any, payment: dict[str, Any]) -> None:
    await db.execute(
        "UPDATE payment_attempts SET expires_at = now() - interval '1 minute', last_checked_at = NULL WHERE id = $1",
        uuid.UUID(payment["id"]),
    )


@pytest.mark.parametrize("method", ["momo", "zalopay", "vnpay"])
async def test_reconciliation_pays_a_missed_callback(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, method
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, method)
    ref = await order_ref(db, payment)
    if method == "momo":
        momo_box.pay(ref)  # paid at MoMo; the IPN never arrives
    elif method == "zalopay":
        zalo_box.pay(ref)
    else:
        vnpay_box.ipn_params(payment["redirect_url"])  # paid at VNPay; the IPN never arrives
    await make_due(db, payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    await assert_paid(db, held)
    rows = await db.fetch(
        "SELECT source, outcome, signature_valid FROM payment_callbacks WHERE attempt_id = $1",
        uuid.UUID(payment["id"]),
    )
    assert [(r["source"], r["outcome"], r["signature_valid"]) for r in rows] == [
        ("reconciliation", "paid", True)
    ]
    # The late callback afterwards is a duplicate.
    if method == "momo":
        assert (await momo_ipn(http, momo_box.ipn_for(ref))).status_code == 204
    elif method == "zalopay":
        assert (await zalo_callback(http, zalo_box.callback_for(ref))).json()["return_code"] == 1
    else:
        assert (await vnpay_ipn(http, vnpay_box.ipn_params(payment["redirect_url"]))).json()[
            "RspCode"
        ] == "02"
    await assert_paid(db, held)


@pytest.mark.parametrize("method", ["momo", "zalopay", "vnpay"])
async def test_reconciliation_expires_an_unpaid_attempt(
    http, db, pay_settings, pool, outbound, vnpay_box, method
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, method)
    if method == "vnpay":
        vnpay_box.visit(payment["redirect_url"])  # the patient opened the page and left
    await make_due(db, payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    snap = await snapshot(db, held)
    assert snap.attempts == ["expired"], snap
    assert snap.invoice == "pending" and snap.payments == [] and snap.appointments == [("held", None)]


async def test_reconciliation_marks_a_failed_payment_failed(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box
):
    mo = await hold(http, db, pay_settings)
    mo_payment = await started(http, mo, "momo")
    momo_box.pay(await order_ref(db, mo_payment), result_code=1006)
    zp = await hold(http, db, pay_settings)
    zp_payment = await started(http, zp, "zalopay")
    zalo_box.fail(await order_ref(db, zp_payment))
    await make_due(db, mo_payment)
    await make_due(db, zp_payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    for held in (mo, zp):
        snap = await snapshot(db, held)
        assert snap.attempts == ["failed"] and snap.invoice == "pending" and snap.payments == [], snap


async def test_reconciliation_expires_a_vnpay_attempt_never_opened(http, db, pay_settings, pool, outbound):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, "vnpay")
    await make_due(db, payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    assert (await snapshot(db, held)).attempts == ["expired"]


@pytest.mark.parametrize("method", ["momo", "zalopay", "vnpay"])
async def test_reconciliation_keeps_asking_while_the_provider_is_down(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, method
):
    held = await hold(http, db, pay_settings)
    payment = await started(http, held, method)
    ref = await order_ref(db, payment)
    box: Any
    if method == "momo":
        box = momo_box
        momo_box.pay(ref)
    elif method == "zalopay":
        box = zalo_box
        zalo_box.pay(ref)
    else:
        box = vnpay_box
        vnpay_box.ipn_params(payment["redirect_url"])
    await make_due(db, payment)
    box.outage(503)
    try:
        await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    finally:
        box.outage(None)
    assert (await snapshot(db, held)).attempts == ["pending"]
    await make_due(db, payment)
    await reconcile.reconcile(pool, pay_settings, outbound, dt.datetime.now(dt.UTC))
    await assert_paid(db, held)


# === Refunds =====================================================================================


async def cancel(http: Any, held: Held) -> None:
    response = await http.post(f"/v1/appointments/{held.appointment_id}/cancel", headers=held.patient.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"


@pytest.mark.parametrize("method", ["momo", "zalopay", "vnpay"])
async def test_cancelling_a_paid_visit_refunds_it_through_the_provider(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank, method
):
    held = await hold(http, db, pay_settings)
    payment = await paid_through(
        method, http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    ref = await order_ref(db, payment)
    await cancel(http, held)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("requested", PRICE)] and snap.invoice == "paid", snap
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", PRICE)], snap
    assert snap.refunds_in_ledger == [PRICE] and snap.payments == [PRICE], snap
    assert snap.invoice == "refunded"
    assert [s for s, _ in snap.appointments] == ["cancelled"]
    await assert_ledger_consistent(db, [held.invoice_id])
    # The provider has the refund.
    if method == "momo":
        assert [(r.payment_order_id, r.amount) for r in momo_box.refunds if r.payment_order_id == ref] == [
            (ref, PRICE)
        ]
    elif method == "zalopay":
        assert [(r.app_trans_id, r.amount) for r in zalo_box.refunds.values() if r.app_trans_id == ref] == [
            (ref, PRICE)
        ]
    else:
        assert [(r.amount, r.transaction_type) for r in vnpay_box.refunds if r.txn_ref == ref] == [
            (PRICE, "02")
        ]
    # Sending again does nothing more.
    await refunds.send_requested(pool, pay_settings, outbound)
    assert (await snapshot(db, held)).refunds_in_ledger == [PRICE]
    invoice = (await http.get(f"/v1/invoices/{held.invoice_id}", headers=held.patient.headers)).json()
    assert (invoice["status"], invoice["paid_vnd"], invoice["refunded_vnd"]) == ("refunded", PRICE, PRICE)


async def test_cancelling_a_vietqr_paid_visit_asks_the_cashier(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "vietqr", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    await cancel(http, held)
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("manual", PRICE)], snap
    assert snap.refunds_in_ledger == [] and snap.invoice == "paid", snap
    await assert_ledger_consistent(db, [held.invoice_id])


@pytest.mark.parametrize("method", ["momo", "vnpay", "zalopay"])
async def test_a_partial_refund_leaves_the_invoice_partially_refunded(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank, method
):
    held = await hold(http, db, pay_settings)
    payment = await paid_through(
        method, http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    async with db.transaction():
        await refunds.refund_invoice(db, held.invoice_id, 50_000, "goodwill")
    async with db.transaction():
        with pytest.raises(ApiError) as too_much:  # 100,000 left, 50,000 asked already in flight
            await refunds.refund_invoice(db, held.invoice_id, PRICE - 50_000 + 1, "too much")
    assert too_much.value.code == "refund_too_large"
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", 50_000)] and snap.refunds_in_ledger == [50_000], snap
    assert snap.invoice == "partially_refunded"
    await assert_ledger_consistent(db, [held.invoice_id])
    # The rest, by cancelling.
    await cancel(http, held)
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert sorted(snap.refund_rows) == [("done", 50_000), ("done", PRICE - 50_000)], snap
    assert sorted(snap.refunds_in_ledger) == [50_000, PRICE - 50_000] and snap.invoice == "refunded", snap
    if method == "vnpay":
        ref = await order_ref(db, payment)
        assert [r.transaction_type for r in vnpay_box.refunds if r.txn_ref == ref] == ["03", "03"]
    await assert_ledger_consistent(db, [held.invoice_id])


async def test_a_refund_the_provider_refuses_stays_requested(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "momo", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    await cancel(http, held)
    momo_box.outage(503)
    try:
        await refunds.send_requested(pool, pay_settings, outbound)
    finally:
        momo_box.outage(None)
    snap = await snapshot(db, held)
    assert (
        snap.refund_rows == [("requested", PRICE)] and snap.refunds_in_ledger == [] and snap.invoice == "paid"
    )
    await db.execute(
        "UPDATE refunds SET updated_at = now() - interval '1 minute' WHERE invoice_id = $1", held.invoice_id
    )
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", PRICE)] and snap.invoice == "refunded", snap


async def test_a_zalopay_refund_still_processing_is_not_in_the_ledger_yet(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "zalopay", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    await cancel(http, held)
    zalo_box.refund_processing = True
    try:
        await refunds.send_requested(pool, pay_settings, outbound)
    finally:
        zalo_box.refund_processing = False
    snap = await snapshot(db, held)
    assert snap.refunds_in_ledger == [] and snap.invoice == "paid", snap
    assert snap.refund_rows == [("requested", PRICE)], snap


# === Paid twice ==================================================================================


async def test_an_invoice_paid_twice_keeps_one_payment_and_gives_the_other_back(
    http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank
):
    """MoMo first, then a VietQR transfer for the same invoice: the transfer goes back (by hand)."""
    held = await hold(http, db, pay_settings)
    qr = await started(http, held, "vietqr")  # opened before paying with MoMo
    await paid_through(
        "momo", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    assert (await bank_notice(http, *notice(bank, await order_ref(db, qr)))).json() == {"status": "applied"}
    snap = await snapshot(db, held)
    assert sorted(snap.attempts) == ["paid", "refunded"], snap
    assert snap.refund_rows == [("manual", PRICE)], snap
    assert [s for s, _ in snap.appointments] == ["booked"] and snap.receipts == 1, snap
    assert snap.invoice == "paid"


async def test_refunding_a_duplicate_payment_leaves_the_invoice_paid(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank
):
    """A VietQR transfer first, then MoMo: the MoMo payment is refunded through MoMo."""
    held = await hold(http, db, pay_settings)
    momo_payment = await started(http, held, "momo")
    await paid_through(
        "vietqr", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    assert (await momo_ipn(http, momo_box.pay(await order_ref(db, momo_payment)))).status_code == 204
    snap = await snapshot(db, held)
    assert snap.attempts == ["paid", "refunded"] or sorted(snap.attempts) == ["paid", "refunded"], snap
    assert snap.refund_rows == [("requested", PRICE)], snap
    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", PRICE)] and snap.refunds_in_ledger == [PRICE], snap
    await assert_ledger_consistent(db, [held.invoice_id])
    assert snap.invoice == "paid", snap  # the visit is still paid for, once


# === The ledger ==================================================================================


async def test_the_ledger_is_append_only(http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "vnpay", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    entry = await db.fetchval("SELECT id FROM ledger_entries WHERE invoice_id = $1", held.invoice_id)
    for statement in (
        "UPDATE ledger_entries SET amount_vnd = 1 WHERE id = $1",
        "DELETE FROM ledger_entries WHERE id = $1",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            async with db.transaction():
                await db.execute(statement, entry)
    assert await db.fetchval("SELECT amount_vnd FROM ledger_entries WHERE id = $1", entry) == PRICE


async def test_every_invoice_the_payments_touched_agrees_with_its_ledger(db):
    """Runs last in this file: every invoice the tests above made has the state its ledger implies."""
    if not TOUCHED:
        pytest.skip("run with the rest of this module")
    ids = list(TOUCHED)
    rows = await db.fetch(
        """SELECT i.id, i.status, i.amount_vnd,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'payment'), 0) AS paid,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'refund'), 0) AS refunded
             FROM invoices i LEFT JOIN ledger_entries l ON l.invoice_id = i.id
            WHERE i.id = ANY($1::uuid[]) GROUP BY i.id""",
        ids,
    )
    wrong = [
        dict(r)
        for r in rows
        if r["status"]
        != ledger.invoice_status(
            int(r["amount_vnd"]), int(r["paid"]), int(r["refunded"]), voided=r["status"] == "void"
        )
    ]
    assert wrong == []
    # At most one paid attempt per invoice, and every paid attempt's money is in the ledger once.
    doubles = await db.fetch(
        """SELECT p.id, p.status FROM payment_attempts p
            WHERE p.invoice_id = ANY($1::uuid[])
              AND (SELECT count(*) FROM ledger_entries l WHERE l.attempt_id = p.id AND l.kind = 'payment')
                  <> (CASE WHEN p.status IN ('paid', 'refunded') THEN 1 ELSE 0 END)""",
        ids,
    )
    assert doubles == []


# === Refunds by the facility's cashier ==========================================================


async def cashier(
    db: Any, settings: Settings, facility_code: str = HOME, role: str = "facility_staff"
) -> Session:
    session = await new_patient(db, settings)
    await db.execute(
        """INSERT INTO staff (personal_id, facility_id, role)
           SELECT u.personal_id, f.id, $3 FROM users u, facilities f WHERE u.id = $1 AND f.code = $2""",
        uuid.UUID(session.user["id"]),
        facility_code,
        role,
    )
    return session


async def staff_refund(
    http: Any, session: Session, invoice_id: uuid.UUID, *, key: str | None = None, **body: Any
) -> httpx.Response:
    return await http.post(
        f"/v1/staff/invoices/{invoice_id}/refunds",
        json=body,
        headers={**session.headers, "Idempotency-Key": key or str(uuid.uuid4())},
    )


async def test_a_cashier_refunds_part_of_a_paid_invoice(
    http, db, pay_settings, pool, outbound, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "momo", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    staff = await cashier(db, pay_settings)
    key = str(uuid.uuid4())
    first = await staff_refund(
        http, staff, held.invoice_id, key=key, amount_vnd=50_000, reason="X-quang không chụp"
    )
    assert first.status_code == 201, first.text
    assert (first.json()["status"], first.json()["amount_vnd"]) == ("requested", 50_000)
    again = await staff_refund(
        http, staff, held.invoice_id, key=key, amount_vnd=50_000, reason="X-quang không chụp"
    )
    assert (again.status_code, again.json(), again.headers.get("idempotent-replayed")) == (
        201,
        first.json(),
        "true",
    )

    await refunds.send_requested(pool, pay_settings, outbound)
    snap = await snapshot(db, held)
    assert snap.refund_rows == [("done", 50_000)] and snap.refunds_in_ledger == [50_000], snap
    assert snap.invoice == "partially_refunded"
    await assert_ledger_consistent(db, [held.invoice_id])
    invoice = (await http.get(f"/v1/invoices/{held.invoice_id}", headers=held.patient.headers)).json()
    assert (invoice["status"], invoice["refunded_vnd"]) == ("partially_refunded", 50_000)
    listed = await http.get(
        "/v1/staff/refunds", params={"status": "done", "limit": 100}, headers=staff.headers
    )
    done = {r["id"]: r for r in listed.json()["items"] if r["invoice_id"] == str(held.invoice_id)}
    assert list(done) == [first.json()["id"]] and done[first.json()["id"]]["reference"], listed.text
    # The rest, in full (no amount), and nothing more after that.
    rest = await staff_refund(http, staff, held.invoice_id, reason="Hủy dịch vụ")
    assert (rest.status_code, rest.json()["amount_vnd"]) == (201, PRICE - 50_000), rest.text
    problem(
        await staff_refund(http, staff, held.invoice_id, amount_vnd=1, reason="thêm"), 409, "refund_too_large"
    )


async def test_cashiers_refunding_at_once_never_give_back_more_than_was_paid(
    http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "zalopay", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    staff = await cashier(db, pay_settings)
    async with serve(pay_settings) as concurrent:
        answers = await asyncio.gather(
            *(
                staff_refund(concurrent, staff, held.invoice_id, amount_vnd=40_000, reason="hoàn")
                for _ in range(12)
            )
        )
    codes = sorted((a.status_code, a.json().get("code")) for a in answers)
    assert codes == [(201, None)] * 3 + [(409, "refund_too_large")] * 9, codes
    assert (await snapshot(db, held)).refund_rows == [("requested", 40_000)] * 3


async def test_a_vietqr_refund_waits_for_the_cashier_and_enters_the_ledger_once(
    http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    await paid_through(
        "vietqr", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    staff = await cashier(db, pay_settings, role="admin")
    created = await staff_refund(http, staff, held.invoice_id, reason="Bệnh nhân chuyển viện")
    assert (created.status_code, created.json()["status"], created.json()["amount_vnd"]) == (
        201,
        "manual",
        PRICE,
    )
    refund_id = created.json()["id"]
    waiting = (await http.get("/v1/staff/refunds", params={"status": "manual"}, headers=staff.headers)).json()
    assert refund_id in [r["id"] for r in waiting["items"]]
    assert (await snapshot(db, held)).refunds_in_ledger == []

    confirm = f"/v1/staff/refunds/{refund_id}/confirm"
    done = await http.post(confirm, json={"reference": "FT26330123456"}, headers=staff.headers)
    assert (done.status_code, done.json()["status"], done.json()["reference"]) == (
        200,
        "done",
        "FT26330123456",
    )
    problem(
        await http.post(confirm, json={"reference": "FT26330123456"}, headers=staff.headers),
        409,
        "refund_not_manual",
    )
    snap = await snapshot(db, held)
    assert snap.refunds_in_ledger == [PRICE] and snap.invoice == "refunded", snap
    await assert_ledger_consistent(db, [held.invoice_id])


async def test_refunds_are_only_for_the_invoices_own_cashiers(
    http, db, pay_settings, momo_box, zalo_box, vnpay_box, bank
):
    held = await hold(http, db, pay_settings)
    staff = await cashier(db, pay_settings)
    problem(
        await staff_refund(http, staff, held.invoice_id, reason="chưa trả"), 409, "invoice_not_refundable"
    )
    await paid_through(
        "vietqr", http, db, held, momo_box=momo_box, zalo_box=zalo_box, vnpay_box=vnpay_box, bank=bank
    )
    elsewhere = await cashier(db, pay_settings, facility_code="TYT-QUAICANG")
    problem(await staff_refund(http, elsewhere, held.invoice_id, reason="x"), 404, "not_found")
    for outsider in (held.patient, await cashier(db, pay_settings, role="doctor")):
        problem(await staff_refund(http, outsider, held.invoice_id, reason="x"), 403, "forbidden")
    for body in ({"reason": "x", "amount_vnd": 0}, {"reason": ""}, {"reason": "x", "surprise": 1}):
        response = await staff_refund(http, staff, held.invoice_id, **body)
        assert response.status_code in (400, 422) and response.json()["code"] == "validation_failed", (
            response.text
        )
    manual = (await staff_refund(http, staff, held.invoice_id, reason="ok")).json()["id"]
    answer = await http.post(
        f"/v1/staff/refunds/{manual}/confirm", json={"reference": "R1"}, headers=elsewhere.headers
    )
    problem(answer, 404, "not_found")
    assert (await http.get("/v1/staff/refunds", headers=elsewhere.headers)).json()["items"] == []
    assert (await snapshot(db, held)).refund_rows == [("manual", PRICE)]


async def test_starting_payments_is_rate_limited_per_user_and_per_address(
    database_url, redis_url, issuer, db, momo_box, zalo_box, vnpay_box
):
    def limited(per_user: int, per_address: int) -> Settings:
        return make_settings(
            database_url,
            redis_url,
            issuer,
            **sandbox_overrides(momo_box, zalo_box, vnpay_box),
            payment_rate_per_minute=per_user,
            payment_rate_per_address_per_minute=per_address,
        )

    # A fixed one-minute window: at most two windows' worth can pass, even across a boundary.
    address = f"10.9.{uuid.uuid4().int % 250}.7"
    async with serve(limited(per_user=3, per_address=1000), client_ip=address) as http:
        held = await hold(http, db, limited(3, 1000))
        answers = [await start_payment(http, held, "vietqr") for _ in range(8)]
        assert [a.status_code for a in answers].count(201) <= 6
        refused = [a for a in answers if a.status_code == 429]
        assert refused, [a.status_code for a in answers]
        problem(refused[0], 429, "rate_limited")
        assert int(refused[0].headers["retry-after"]) >= 1

    # Patients behind one address share its limit, each well under their own.
    settings = limited(per_user=1000, per_address=3)
    async with serve(settings, client_ip=address.replace(".7", ".8")) as http:
        neighbours = [await hold(http, db, settings) for _ in range(4)]
        answers = [(await start_payment(http, n, "vietqr")).status_code for n in neighbours for _ in range(2)]
        assert answers.count(201) <= 6 and 429 in answers, answers
    async with serve(settings, client_ip="10.250.0.1") as elsewhere:
        assert (await start_payment(elsewhere, neighbours[0], "vietqr")).status_code == 201
