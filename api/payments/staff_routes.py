"""Refunds for a facility's cashiers (facility staff and administrators): a full or partial refund
of a paid invoice, the list of refunds, and confirming a VietQR refund sent back by hand.

Cancelling a paid visit refunds it without staff; these routes are for the rest (a service that
was only partly given, goodwill). Only the refund a provider or the cashier confirmed enters the
ledger, so the invoice shows `partially_refunded` or `refunded` only once the money went back.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import asyncpg
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api.errors import BEARER, ApiError, error_responses
from api.idempotency import IdempotencyKey, idempotent
from api.identity.current_user import CurrentUser, SignedInRequest
from api.pagination import Cursor, Limit, decode_cursor, next_cursor
from api.payments import queries, refunds
from api.payments.models import RefundConfirm, RefundCreate, RefundOut, RefundPage, RefundStatus

CASHIER_ROLES = ("facility_staff", "admin")
StatusQuery = Annotated[
    Literal["requested", "done", "failed", "manual"] | None,
    QueryParameter(
        name="status", description="Only refunds in this state (`manual`: waiting for the cashier)."
    ),
]


def cashier_facilities(user: CurrentUser) -> list[uuid.UUID]:
    return sorted({m.facility_id for m in user.staff if m.role in CASHIER_ROLES})


def refund_out(row: asyncpg.Record) -> RefundOut:
    status: RefundStatus = row["status"]
    return RefundOut(
        id=row["id"],
        invoice_id=row["invoice_id"],
        facility_id=row["facility_id"],
        amount_vnd=row["amount_vnd"],
        status=status,
        reason=row["reason"],
        reference=row["provider_refund_id"] if status == "done" else None,
        created_at=row["created_at"],
    )


class StaffRefundController(Controller):
    path = "/v1/staff"
    security = [BEARER]
    tags = ["payments (staff)"]

    @post(
        "/invoices/{invoice_id:uuid}/refunds",
        operation_id="createRefund",
        summary="Refund all or part of a paid invoice of your facility",
        description="`Idempotency-Key` is required. A VNPay, MoMo or ZaloPay payment is refunded through the "
        "provider's refund API within seconds; a VietQR transfer becomes a `manual` refund for the cashier.",
        responses=error_responses(
            "unauthorized",
            "forbidden",
            "not_found",
            "invoice_not_refundable",
            "refund_too_large",
            "idempotency_key_required",
            "idempotency_key_reused",
        ),
    )
    async def create_refund(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        invoice_id: FromPath[uuid.UUID],
        data: JSONBody[RefundCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[RefundOut]:
        facilities = cashier_facilities(request.user)

        async def create() -> tuple[int, RefundOut]:
            # Locked, so two cashiers refunding at once cannot both take what is left.
            invoice = await queries.lock_invoice(db, invoice_id)
            if invoice is None or invoice["facility_id"] not in facilities:
                raise ApiError("not_found")
            refund_id = await refunds.refund_invoice(db, invoice_id, data.amount_vnd, data.reason)
            if refund_id is None:
                raise ApiError("invoice_not_refundable")
            row = await queries.refund_at(db, refund_id, facilities)
            assert row is not None  # written just above, in this transaction
            return 201, refund_out(row)

        return await idempotent(
            db, request.user.id, idempotency_key, f"createRefund:{invoice_id}", data, RefundOut, create
        )

    @get(
        "/refunds",
        operation_id="listRefunds",
        summary="Refunds of your facilities, oldest first",
        responses=error_responses("unauthorized", "forbidden", "invalid_cursor"),
    )
    async def list_refunds(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        status: StatusQuery = None,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> RefundPage:
        after = decode_cursor(cursor, dt.datetime, uuid.UUID) if cursor else None
        rows = await queries.refunds_at(db, cashier_facilities(request.user), status, after, limit + 1)
        return RefundPage(
            items=[refund_out(r) for r in rows[:limit]],
            next_cursor=next_cursor(rows, limit, "created_at", "id"),
        )

    @post(
        "/refunds/{refund_id:uuid}/confirm",
        operation_id="confirmManualRefund",
        summary="Record that the cashier sent a VietQR payment back",
        description="Only for `manual` refunds. The refund enters the ledger once; confirming it again is 409.",
        status_code=200,
        responses=error_responses("unauthorized", "forbidden", "not_found", "refund_not_manual"),
    )
    async def confirm_manual_refund(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        refund_id: FromPath[uuid.UUID],
        data: JSONBody[RefundConfirm],
    ) -> RefundOut:
        facilities = cashier_facilities(request.user)
        if await queries.refund_at(db, refund_id, facilities) is None:
            raise ApiError("not_found")
        if not await refunds.record_refund_done(db, refund_id, data.reference, "manual"):
            raise ApiError("refund_not_manual")
        row = await queries.refund_at(db, refund_id, facilities)
        assert row is not None
        return refund_out(row)
