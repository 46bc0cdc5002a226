"""The notification worker: claim due messages, render them, push them, record what happened.

Runs as `telehealth worker` (several processes may run at once) or inside the API process in
dev; both run `Worker.run`. Claims are `FOR UPDATE SKIP LOCKED`, so workers never pick the
same message, and a claim is a lease: a worker that dies mid-send leaves its messages to come
due again when the lease ends (sent again at most once more, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import uuid
from collections.abc import Callable

import asyncpg
import msgspec

from api.db import FairPool
from notifications import outbox
from notifications.policy import Preferences, push_decision, retry_delay
from notifications.push import FcmSender, Push, PushResult
from notifications.templates import TEMPLATES, render

log = logging.getLogger("telehealth.notifications")
WAKE_CHANNEL = outbox.WAKE_CHANNEL


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Pass(msgspec.Struct):
    """What one claim-and-send pass did."""

    claimed: int = 0
    pushed: int = 0
    """Device messages FCM accepted."""
    failed: int = 0
    """Device messages that failed and will be retried (or dead-lettered)."""
    deferred: int = 0


class Worker:
    def __init__(
        self,
        pool: FairPool,
        sender: FcmSender,
        *,
        batch_size: int,
        max_attempts: int,
        lease: dt.timedelta,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: Callable[[], float] = random.random,
        lanes: int = 2,
    ) -> None:
        self.pool = pool
        self.sender = sender
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.lease = lease
        self.clock = clock
        self.rng = rng
        self.lanes = lanes
        """Passes `run` keeps going at once (see there)."""

    async def run_once(self) -> Pass:
        """Claim one batch of due messages and deal with each of them."""
        now = self.clock()
        batch = await outbox.claim(self.pool, now, self.batch_size, self.lease)
        result = Pass(claimed=len(batch.messages))
        if not batch.messages:
            return result
        pushes: list[tuple[outbox.Claimed, Push]] = []
        settled: list[outbox.Settled] = []
        for message in batch.messages:
            template = TEMPLATES[message.kind]
            decision = push_decision(now, batch.preferences.get(message.user_id, Preferences()), template)
            if isinstance(decision, dt.datetime):
                settled.append(
                    outbox.Settled(message.id, "pending", next_attempt_at=decision, refund_attempt=True)
                )
                result.deferred += 1
                continue
            devices = [
                d for d in batch.devices.get(message.user_id, []) if (message.id, d.id) not in batch.done
            ]
            if decision == "skip" or not devices:
                sent_before = message.id in batch.reached
                state = "sent" if sent_before else "skipped"
                settled.append(
                    outbox.Settled(message.id, state, error=None if sent_before else _why_skipped(decision))
                )
                continue
            try:
                rendered = {
                    locale: render(message.kind, message.params, locale, message.id)
                    for locale in ("vi", "en")
                }
            except (KeyError, ValueError, TypeError) as exc:
                # A row no template can render (edited by hand, or a kind since removed) must not
                # hold up the batch it came in: it goes to the dead letters for staff to see.
                settled.append(outbox.Settled(message.id, "dead", error=f"cannot render: {exc!r}"[:500]))
                continue
            for device in devices:
                text = rendered["en" if device.locale == "en" else "vi"]
                pushes.append((message, Push(device.id, device.token, text.title, text.body, text.data)))
        results = await self.sender.send([push for _, push in pushes]) if pushes else []
        deliveries, rejected = self._deliveries(pushes, results)
        result.pushed = sum(r.outcome == "sent" for r in results)
        result.failed = sum(r.outcome == "failed" for r in results)
        settled.extend(self._settle(now, pushes, results))
        await outbox.record(self.pool, self.clock(), deliveries, rejected, settled)
        return result

    @staticmethod
    def _deliveries(
        pushes: list[tuple[outbox.Claimed, Push]], results: list[PushResult]
    ) -> tuple[list[outbox.Delivery], dict[uuid.UUID, str]]:
        deliveries = []
        rejected: dict[uuid.UUID, str] = {}
        for (message, push), result in zip(pushes, results, strict=True):
            deliveries.append(
                outbox.Delivery(
                    message.id,
                    push.device_id,
                    message.attempts,
                    result.outcome,
                    result.message_id,
                    result.error,
                )
            )
            if result.outcome == "token_rejected":
                rejected[push.device_id] = result.error or "rejected"
        return deliveries, rejected

    def _settle(
        self, now: dt.datetime, pushes: list[tuple[outbox.Claimed, Push]], results: list[PushResult]
    ) -> list[outbox.Settled]:
        """A message is done when no device failed transiently; otherwise it is retried, or dead at the limit."""
        failures: dict[uuid.UUID, list[str]] = {}
        messages: dict[uuid.UUID, outbox.Claimed] = {}
        for (message, _), result in zip(pushes, results, strict=True):
            messages[message.id] = message
            if result.outcome == "failed":
                failures.setdefault(message.id, []).append(result.error or "failed")
        settled = []
        for message_id, message in messages.items():
            errors = failures.get(message_id)
            if not errors:
                settled.append(outbox.Settled(message.id, "sent"))
            elif message.attempts >= self.max_attempts:
                settled.append(outbox.Settled(message.id, "dead", error=errors[0]))
            else:
                retry_at = now + retry_delay(message.attempts, self.rng)
                settled.append(
                    outbox.Settled(message.id, "pending", next_attempt_at=retry_at, error=errors[0])
                )
        return settled

    async def drain(self) -> Pass:
        """Run passes until nothing is due; the totals. Used by tests and the benchmark."""
        total = Pass()
        while (one := await self.run_once()).claimed:
            total.claimed += one.claimed
            total.pushed += one.pushed
            total.failed += one.failed
            total.deferred += one.deferred
        return total

    async def run(self, database_url: str, stop: asyncio.Event, poll_seconds: float) -> None:
        """Work until `stop` is set: pass after pass while messages are due, then wait for the
        next commit that enqueues one (LISTEN) or `poll_seconds` (scheduled ones, retries).

        `lanes` passes run at once, each claiming its own batch as a separate worker would, so
        one lane sends while another waits for PostgreSQL to claim or record. Two lanes are as
        safe as two worker processes: a claim is `SKIP LOCKED` and moves its rows a lease ahead,
        so no other lane can claim them before their pass records them."""
        wakes = [asyncio.Event() for _ in range(self.lanes)]

        def wake_all(*_: object) -> None:
            for wake in wakes:
                wake.set()

        listener = await asyncpg.connect(database_url)
        await listener.add_listener(WAKE_CHANNEL, wake_all)
        try:
            await asyncio.gather(*(self._lane(wake, stop, poll_seconds) for wake in wakes))
        finally:
            with contextlib.suppress(Exception):
                await listener.close()

    async def _lane(self, wake: asyncio.Event, stop: asyncio.Event, poll_seconds: float) -> None:
        while not stop.is_set():
            wake.clear()
            try:
                claimed = (await self.run_once()).claimed
            except Exception:
                # The database or FCM went away mid-pass: what was claimed comes due again when
                # its lease ends. Keep the worker alive and try again after a pause.
                log.exception("notification pass failed; trying again")
                claimed = 0
            if claimed:
                continue
            stopping = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait({stopping, woken}, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (stopping, woken):
                waiter.cancel()


def _why_skipped(decision: str) -> str:
    return "category muted" if decision == "skip" else "no active device"
