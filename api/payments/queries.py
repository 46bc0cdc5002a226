"""All SQL of payments: accounts, invoices, attempts, callbacks, the ledger, refunds, transfers."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import msgspec

from api.payments.ledger import invoice_status

INVOICE = (
    "i.id, i.patient_id, i.facility_id, i.service_id, i.amount_vnd, i.status, i.created_at, "
    "(SELECT a.id FROM appointments a WHERE a.invoice_id = i.id) AS appointment_id"
)
ATTEMPT = (
    "p.id, p.invoice_id, p.provider, p.order_ref, p.amount_vnd, p.status, p.expires_at, "
    "p.provider_transaction_id, p.redirect_url, p.deeplink, p.qr_payload, p.created_at"
)
# The patient, their guardian, or staff of the invoice's facility.
MAY_SEE = """(i.patient_id = $1
     OR EXISTS (SELECT 1 FROM guardianships g WHERE g.guardian_id = $1 AND g.dependent_id = i.patient_id)
     OR i.facility_id = ANY($2::uuid[]))"""


async def account(conn: asyncpg.Connection, facility_id: uuid.UUID, provider: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT enabled, config, secrets FROM payment_accounts WHERE facility_id = $1 AND provider = $2",
        facility_id,
        provider,
    )
    return row


async def invoice_for(
    conn: asyncpg.Connection, user_id: uuid.UUID, staff_facilities: list[uuid.UUID], invoice_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {INVOICE} FROM invoices i WHERE i.id = $3 AND {MAY_SEE}",
        user_id,
        staff_facilities,
        invoice_id,
    )
    return row


async def invoices_for(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    staff_facilities: list[uuid.UUID],
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {INVOICE} FROM invoices i WHERE {MAY_SEE}
               AND ($3::timestamptz IS NULL OR (i.created_at, i.id) < ($3, $4::uuid))
             ORDER BY i.created_at DESC, i.id DESC LIMIT $5""",
        user_id,
        staff_facilities,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return rows


async def lock_invoice(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {INVOICE} FROM invoices i WHERE i.id = $1 FOR UPDATE OF i", invoice_id
    )
    return row


async def attempts_of(conn: asyncpg.Connection, invoice_ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {ATTEMPT} FROM payment_attempts p WHERE p.invoice_id = ANY($1) ORDER BY p.created_at",
        invoice_ids,
    )
    return rows


async def insert_attempt(conn: asyncpg.Connection, values: dict[str, Any]) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""INSERT INTO payment_attempts AS p (id, invoice_id, provider, order_ref, amount_vnd, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ATTEMPT}""",
        values["id"],
        values["invoice_id"],
        values["provider"],
        values["order_ref"],
        values["amount_vnd"],
        values["expires_at"],
    )
    assert row is not None
    return row


async def set_attempt_links(
    conn: asyncpg.Connection,
    attempt_id: uuid.UUID,
    redirect_url: str | None,
    deeplink: str | None,
    qr_payload: str | None,
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""UPDATE payment_attempts p SET redirect_url = $2, deeplink = $3, qr_payload = $4, updated_at = now()
             WHERE p.id = $1 RETURNING {ATTEMPT}""",
        attempt_id,
        redirect_url,
        deeplink,
        qr_payload,
    )
    assert row is not None
    return row


async def attempt_by_ref(conn: asyncpg.Connection, provider: str, order_ref: str) -> asyncpg.Record | None:
    """The attempt a callback is about, locked with its invoice (payments of one invoice queue here)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {ATTEMPT} FROM payment_attempts p JOIN invoices i ON i.id = p.invoice_id
             WHERE p.provider = $1 AND p.order_ref = $2 FOR UPDATE OF p, i""",
        provider,
        order_ref,
    )
    return row


async def record_callback(
    conn: asyncpg.Connection,
    *,
    provider: str,
    payload: dict[str, object],
    signature_valid: bool,
    attempt_id: uuid.UUID | None,
    provider_transaction_id: str | None,
    outcome: str,
    source: str,
) -> None:
    await conn.execute(
        """INSERT INTO payment_callbacks
               (provider, payload, signature_valid, attempt_id, provider_transaction_id, outcome, source)
           VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7)""",
        provider,
        msgspec.json.encode(payload).decode(),
        signature_valid,
        attempt_id,
        provider_transaction_id,
        outcome,
        source,
    )


async def claim_transaction(
    conn: asyncpg.Connection, provider: str, provider_transaction_id: str, attempt_id: uuid.UUID
) -> bool:
    """True the first time this provider transaction is applied; False for every duplicate."""
    inserted = await conn.fetchval(
        """INSERT INTO applied_transactions (provider, provider_transaction_id, attempt_id)
           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true""",
        provider,
        provider_transaction_id,
        attempt_id,
    )
    return bool(inserted)


async def set_attempt_status(
    conn: asyncpg.Connection, attempt_id: uuid.UUID, status: str, provider_transaction_id: str | None
) -> None:
    await conn.execute(
        """UPDATE payment_attempts SET status = $2, provider_transaction_id = coalesce($3, provider_transaction_id),
                  updated_at = now() WHERE id = $1""",
        attempt_id,
        status,
        provider_transaction_id,
    )


async def paid_attempt(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {ATTEMPT} FROM payment_attempts p WHERE p.invoice_id = $1 AND p.status = 'paid'", invoice_id
    )
    return row


async def add_ledger_entry(
    conn: asyncpg.Connection,
    invoice_id: uuid.UUID,
    attempt_id: uuid.UUID | None,
    kind: str,
    amount_vnd: int,
    provider: str,
    reference: str | None,
) -> str:
    """Append one movement of money, then store the invoice state the whole ledger implies."""
    await conn.execute(
        """INSERT INTO ledger_entries (invoice_id, attempt_id, kind, amount_vnd, provider, reference)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        invoice_id,
        attempt_id,
        kind,
        amount_vnd,
        provider,
        reference,
    )
    return await refresh_invoice_status(conn, invoice_id)


async def refresh_invoice_status(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> str:
    row = await conn.fetchrow(
        """SELECT i.status, i.amount_vnd,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'payment'), 0) AS paid,
                  coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'refund'), 0) AS refunded
             FROM invoices i LEFT JOIN ledger_entries l ON l.invoice_id = i.id
            WHERE i.id = $1 GROUP BY i.id""",
        invoice_id,
    )
    assert row is not None
    status = invoice_status(row["amount_vnd"], row["paid"], row["refunded"], voided=row["status"] == "void")
    if status != row["status"]:
        await conn.execute(
            "UPDATE invoices SET status = $2, updated_at = now() WHERE id = $1", invoice_id, status
        )
    return status


async def ledger_totals(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> tuple[int, int]:
    row = await conn.fetchrow(
        """SELECT coalesce(sum(amount_vnd) FILTER (WHERE kind = 'payment'), 0) AS paid,
                  coalesce(sum(amount_vnd) FILTER (WHERE kind = 'refund'), 0) AS refunded
             FROM ledger_entries WHERE invoice_id = $1""",
        invoice_id,
    )
    assert row is not None
    return int(row["paid"]), int(row["refunded"])


async def request_refund(
    conn: asyncpg.Connection,
    invoice_id: uuid.UUID,
    attempt_id: uuid.UUID,
    amount_vnd: int,
    reason: str,
    manual: bool,
) -> uuid.UUID:
    refund_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO refunds (invoice_id, attempt_id, amount_vnd, status, reason)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        invoice_id,
        attempt_id,
        amount_vnd,
        "manual" if manual else "requested",
        reason,
    )
    return refund_id


async def keep_unmatched(
    conn: asyncpg.Connection, notice: Any, reason: str, facility_id: uuid.UUID | None
) -> bool:
    """Keep a transfer nobody could match for staff; False when that reference was already kept."""
    inserted = await conn.fetchval(
        """INSERT INTO unmatched_transfers (reference, account, amount_vnd, memo, received_at, reason, facility_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (reference) DO NOTHING RETURNING true""",
        notice.reference,
        notice.account,
        notice.amount,
        notice.memo,
        notice.received_at,
        reason,
        facility_id,
    )
    return bool(inserted)


async def appointment_of_invoice(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> uuid.UUID | None:
    appointment_id: uuid.UUID | None = await conn.fetchval(
        "SELECT id FROM appointments WHERE invoice_id = $1", invoice_id
    )
    return appointment_id


async def unanswered_attempts(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Pending attempts past their expiry that no callback settled: reconciliation asks the provider.

    SKIP LOCKED: a callback settling one right now keeps it; `last_checked_at` spaces the asking.
    """
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {ATTEMPT}, i.facility_id FROM payment_attempts p JOIN invoices i ON i.id = p.invoice_id
             WHERE p.status = 'pending' AND p.expires_at < now() AND p.provider <> 'vietqr'
               AND (p.last_checked_at IS NULL OR p.last_checked_at < now() - interval '1 minute')
             ORDER BY p.expires_at LIMIT $1 FOR UPDATE OF p SKIP LOCKED""",
        limit,
    )
    if rows:
        await conn.execute(
            "UPDATE payment_attempts SET last_checked_at = now() WHERE id = ANY($1)", [r["id"] for r in rows]
        )
    return rows


async def find_attempt(conn: asyncpg.Connection, provider: str, order_ref: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {ATTEMPT} FROM payment_attempts p WHERE p.provider = $1 AND p.order_ref = $2",
        provider,
        order_ref,
    )
    return row


async def invoice_recipients(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await conn.fetch(
        """SELECT patient_id AS id FROM invoices WHERE id = $1
           UNION SELECT booked_by FROM appointments WHERE invoice_id = $1""",
        invoice_id,
    )
    return [r["id"] for r in rows]


async def facility_of_invoice(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> uuid.UUID:
    facility_id: uuid.UUID = await conn.fetchval("SELECT facility_id FROM invoices WHERE id = $1", invoice_id)
    return facility_id


async def expire_unanswerable(conn: asyncpg.Connection) -> None:
    """VietQR attempts have no query API: past their time they expire (a late transfer still settles)."""
    await conn.execute(
        """UPDATE payment_attempts SET status = 'expired', updated_at = now()
            WHERE provider = 'vietqr' AND status = 'pending' AND expires_at < now()"""
    )


async def expire_attempt(conn: asyncpg.Connection, attempt_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE payment_attempts SET status = 'expired', updated_at = now() WHERE id = $1 AND status = 'pending'",
        attempt_id,
    )


async def refunds_in_flight(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> int:
    """Money already asked back but not yet confirmed (so two requests cannot refund it twice)."""
    total: int = await conn.fetchval(
        "SELECT coalesce(sum(amount_vnd), 0) FROM refunds WHERE invoice_id = $1 AND status IN ('requested', 'manual')",
        invoice_id,
    )
    return int(total)


async def claim_requested_refunds(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT r.id, r.invoice_id, r.attempt_id, r.amount_vnd, r.provider_refund_id, p.provider, p.order_ref, p.provider_transaction_id,
                  p.amount_vnd AS attempt_amount_vnd, p.created_at AS attempt_created_at, i.facility_id
             FROM refunds r JOIN payment_attempts p ON p.id = r.attempt_id JOIN invoices i ON i.id = r.invoice_id
            WHERE r.status = 'requested'
              -- never tried, or tried more than 30 s ago (the provider was not answering)
              AND (r.updated_at = r.created_at OR r.updated_at < now() - interval '30 seconds')
            ORDER BY r.created_at LIMIT $1 FOR UPDATE OF r SKIP LOCKED""",
        limit,
    )
    if rows:
        await conn.execute(
            "UPDATE refunds SET updated_at = now() WHERE id = ANY($1)", [r["id"] for r in rows]
        )
    return rows


async def finish_refund(
    conn: asyncpg.Connection, refund_id: uuid.UUID, reference: str, from_status: str
) -> asyncpg.Record | None:
    """Mark a refund done; None when it was no longer in `from_status` (someone else finished it)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """UPDATE refunds r SET status = 'done', provider_refund_id = $2, updated_at = now()
             FROM payment_attempts p
            WHERE r.id = $1 AND r.status = $3 AND p.id = r.attempt_id
        RETURNING r.invoice_id, r.attempt_id, r.amount_vnd, p.provider""",
        refund_id,
        reference,
        from_status,
    )
    return row


REFUND = (
    "r.id, r.invoice_id, r.amount_vnd, r.status, r.reason, r.provider_refund_id, r.created_at, i.facility_id"
)


async def refund_at(
    conn: asyncpg.Connection, refund_id: uuid.UUID, facilities: list[uuid.UUID]
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {REFUND} FROM refunds r JOIN invoices i ON i.id = r.invoice_id
             WHERE r.id = $1 AND i.facility_id = ANY($2)""",
        refund_id,
        facilities,
    )
    return row


async def refunds_at(
    conn: asyncpg.Connection,
    facilities: list[uuid.UUID],
    status: str | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {REFUND} FROM refunds r JOIN invoices i ON i.id = r.invoice_id
             WHERE i.facility_id = ANY($1) AND ($2::text IS NULL OR r.status = $2)
               AND ($3::timestamptz IS NULL OR (r.created_at, r.id) > ($3, $4))
             ORDER BY r.created_at, r.id LIMIT $5""",
        facilities,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return rows


async def note_refund_reference(conn: asyncpg.Connection, refund_id: uuid.UUID, reference: str) -> None:
    """The provider's id for a refund it is still processing, to ask about it later."""
    await conn.execute("UPDATE refunds SET provider_refund_id = $2 WHERE id = $1", refund_id, reference)
