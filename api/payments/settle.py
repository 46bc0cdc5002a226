"""One code path for every report of a payment's fate: callbacks of each provider, bank
transfer notices and reconciliation answers all end here.

In one transaction: the report is stored (secrets redacted) with what we made of it; a
provider transaction is applied at most once (`applied_transactions`), so duplicates change
nothing; states only move forward; on `paid` the ledger gets the money, the held appointment
becomes `booked` and a receipt goes into the outbox. Locks are taken appointment first, then
attempt and invoice, the same order as hold expiry, so the two never deadlock.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import asyncpg
import msgspec

import notifications
from api.booking import booking
from api.booking import queries as booking_queries
from api.payments import queries
from api.settings import Settings

Outcome = Literal["paid", "failed", "pending"]
Result = Literal["applied", "duplicate", "unknown_order", "wrong_amount", "pending", "invalid_signature"]


class Report(msgspec.Struct, frozen=True):
    provider: str
    order_ref: str | None
    transaction_id: str | None
    amount_vnd: int | None
    outcome: Outcome
    payload: dict[str, Any]
    """As received, with secrets already redacted."""
    source: Literal["callback", "reconciliation"] = "callback"


async def settle(
    conn: asyncpg.Connection,
    settings: Settings,
    report: Report,
    now: dt.datetime,
    *,
    signature_valid: bool = True,
    attempt: asyncpg.Record | None = None,
) -> Result:
    """Apply a report inside the caller's transaction; what happened, for the provider's answer."""

    async def keep(outcome: str, attempt_id: uuid.UUID | None) -> None:
        await queries.record_callback(
            conn,
            provider=report.provider,
            payload=report.payload,
            signature_valid=signature_valid,
            attempt_id=attempt_id,
            provider_transaction_id=report.transaction_id,
            outcome=outcome,
            source=report.source,
        )

    if not signature_valid:
        await keep("invalid_signature", None)
        return "invalid_signature"
    found = attempt or (
        await queries.find_attempt(conn, report.provider, report.order_ref) if report.order_ref else None
    )
    if found is None:
        await keep("unknown_order", None)
        return "unknown_order"
    appointment_id = await queries.appointment_of_invoice(conn, found["invoice_id"])
    appointment = (
        await booking_queries.get_appointment(conn, appointment_id, lock=True) if appointment_id else None
    )
    locked = await queries.attempt_by_ref(conn, found["provider"], found["order_ref"])
    assert locked is not None
    if report.amount_vnd is not None and report.amount_vnd != locked["amount_vnd"]:
        await keep("wrong_amount", locked["id"])
        return "wrong_amount"
    if report.outcome == "pending":
        await keep("pending", locked["id"])
        return "pending"
    if report.outcome == "failed":
        if locked["status"] != "pending":
            await keep("late_failure_ignored", locked["id"])  # a failure never undoes a payment
            return "duplicate"
        await queries.set_attempt_status(conn, locked["id"], "failed", report.transaction_id)
        await _tell(conn, locked, "payment_failed")
        await keep("failed", locked["id"])
        return "applied"
    transaction = report.transaction_id or locked["order_ref"]
    if not await queries.claim_transaction(conn, report.provider, transaction, locked["id"]):
        await keep("duplicate", locked["id"])
        return "duplicate"
    if locked["status"] in ("paid", "refunded"):
        await keep("duplicate", locked["id"])
        return "duplicate"
    earlier = await queries.paid_attempt(conn, locked["invoice_id"])
    await queries.add_ledger_entry(
        conn,
        locked["invoice_id"],
        locked["id"],
        "payment",
        locked["amount_vnd"],
        report.provider,
        transaction,
    )
    if earlier is not None:
        # Paid twice (say a QR transfer after a card payment): only one attempt succeeds, the
        # other's money goes back.
        await queries.set_attempt_status(conn, locked["id"], "refunded", transaction)
        await _refund(conn, locked, "paid twice")
        await keep("paid_twice_refunded", locked["id"])
        return "applied"
    await queries.set_attempt_status(conn, locked["id"], "paid", transaction)
    if appointment is not None and appointment["status"] == "held":
        await booking.confirm(conn, appointment, now)
    elif appointment is not None and appointment["status"] == "cancelled":
        await _refund(conn, locked, "the appointment was cancelled before the payment arrived")
    elif (
        appointment is not None
        and appointment["status"] == "expired"
        and await booking.retake(conn, settings, appointment, now) is None
    ):
        await _refund(conn, locked, "the held slot was gone when the payment arrived")
    await _tell(conn, locked, "payment_received")
    await keep("paid", locked["id"])
    return "applied"


async def _refund(conn: asyncpg.Connection, attempt: asyncpg.Record, reason: str) -> None:
    """Ask for the money back: through the provider's refund API (the housekeeping job sends it),
    or by hand for a bank transfer (a cashier refunds it)."""
    await queries.request_refund(
        conn,
        attempt["invoice_id"],
        attempt["id"],
        attempt["amount_vnd"],
        reason,
        manual=attempt["provider"] == "vietqr",
    )


async def _tell(conn: asyncpg.Connection, attempt: asyncpg.Record, kind: str) -> None:
    invoice = await queries.lock_invoice(conn, attempt["invoice_id"])
    assert invoice is not None
    params: dict[str, object] = {"invoice_id": invoice["id"]}
    if kind == "payment_received":
        params["amount"] = int(attempt["amount_vnd"])
    # The patient, and whoever booked for them (a guardian paying for a child).
    for recipient in await queries.invoice_recipients(conn, invoice["id"]):
        await notifications.enqueue(
            conn,
            recipient,
            kind,
            params,
            dedupe_key=f"payment:{attempt['id']}:{kind}:{recipient}",
            facility_id=invoice["facility_id"],
            subject=f"invoice:{invoice['id']}",
        )
