"""One code path for every report of a payment's fate: callbacks of each provider, bank
transfer notices and reconciliation answers all end here.

In one transaction: the report is stored (secrets redacted) with what we made of it; a
provider transaction is applied at most once (`applied_transactions`), so duplicates change
nothing; states only move forward; on `paid` the ledger gets the money, the held appointment
becomes `booked` and a receipt goes into the outbox. Locks are taken appointment first, then
attempt and invoice, the same order as hold expiry, so the two never deadlock.

Under load every round trip to PostgreSQL counts (a callback is short, and a transaction held
open between statements waits on the event loop), so a report is applied by one statement
(`queries.apply_report`) whenever the rows it locks decide it: a callback for an order with no
appointment is then one statement in all, and with an appointment the transaction is the
appointment's lock, that statement and the booking. The rare rest (a payment for an invoice
that already holds money: paid twice, or after a refund) is taken step by step (`_apply`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import asyncpg
import msgspec

from api.booking import booking
from api.booking import queries as booking_queries
from api.payments import queries
from api.payments.ledger import invoice_status
from api.settings import Settings
from notifications import outbox

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


# What an invoice becomes when a payment lands on a ledger that held nothing yet (the invoice
# was pending, or void): the payment alone, nothing refunded, is `paid` whatever the amounts.
_FIRST_PAYMENT = (
    invoice_status(1, 1, 0, voided=False),
    invoice_status(1, 1, 0, voided=True),
)


async def settle_at_once(
    conn: asyncpg.Connection,
    settings: Settings,
    report: Report,
    now: dt.datetime,
    *,
    waker: outbox.Waker | None = None,
) -> tuple[Result | None, asyncpg.Record | None]:
    """Settle a callback whose signature the provider's default account verified, in one
    statement, outside any transaction. (None, the order as `queries.find_attempt` finds it),
    with nothing written, when the order is not paid to the default account (its facility has
    one of its own), has an appointment to lock and book, or its invoice already holds money:
    then `settle` must take it, with the order's account.
    """
    assert not conn.is_in_transaction()
    row = await _apply_at_once(conn, report, None, default_account=True, wake=waker is not None)
    if row["outcome"] is None:
        return None, row
    result = _ANSWERS[row["outcome"]]
    if waker is not None and result == "applied":
        waker.wake()
    return result, None


async def settle(
    conn: asyncpg.Connection,
    settings: Settings,
    report: Report,
    now: dt.datetime,
    *,
    signature_valid: bool = True,
    attempt: asyncpg.Record | None = None,
    waker: outbox.Waker | None = None,
) -> Result:
    """Apply a report; what happened, for the provider's answer.

    Inside the caller's transaction when there is one. Otherwise a report is applied by a
    single statement when it can be (no appointment to book), else in a transaction of its own;
    with a `waker`, the notification workers are woken after the commit rather than by a NOTIFY
    in it. `attempt`: the attempt as `queries.find_attempt` found it, when the caller already
    looked it up (to verify the report with its account).
    """
    if not signature_valid:
        await _keep(conn, report, "invalid_signature", None, signature_valid=False)
        return "invalid_signature"
    found = attempt or (
        await queries.find_attempt(conn, report.provider, report.order_ref) if report.order_ref else None
    )
    if found is None:
        await _keep(conn, report, "unknown_order", None)
        return "unknown_order"
    if conn.is_in_transaction():
        return await _settle(conn, settings, report, found, now, wake=False)
    result: Result | None = None
    if found["appointment_id"] is None:
        # Nothing else to lock or book: one statement is a transaction of its own.
        row = await _apply_at_once(conn, report, None, default_account=False, wake=waker is not None)
        result = _ANSWERS.get(row["outcome"])
    if result is None:
        async with conn.transaction():
            result = await _settle(conn, settings, report, found, now, wake=waker is not None)
    if waker is not None and result == "applied":
        waker.wake()
    return result


async def _settle(
    conn: asyncpg.Connection,
    settings: Settings,
    report: Report,
    found: asyncpg.Record,
    now: dt.datetime,
    *,
    wake: bool,
) -> Result:
    """A report about a known attempt, in the current transaction."""
    # Locks: the appointment first, then the attempt with its invoice. An invoice gets its
    # appointment in the transaction that creates it, and only a payment (under these locks)
    # moves it to another, so an invoice found without one has none.
    appointment = (
        await booking_queries.appointment_of_invoice(conn, found["invoice_id"], lock=True)
        if found["appointment_id"] is not None
        else None
    )
    outcome = (await _apply_at_once(conn, report, appointment, default_account=False, wake=wake))["outcome"]
    if outcome is None:
        return await _apply(conn, settings, report, found, appointment, now)
    if outcome == "paid" and appointment is not None:
        await _book(conn, settings, found, appointment, now)
    return _ANSWERS[outcome]


async def _apply_at_once(
    conn: asyncpg.Connection,
    report: Report,
    appointment: asyncpg.Record | None,
    *,
    default_account: bool,
    wake: bool,
) -> asyncpg.Record:
    """`queries.apply_report` for this report: its `outcome` is None when nothing was written and
    `_apply` must take the report step by step."""
    paid = report.outcome == "paid"
    return await queries.apply_report(
        conn,
        provider=report.provider,
        order_ref=report.order_ref or "",
        outcome=report.outcome,
        amount_vnd=report.amount_vnd,
        transaction=(report.transaction_id or report.order_ref) if paid else report.transaction_id,
        default_account=default_account,
        appointment=(appointment["id"], appointment["booked_by"]) if appointment is not None else None,
        kind="payment_received" if paid else "payment_failed",
        invoice_paid=_FIRST_PAYMENT,
        payload=report.payload,
        provider_transaction_id=report.transaction_id,
        source=report.source,
        wake_after_commit=wake,
    )


# What a provider is answered for each outcome stored by `apply_report`.
_ANSWERS: dict[str, Result] = {
    "paid": "applied",
    "failed": "applied",
    "duplicate": "duplicate",
    "late_failure_ignored": "duplicate",
    "unknown_order": "unknown_order",
    "wrong_amount": "wrong_amount",
    "pending": "pending",
}


async def _apply(
    conn: asyncpg.Connection,
    settings: Settings,
    report: Report,
    found: asyncpg.Record,
    appointment: asyncpg.Record | None,
    now: dt.datetime,
) -> Result:
    """A report about an attempt, step by step, in the current transaction, with the invoice's
    appointment (if any) locked."""
    # An attempt's amount never changes: no lock is needed to compare it.
    if report.amount_vnd is not None and report.amount_vnd != found["amount_vnd"]:
        await _keep(conn, report, "wrong_amount", found["id"])
        return "wrong_amount"
    if report.outcome == "pending":
        await _keep(conn, report, "pending", found["id"])
        return "pending"
    transaction = report.transaction_id or found["order_ref"]
    locked = await queries.lock_attempt(
        conn, found["id"], (report.provider, transaction) if report.outcome == "paid" else None
    )
    assert locked is not None
    if appointment is None and locked["appointment_id"] is not None:  # not expected (see `_settle`)
        appointment = await booking_queries.appointment_of_invoice(conn, found["invoice_id"], lock=True)
    if report.outcome == "failed":
        if locked["status"] != "pending":
            await _keep(
                conn, report, "late_failure_ignored", locked["id"]
            )  # a failure never undoes a payment
            return "duplicate"
        await _tell(conn, locked, appointment, "payment_failed")
        await _move(conn, report, locked, "failed", report.transaction_id, None, "failed")
        return "applied"
    if not locked["claimed"] or locked["status"] in ("paid", "refunded"):
        await _keep(conn, report, "duplicate", locked["id"])
        return "duplicate"
    entry = await queries.add_payment(
        conn, locked["invoice_id"], locked["id"], locked["amount_vnd"], report.provider, transaction
    )
    invoice = invoice_status(
        locked["invoice_amount_vnd"],
        entry["paid"],
        entry["refunded"],
        voided=locked["invoice_status"] == "void",
    )
    if entry["earlier"] is not None:
        # Paid twice (say a QR transfer after a card payment): only one attempt succeeds, the
        # other's money goes back.
        await _refund(conn, locked, "paid twice")
        await _move(conn, report, locked, "refunded", transaction, invoice, "paid_twice_refunded")
        return "applied"
    if appointment is not None:
        await _book(conn, settings, locked, appointment, now)
    await _tell(conn, locked, appointment, "payment_received")
    await _move(conn, report, locked, "paid", transaction, invoice, "paid")
    return "applied"


async def _book(
    conn: asyncpg.Connection,
    settings: Settings,
    attempt: asyncpg.Record,
    appointment: asyncpg.Record,
    now: dt.datetime,
) -> None:
    """The paid appointment: a hold becomes `booked`; a cancelled one, or an expired one whose
    slot is gone, gets its money back."""
    if appointment["status"] == "held":
        await booking.confirm(conn, appointment)
    elif appointment["status"] == "cancelled":
        await _refund(conn, attempt, "the appointment was cancelled before the payment arrived")
    elif (
        appointment["status"] == "expired" and await booking.retake(conn, settings, appointment, now) is None
    ):
        await _refund(conn, attempt, "the held slot was gone when the payment arrived")


async def _keep(
    conn: asyncpg.Connection,
    report: Report,
    outcome: str,
    attempt_id: uuid.UUID | None,
    *,
    signature_valid: bool = True,
) -> None:
    """Store a report that changed nothing, with what we made of it."""
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


async def _move(
    conn: asyncpg.Connection,
    report: Report,
    attempt: asyncpg.Record,
    status: str,
    transaction: str | None,
    invoice: str | None,
    outcome: str,
) -> None:
    """The attempt's new state, the invoice's (None: unchanged) and the report, stored together."""
    await queries.settle_attempt(
        conn, attempt["id"], status, transaction, attempt["invoice_id"], invoice, _callback(report, outcome)
    )


def _callback(report: Report, outcome: str) -> dict[str, Any]:
    """`record_callback`'s fields for a report with a valid signature."""
    return {
        "provider": report.provider,
        "payload": report.payload,
        "signature_valid": True,
        "provider_transaction_id": report.transaction_id,
        "outcome": outcome,
        "source": report.source,
    }


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


async def _tell(
    conn: asyncpg.Connection, attempt: asyncpg.Record, appointment: asyncpg.Record | None, kind: str
) -> None:
    await queries.tell(
        conn, attempt["id"], kind, appointment["booked_by"] if appointment is not None else None
    )
