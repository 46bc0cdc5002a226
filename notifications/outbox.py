"""The outbox's SQL: enqueue inside the caller's transaction, claim due messages, record outcomes.

A worker claims due rows with `FOR UPDATE SKIP LOCKED` in one short statement that moves each
row's `next_attempt_at` one lease ahead; nothing stays locked while it talks to FCM. A worker
killed mid-send leaves its rows to come due again when the lease runs out, so a message is sent
again at most once more and never lost.

Workers are woken by a NOTIFY at the commit of each transaction that enqueues (a trigger on
`notifications`), except where the enqueuer promised to wake them once committed
(`WAKE_AFTER_COMMIT` and `Waker`: a path that enqueues in every one of many short
transactions, whose commits a NOTIFY would serialise).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Mapping, Sequence

import asyncpg
import msgspec

from api.db import FairPool
from notifications.policy import Preferences
from notifications.templates import check_params

log = logging.getLogger("telehealth.notifications")

WAKE_CHANNEL = "notification_outbox"
"""Where the workers LISTEN: a commit that enqueued messages NOTIFYs it (the table's trigger), or
its `Waker` does right after."""
WAKE_AFTER_COMMIT = "set_config('telehealth.wake_after_commit', 'on', true)"
"""SQL that makes the current transaction's enqueues skip the trigger's NOTIFY: the caller
promises to `Waker.wake` once the transaction has committed (migrations/0005)."""


async def enqueue(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    kind: str,
    params: Mapping[str, object],
    dedupe_key: str | None = None,
    *,
    facility_id: uuid.UUID | None = None,
    subject: str | None = None,
) -> uuid.UUID | None:
    """Add a notification for `user_id` as part of the caller's transaction.

    It exists if and only if that transaction commits. A `dedupe_key` already used enqueues
    nothing and returns None. Due now; `subject` names what it is about (`appointment:<id>`) so
    `cancel_pending` can find it.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue a notification inside the transaction of the change it reports")
    checked = check_params(kind, params)
    notification_id: uuid.UUID | None = await conn.fetchval(
        """INSERT INTO notifications
               (user_id, kind, params, facility_id, subject, dedupe_key)
           VALUES ($1, $2, $3::jsonb, $4, $5, $6)
           ON CONFLICT (dedupe_key) DO NOTHING
           RETURNING id""",
        user_id,
        kind,
        msgspec.json.encode(checked).decode(),
        facility_id,
        subject,
        dedupe_key,
    )
    return notification_id


def insert_sql(rows: str) -> str:
    """The outbox's INSERT of the messages a caller's query yields, for a caller that enqueues
    within a statement of its own (often as a data-modifying CTE, so that a message exists if
    and only if the change it reports does). `rows` is that query: columns user_id, kind,
    params (jsonb: exactly what `check_params` accepts for the kind), facility_id, subject and
    dedupe_key. Due now; a dedupe key already used enqueues nothing."""
    return f"""INSERT INTO notifications
               (user_id, kind, params, facility_id, subject, dedupe_key, not_before, next_attempt_at)
           SELECT r.user_id, r.kind, r.params, r.facility_id, r.subject, r.dedupe_key, now(), now()
             FROM ({rows}) AS r
           ON CONFLICT (dedupe_key) DO NOTHING"""


class Waker:
    """Wakes the workers (NOTIFY on `WAKE_CHANNEL`) for transactions that enqueued with
    `WAKE_AFTER_COMMIT`, once they have committed.

    PostgreSQL serialises the commits of transactions that NOTIFY, each one holding a lock across
    its WAL flush: a busy path that enqueues in every transaction (payment callbacks) could not
    commit faster than one flush after another. Here the wake-up goes out after the commit,
    from a connection of its own whose commits need no flush (a wake-up is not data). The
    first one goes at once; those asked for while one is sent, or within `spacing` after it,
    are merged into the next (a woken worker claims whatever is due). A wake-up that fails is
    only logged: the workers' poll (NOTIFICATION_POLL_SECONDS) finds the messages anyway.
    """

    def __init__(self, dsn: str, spacing: float = 0.01) -> None:
        self._dsn = dsn
        self._spacing = spacing
        self._conn: asyncpg.Connection | None = None
        self._due = False
        self._sending: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Ask for a wake-up, after the commit of what it is for; returns at once."""
        self._due = True
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        # Every commit before a send is covered by it: asking again during one sends once more.
        while self._due:
            self._due = False
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._dsn,
                        server_settings={"application_name": "telehealth-wake", "synchronous_commit": "off"},
                    )
                await self._conn.execute(f"SELECT pg_notify('{WAKE_CHANNEL}', '')")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "could not wake the notification workers (%s); their poll will", type(exc).__name__
                )
                await self._drop()
                return
            await asyncio.sleep(self._spacing)

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
            self._conn = None

    async def close(self) -> None:
        """Send what was asked for, then close."""
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending
        await self._drop()


async def cancel_pending(conn: asyncpg.Connection, subject: str, kinds: Sequence[str] | None = None) -> int:
    """Cancel messages about `subject` not pushed yet (a cancelled visit's reminders); they leave the inbox too."""
    result: str = await conn.execute(
        """UPDATE notifications SET push_state = 'cancelled', finished_at = now()
            WHERE subject = $1 AND push_state = 'pending' AND ($2::text[] IS NULL OR kind = ANY($2))""",
        subject,
        list(kinds) if kinds is not None else None,
    )
    return int(result.split()[-1])


class Claimed(msgspec.Struct, frozen=True):
    id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    params: dict[str, str | int]
    attempts: int
    """Including this one."""


class Device(msgspec.Struct, frozen=True):
    id: uuid.UUID
    user_id: uuid.UUID
    token: str
    locale: str


class Batch(msgspec.Struct):
    messages: list[Claimed]
    devices: dict[uuid.UUID, list[Device]]
    """Active devices of each user in the batch."""
    preferences: dict[uuid.UUID, Preferences]
    done: set[tuple[uuid.UUID, uuid.UUID]]
    """(notification, active device) pairs an earlier attempt already finished: not sent again."""
    reached: set[uuid.UUID] = msgspec.field(default_factory=set)
    """Notifications an earlier attempt finished for at least one device (active or not)."""


# One round trip: claim the due rows (moving each a lease ahead) and read, in the same statement,
# what sending them needs: the user's active devices, each with whether an earlier attempt already
# finished it (a retry skips those), and the user's preferences. The due ids are looked up by
# primary key and the devices and preferences by user, each through its index, whatever the
# planner guesses about the table sizes (a hash join read all of `notifications` and `devices`
# on every claim).
_CLAIM = """WITH due AS (
    SELECT id FROM notifications
     WHERE push_state = 'pending' AND next_attempt_at <= $1
     ORDER BY next_attempt_at
     LIMIT $2
     FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE notifications n
       SET next_attempt_at = $1 + $3::interval, attempts = n.attempts + 1
     WHERE n.id = ANY (ARRAY (SELECT id FROM due))
    RETURNING n.id, n.user_id, n.kind, n.params, n.attempts)
SELECT c.id, c.user_id, c.kind, c.params, c.attempts,
       ARRAY (
           SELECT ROW (d.id, d.token, d.locale,
                       c.attempts > 1 AND EXISTS (
                           SELECT 1 FROM push_deliveries pd
                            WHERE pd.notification_id = c.id AND pd.device_id = d.id
                              AND pd.outcome IN ('sent', 'token_rejected')))
             FROM devices d
            WHERE d.user_id = c.user_id AND d.active) AS devices,
       c.attempts > 1 AND EXISTS (
           SELECT 1 FROM push_deliveries pd
            WHERE pd.notification_id = c.id AND pd.outcome IN ('sent', 'token_rejected')) AS reached,
       (SELECT ROW (p.quiet_start, p.quiet_end, p.muted_categories)
          FROM notification_preferences p
         WHERE p.user_id = c.user_id) AS preferences
  FROM claimed c"""


async def claim(pool: FairPool, now: dt.datetime, limit: int, lease: dt.timedelta) -> Batch:
    """Claim up to `limit` due messages for `lease`, with what is needed to send them."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_CLAIM, now, limit, lease)
    batch = Batch(messages=[], devices={}, preferences={}, done=set())
    decode = msgspec.json.decode
    for r in rows:
        message_id, user_id = r["id"], r["user_id"]
        batch.messages.append(Claimed(message_id, user_id, r["kind"], decode(r["params"]), r["attempts"]))
        if r["reached"]:
            batch.reached.add(message_id)
        if (preferences := r["preferences"]) is not None:
            quiet_start, quiet_end, muted = preferences
            batch.preferences[user_id] = Preferences(quiet_start, quiet_end, frozenset(muted))
        if user_id not in batch.devices:
            batch.devices[user_id] = [
                Device(d, user_id, token, locale) for d, token, locale, _ in r["devices"]
            ]
        batch.done.update((message_id, d) for d, _, _, done in r["devices"] if done)
    return batch


class Delivery(msgspec.Struct, frozen=True):
    notification_id: uuid.UUID
    device_id: uuid.UUID
    attempt: int
    outcome: str
    fcm_message_id: str | None
    error: str | None


class Settled(msgspec.Struct, frozen=True):
    """Where a claimed message goes next: `pending` again (at `next_attempt_at`) or a final state."""

    id: uuid.UUID
    state: str
    next_attempt_at: dt.datetime | None = None
    error: str | None = None
    refund_attempt: bool = False
    """Deferred by quiet hours: this claim does not count as an attempt."""


# One statement, so one round trip and atomic without BEGIN/COMMIT: store what FCM answered,
# switch off the devices whose token it rejected, and move each message on. A message cancelled
# while it was being sent stays cancelled.
_RECORD = """WITH delivered AS (
    INSERT INTO push_deliveries (notification_id, device_id, attempt, outcome, fcm_message_id, error, at)
    SELECT n, d, a, o, m, e, $14
      FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[])
           AS u(n, d, a, o, m, e)
    ON CONFLICT DO NOTHING),
switched_off AS (
    UPDATE devices d SET active = false, deactivated_reason = u.reason, updated_at = $14
      FROM unnest($7::uuid[], $8::text[]) AS u(id, reason)
     WHERE d.id = u.id)
UPDATE notifications n
   SET push_state = u.state,
       next_attempt_at = coalesce(u.next_at, n.next_attempt_at),
       attempts = n.attempts - u.refund::int,
       last_error = u.error,
       finished_at = CASE WHEN u.state = 'pending' THEN NULL ELSE $14::timestamptz END
  FROM unnest($9::uuid[], $10::text[], $11::timestamptz[], $12::text[], $13::bool[])
       AS u(id, state, next_at, error, refund)
 WHERE n.id = u.id AND n.push_state = 'pending'
   -- By primary key: given the array itself, the planner scanned the whole table on every record.
   AND n.id = ANY (ARRAY (SELECT unnest($9::uuid[])))"""


async def record(
    pool: FairPool,
    now: dt.datetime,
    deliveries: Sequence[Delivery],
    rejected_tokens: Mapping[uuid.UUID, str],
    settled: Sequence[Settled],
) -> None:
    """Store what FCM answered, switch off rejected devices and move each message on, atomically."""
    async with pool.acquire() as conn:
        await conn.execute(
            _RECORD,
            [d.notification_id for d in deliveries],
            [d.device_id for d in deliveries],
            [d.attempt for d in deliveries],
            [d.outcome for d in deliveries],
            [d.fcm_message_id for d in deliveries],
            [d.error for d in deliveries],
            list(rejected_tokens),
            list(rejected_tokens.values()),
            [s.id for s in settled],
            [s.state for s in settled],
            [s.next_attempt_at for s in settled],
            [s.error for s in settled],
            [s.refund_attempt for s in settled],
            now,
        )


async def requeue_dead(
    conn: asyncpg.Connection, facility_id: uuid.UUID, notification_id: uuid.UUID
) -> asyncpg.Record | None:
    """Give a dead-lettered message a fresh set of attempts, due now."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE notifications
               SET push_state = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL
             WHERE id = $1 AND facility_id = $2 AND push_state = 'dead'
         RETURNING {DEAD_LETTER_COLUMNS}""",
        notification_id,
        facility_id,
    )
    return row


DEAD_LETTER_COLUMNS = "id, user_id, kind, attempts, last_error, created_at, finished_at, push_state"


async def list_dead(
    conn: asyncpg.Connection, facility_id: uuid.UUID, after: tuple[dt.datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {DEAD_LETTER_COLUMNS} FROM notifications
             WHERE facility_id = $1 AND push_state = 'dead'
               AND ($2::timestamptz IS NULL OR (finished_at, id) < ($2, $3::uuid))
             ORDER BY finished_at DESC, id DESC LIMIT $4""",
        facility_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return rows
