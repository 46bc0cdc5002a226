"""Invoices and payments for patients and guardians (staff see their facility's), and the
providers' callbacks (public, authenticated by their signatures)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_204_NO_CONTENT

from api.errors import BEARER, ApiError, error_responses
from api.idempotency import IdempotencyKey, idempotent
from api.identity.current_user import CurrentUser, SignedInRequest
from api.pagination import Cursor, Limit, decode_cursor, next_cursor
from api.payments import attempts, callbacks, queries
from api.payments.models import InvoiceOut, InvoicePage, PaymentCreate, PaymentOut


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _staff_facilities(user: CurrentUser) -> list[uuid.UUID]:
    return sorted({m.facility_id for m in user.staff if m.role in ("facility_staff", "admin")})


async def invoices_out(db: asyncpg.Connection, rows: list[asyncpg.Record]) -> list[InvoiceOut]:
    payments: dict[uuid.UUID, list[PaymentOut]] = {}
    for attempt in await queries.attempts_of(db, [r["id"] for r in rows]):
        payments.setdefault(attempt["invoice_id"], []).append(attempts.payment_out(attempt))
    out = []
    for row in rows:
        paid, refunded = await queries.ledger_totals(db, row["id"])
        out.append(
            InvoiceOut(
                id=row["id"],
                patient_id=row["patient_id"],
                facility_id=row["facility_id"],
                appointment_id=row["appointment_id"],
                amount_vnd=row["amount_vnd"],
                status=row["status"],
                paid_vnd=paid,
                refunded_vnd=refunded,
                created_at=row["created_at"],
                payments=payments.get(row["id"], []),
            )
        )
    return out


class InvoiceController(Controller):
    path = "/v1/invoices"
    security = [BEARER]
    tags = ["payments"]

    @get(
        operation_id="listInvoices",
        summary="Your and your dependents' invoices (staff: their facility's)",
        responses=error_responses("unauthorized", "invalid_cursor"),
    )
    async def list_invoices(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> InvoicePage:
        after = decode_cursor(cursor, dt.datetime, uuid.UUID) if cursor else None
        rows = await queries.invoices_for(
            db, request.user.id, _staff_facilities(request.user), after, limit + 1
        )
        return InvoicePage(
            items=await invoices_out(db, rows[:limit]),
            next_cursor=next_cursor(rows, limit, "created_at", "id"),
        )

    @get(
        "/{invoice_id:uuid}",
        operation_id="getInvoice",
        summary="One invoice with its payments",
        responses=error_responses("unauthorized", "not_found"),
    )
    async def get_invoice(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        invoice_id: FromPath[uuid.UUID],
    ) -> InvoiceOut:
        row = await queries.invoice_for(db, request.user.id, _staff_facilities(request.user), invoice_id)
        if row is None:
            raise ApiError("not_found")
        return (await invoices_out(db, [row]))[0]

    @post(
        "/{invoice_id:uuid}/payments",
        operation_id="createPayment",
        summary="Start paying an invoice with VNPay, MoMo, ZaloPay or a VietQR bank transfer",
        description="`Idempotency-Key` is required. Opening the returned page or QR does not pay: the provider's "
        "server-to-server callback does.",
        responses=error_responses(
            "unauthorized",
            "not_found",
            "invoice_not_payable",
            "hold_expired",
            "payment_method_unavailable",
            "payment_provider_unavailable",
            "idempotency_key_required",
            "idempotency_key_reused",
            "rate_limited",
        ),
    )
    async def create_payment(
        self,
        request: SignedInRequest,
        state: State,
        db: NamedDependency[asyncpg.Connection],
        invoice_id: FromPath[uuid.UUID],
        data: JSONBody[PaymentCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[PaymentOut]:
        invoice = await queries.invoice_for(
            db, request.user.id, [], invoice_id
        )  # only patients and guardians pay
        if invoice is None:
            raise ApiError("not_found")
        await state.rate_limiter.hit_user_and_address(
            "payment",
            request,
            per_user=state.settings.payment_rate_per_minute,
            per_address=state.settings.payment_rate_per_address_per_minute,
        )
        payer_ip = request.client.host if request.client else "127.0.0.1"  # VNPay requires an address

        async def create() -> tuple[int, PaymentOut]:
            return 201, await attempts.start(
                db, state.settings, state.http, invoice, data, payer_ip, utcnow()
            )

        return await idempotent(
            db, request.user.id, idempotency_key, f"createPayment:{invoice_id}", data, PaymentOut, create
        )


class CallbackController(Controller):
    """Server-to-server calls from the providers. No bearer token: each is authenticated by the
    provider's signature, and answered in the provider's own format.

    No `db` dependency (a connection in a transaction for the whole request): the callbacks
    parse first, then take a connection, and open a transaction only to change something.
    """

    path = "/v1/payments"
    tags = ["payment callbacks"]

    @get("/callbacks/vnpay", operation_id="vnpayIpn", summary="VNPay IPN", responses=error_responses())
    async def vnpay(self, request: Request[Any, Any, Any], state: State) -> dict[str, str]:
        params = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
        return await callbacks.vnpay_ipn(state.db_pool, state.settings, params, utcnow(), state.outbox_waker)

    @post(
        "/callbacks/momo",
        operation_id="momoIpn",
        summary="MoMo IPN",
        status_code=HTTP_204_NO_CONTENT,
        responses=error_responses(),
    )
    async def momo(self, request: Request[Any, Any, Any], state: State) -> None:
        body = _json_object(await request.body())
        await callbacks.momo_ipn(state.db_pool, state.settings, body, utcnow(), state.outbox_waker)

    @post(
        "/callbacks/zalopay",
        operation_id="zalopayCallback",
        summary="ZaloPay callback",
        status_code=200,
        responses=error_responses(),
    )
    async def zalopay(self, request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
        return await callbacks.zalopay_callback(
            state.db_pool, state.settings, _json_object(await request.body()), utcnow(), state.outbox_waker
        )

    @post(
        "/callbacks/bank-transfer",
        operation_id="bankTransferNotice",
        summary="A bank's notice of an incoming VietQR transfer (X-Signature: hex HMAC-SHA256 of the body)",
        status_code=200,
        responses=error_responses("invalid_signature"),
    )
    async def bank_transfer(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        valid, result = await callbacks.bank_transfer(
            state.db_pool,
            state.settings,
            await request.body(),
            request.headers.get("x-signature"),
            utcnow(),
            state.outbox_waker,
        )
        if not valid:
            # Answered, not raised: the stored record of this callback must stay.
            return ApiError(
                "invalid_signature" if result == "invalid_signature" else "validation_failed"
            ).to_response(request)
        return Response({"status": result})

    @get(
        "/return",
        operation_id="paymentReturn",
        summary="Where the provider sends the browser back; never marks anything paid",
        responses=error_responses(),
    )
    async def browser_return(self) -> dict[str, str]:
        return {
            "status": "received",
            "message": "The app will show the payment once the provider confirms it.",
        }


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {}
    return body if isinstance(body, dict) else {}
