"""All SQL of payments: accounts, invoices, attempts, callbacks, the ledger, refunds, transfers."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import msgspec

from api.payments.ledger import invoice_status
from notifications import outbox

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


async def lock_attempt(
    conn: asyncpg.Connection, attempt_id: uuid.UUID, claim: tuple[str, str] | None
) -> asyncpg.Record | None:
    """The attempt a report is about, locked with its invoice (payments of one invoice queue here),
    with the invoice's state; and, when `claim` (provider, provider transaction id) is given,
    that transaction claimed for the attempt in the same statement.

    `claimed` is true the first time the transaction is applied and false for every duplicate
    (and without `claim`). The claim is made once the locks are held: a duplicate racing its
    original waits for the locks, then finds the transaction taken (`ON CONFLICT` sees the
    committed row).
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""WITH locked AS (
                SELECT {ATTEMPT}, i.status AS invoice_status, i.amount_vnd AS invoice_amount_vnd,
                       i.facility_id, i.patient_id,
                       (SELECT a.id FROM appointments a WHERE a.invoice_id = i.id) AS appointment_id
                  FROM payment_attempts p JOIN invoices i ON i.id = p.invoice_id
                 WHERE p.id = $1 FOR UPDATE OF p, i),
            claimed AS (
                INSERT INTO applied_transactions (provider, provider_transaction_id, attempt_id)
                SELECT $2::text, $3::text, locked.id FROM locked WHERE $2::text IS NOT NULL
                ON CONFLICT DO NOTHING RETURNING true)
            SELECT locked.*, EXISTS (SELECT FROM claimed) AS claimed FROM locked""",
        attempt_id,
        claim[0] if claim else None,
        claim[1] if claim else None,
    )
    return row


# An attempt with what settling a report about it needs first: its invoice's facility, patient and
# amount, the appointment the invoice pays for (None: none) and that facility's own account for
# the provider (all NULL: none, the default account).
_FOUND = f"""SELECT {ATTEMPT}, i.facility_id, i.patient_id, i.amount_vnd AS invoice_amount_vnd,
       (SELECT a.id FROM appointments a WHERE a.invoice_id = p.invoice_id) AS appointment_id,
       pa.enabled AS account_enabled, pa.config AS account_config, pa.secrets AS account_secrets
  FROM payment_attempts p JOIN invoices i ON i.id = p.invoice_id
  LEFT JOIN payment_accounts pa ON pa.facility_id = i.facility_id AND pa.provider = p.provider"""


# The messages about an attempt's fate (`kind`: payment_received or payment_failed) to the
# invoice's patient and to whoever booked its appointment ({booker}: NULL when nobody else), one
# per person and attempt, as rows for `outbox.insert_sql`. {source}: rows with the attempt's id,
# invoice_id, amount_vnd, and its invoice's patient_id and facility_id; {kind} and {booker} are
# SQL expressions (parameters).
_MESSAGES = """
    SELECT DISTINCT u.user_id, {kind} AS kind,
           CASE {kind} WHEN 'payment_received'
                THEN jsonb_build_object('invoice_id', m.invoice_id, 'amount', m.amount_vnd)
                ELSE jsonb_build_object('invoice_id', m.invoice_id) END AS params,
           m.facility_id, 'invoice:' || m.invoice_id AS subject,
           format('payment:%s:%s:%s', m.id, {kind}, u.user_id) AS dedupe_key
      FROM {source}, unnest(ARRAY[m.patient_id, {booker}]) AS u (user_id)
     WHERE u.user_id IS NOT NULL"""


async def tell(conn: asyncpg.Connection, attempt_id: uuid.UUID, kind: str, booker: uuid.UUID | None) -> None:
    """Enqueue the messages about an attempt's fate (`_MESSAGES`)."""
    source = """(SELECT p.id, p.invoice_id, p.amount_vnd, i.patient_id, i.facility_id
                  FROM payment_attempts p JOIN invoices i ON i.id = p.invoice_id WHERE p.id = $1) AS m"""
    await conn.execute(
        outbox.insert_sql(_MESSAGES.format(source=source, kind="$2::text", booker="$3::uuid")),
        attempt_id,
        kind,
        booker,
    )


# A report settled in one statement when the rows it finds decide it (see `apply_report`).
_APPLY = f"""
WITH found AS ({_FOUND} WHERE p.provider = $1 AND p.order_ref = $2),
checked AS (
    SELECT f.*,
           CASE WHEN f.id IS NULL THEN CASE WHEN $6::boolean THEN 'unknown_order' END
                WHEN $6::boolean AND f.account_enabled IS NOT NULL THEN NULL
                WHEN f.appointment_id IS DISTINCT FROM $7::uuid THEN NULL
                WHEN $4::bigint <> f.amount_vnd THEN 'wrong_amount'
                WHEN $3::text = 'pending' THEN 'pending'
                ELSE 'lock'
           END AS step
      FROM (VALUES (true)) AS one (x) LEFT JOIN found f ON true),
locked AS (
    SELECT p.id, p.status, i.status AS invoice_status
      FROM checked c, payment_attempts p, invoices i
     WHERE c.step = 'lock' AND p.id = c.id AND i.id = c.invoice_id
       FOR UPDATE OF p, i),
plan AS (
    SELECT l.*,
           CASE WHEN $3::text = 'failed' THEN CASE WHEN l.status = 'pending' THEN 'fail' ELSE 'ignore' END
                WHEN l.status IN ('paid', 'refunded') THEN 'claim'
                WHEN l.invoice_status IN ('pending', 'void') THEN 'pay'
           END AS step
      FROM locked l),
claimed AS (
    INSERT INTO applied_transactions (provider, provider_transaction_id, attempt_id)
    SELECT $1, $5::text, plan.id FROM plan WHERE plan.step IN ('claim', 'pay')
    ON CONFLICT DO NOTHING RETURNING attempt_id),
decided AS (
    SELECT c.*, plan.invoice_status,
           CASE WHEN c.step <> 'lock' THEN c.step
                WHEN plan.step = 'fail' THEN 'failed'
                WHEN plan.step = 'ignore' THEN 'late_failure_ignored'
                WHEN plan.step = 'pay' AND EXISTS (SELECT FROM claimed) THEN 'paid'
                WHEN plan.step IS NOT NULL THEN 'duplicate'
           END AS outcome
      FROM checked c LEFT JOIN plan ON plan.id = c.id),
ledger AS (
    INSERT INTO ledger_entries (invoice_id, attempt_id, kind, amount_vnd, provider, reference)
    SELECT d.invoice_id, d.id, 'payment', d.amount_vnd, $1, $5::text FROM decided d WHERE d.outcome = 'paid'),
attempt AS (
    UPDATE payment_attempts p
       SET status = d.outcome, provider_transaction_id = coalesce($5::text, p.provider_transaction_id),
           updated_at = now()
      FROM decided d WHERE p.id = d.id AND d.outcome IN ('paid', 'failed')),
invoice AS (
    UPDATE invoices i
       SET status = CASE d.invoice_status WHEN 'void' THEN $11::text ELSE $10::text END, updated_at = now()
      FROM decided d
     WHERE i.id = d.invoice_id AND d.outcome = 'paid'
       AND i.status <> CASE d.invoice_status WHEN 'void' THEN $11::text ELSE $10::text END),
told AS ({
    outbox.insert_sql(
        _MESSAGES.format(
            source="(SELECT * FROM decided WHERE outcome IN ('paid', 'failed')) AS m",
            kind="$9::text",
            booker="$8::uuid",
        )
    )
}),
kept AS (
    INSERT INTO payment_callbacks
        (provider, payload, signature_valid, attempt_id, provider_transaction_id, outcome, source)
    SELECT $1, $12::jsonb, true, d.id, $13::text, d.outcome, $14::text
      FROM decided d WHERE d.outcome IS NOT NULL)
SELECT d.*, CASE WHEN $15::boolean THEN {outbox.WAKE_AFTER_COMMIT} END AS wake_after_commit
  FROM decided d"""


async def apply_report(
    conn: asyncpg.Connection,
    *,
    provider: str,
    order_ref: str,
    outcome: str,
    amount_vnd: int | None,
    transaction: str | None,
    default_account: bool,
    appointment: tuple[uuid.UUID, uuid.UUID] | None,
    kind: str,
    invoice_paid: tuple[str, str],
    payload: dict[str, object],
    provider_transaction_id: str | None,
    source: str,
    wake_after_commit: bool,
) -> asyncpg.Record:
    """A report about the attempt (`provider`, `order_ref`) settled in one statement when the rows
    it finds decide it: `outcome` (a callback outcome) is None otherwise, and nothing was written.
    The row also holds the attempt as `find_attempt` finds it (all None: unknown order).

    The statement finds the attempt, stores a report about an unknown order, a wrong amount
    (`amount_vnd`, None: not reported) or a pending payment, else locks the attempt and its
    invoice and applies the report. `outcome` paid: `transaction` is claimed for `provider`
    (`applied_transactions`); a claim already made or an attempt already paid is a `duplicate`;
    else the ledger gets the payment, the attempt is `paid` (with `transaction`), the invoice
    `invoice_paid` (from `pending`, from `void`) and `kind` goes out (`_MESSAGES`). `outcome`
    failed: a pending attempt is `failed` (with `transaction`, if any) and `kind` goes out; any
    other is `late_failure_ignored`. The report (`payload`, redacted, `provider_transaction_id`
    and `source`, as `record_callback` takes them) is stored in every case.

    Nothing is decided when the invoice already holds money (paid twice, refunded): an invoice
    still `pending` or `void` has no payment in its ledger (its state is recomputed at every
    entry), so no attempt of it is paid and its totals after this payment are this payment
    alone, but otherwise the caller must read them under the locks (`add_payment`). Nor when the
    order's appointment is not `appointment` ((id, booked_by) of the one the caller locked;
    None: no appointment), or with `default_account` (the caller verified the report with the
    provider's default account, not knowing the order) when the order's facility has an
    account of its own, or the order is unknown and the default account is not its account.
    `wake_after_commit`: the transaction's enqueues do not NOTIFY, the caller wakes the workers
    once it has committed (`outbox.Waker`).
    """
    row = await conn.fetchrow(
        _APPLY,
        provider,
        order_ref,
        outcome,
        amount_vnd,
        transaction,
        default_account,
        appointment[0] if appointment else None,
        appointment[1] if appointment else None,
        kind,
        invoice_paid[0],
        invoice_paid[1],
        msgspec.json.encode(payload).decode(),
        provider_transaction_id,
        source,
        wake_after_commit,
    )
    assert row is not None
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


async def settle_attempt(
    conn: asyncpg.Connection,
    attempt_id: uuid.UUID,
    status: str,
    provider_transaction_id: str | None,
    invoice_id: uuid.UUID,
    invoice_status: str | None,
    callback: dict[str, Any],
) -> None:
    """The attempt's new state, the invoice's (None: unchanged) and the report that moved them
    (`record_callback`'s fields), in one statement."""
    await conn.execute(
        """WITH attempt AS (
                UPDATE payment_attempts
                   SET status = $2, provider_transaction_id = coalesce($3, provider_transaction_id),
                       updated_at = now()
                 WHERE id = $1),
            invoice AS (
                UPDATE invoices SET status = $5, updated_at = now()
                 WHERE id = $4 AND $5::text IS NOT NULL AND status <> $5)
           INSERT INTO payment_callbacks
               (provider, payload, signature_valid, attempt_id, provider_transaction_id, outcome, source)
           VALUES ($6, $7::jsonb, $8, $1, $9, $10, $11)""",
        attempt_id,
        status,
        provider_transaction_id,
        invoice_id,
        invoice_status,
        callback["provider"],
        msgspec.json.encode(callback["payload"]).decode(),
        callback["signature_valid"],
        callback["provider_transaction_id"],
        callback["outcome"],
        callback["source"],
    )


async def paid_attempt(conn: asyncpg.Connection, invoice_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {ATTEMPT} FROM payment_attempts p WHERE p.invoice_id = $1 AND p.status = 'paid'", invoice_id
    )
    return row


# Appends one entry and returns the invoice's totals with it: the new row is not visible to the
# statement that inserts it, so it is added to the rows that were there.
_APPEND_LEDGER = """
    entry AS (
        INSERT INTO ledger_entries (invoice_id, attempt_id, kind, amount_vnd, provider, reference)
        VALUES ($1, $2, $3, $4, $5, $6) RETURNING kind, amount_vnd),
    totals AS (
        SELECT coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'payment'), 0) AS paid,
               coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'refund'), 0) AS refunded
          FROM (SELECT kind, amount_vnd FROM ledger_entries WHERE invoice_id = $1
                UNION ALL SELECT kind, amount_vnd FROM entry) l)"""


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
    row = await conn.fetchrow(
        f"""WITH {_APPEND_LEDGER}
            SELECT i.status, i.amount_vnd, totals.paid, totals.refunded
              FROM invoices i, totals WHERE i.id = $1""",
        invoice_id,
        attempt_id,
        kind,
        amount_vnd,
        provider,
        reference,
    )
    assert row is not None
    status = invoice_status(row["amount_vnd"], row["paid"], row["refunded"], voided=row["status"] == "void")
    if status != row["status"]:
        await conn.execute(
            "UPDATE invoices SET status = $2, updated_at = now() WHERE id = $1", invoice_id, status
        )
    return status


async def add_payment(
    conn: asyncpg.Connection,
    invoice_id: uuid.UUID,
    attempt_id: uuid.UUID,
    amount_vnd: int,
    provider: str,
    reference: str,
) -> asyncpg.Record:
    """Append a payment to the ledger; the invoice's totals with it (`paid`, `refunded`) and
    `earlier`, the invoice's attempt that was already paid (None: this one is the first).

    Run with the attempt and its invoice locked, which every payment of the invoice takes, so
    `earlier` cannot be missed. The caller stores the invoice state the totals imply
    (`settle_attempt`).
    """
    row = await conn.fetchrow(
        f"""WITH {_APPEND_LEDGER}
            SELECT totals.paid, totals.refunded,
                   (SELECT p.id FROM payment_attempts p
                     WHERE p.invoice_id = $1 AND p.status = 'paid' AND p.id <> $2 LIMIT 1) AS earlier
              FROM totals""",
        invoice_id,
        attempt_id,
        "payment",
        amount_vnd,
        provider,
        reference,
    )
    assert row is not None
    return row


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
    """The attempt a report names (not locked), with its invoice's facility, patient and amount,
    its appointment and its account."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_FOUND} WHERE p.provider = $1 AND p.order_ref = $2", provider, order_ref
    )
    return row


async def find_vietqr_attempt(conn: asyncpg.Connection, memos: list[str]) -> asyncpg.Record | None:
    """As `find_attempt`, for the first of these candidate memos that names a VietQR attempt."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""{_FOUND} WHERE p.provider = 'vietqr' AND p.order_ref = ANY($1::text[])
             ORDER BY array_position($1::text[], p.order_ref) LIMIT 1""",
        memos,
    )
    return row


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
