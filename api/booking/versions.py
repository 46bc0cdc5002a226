"""Coalesced reads of the versions PostgreSQL keeps for booking data (`slot_versions`,
migrations/0006_booking_fast_path.sql), for the per-process caches of availability.

A version is the sum of counters that triggers bump in the transaction of every change that can
move free slots, so a cached answer computed after reading version V is current for as long as
the version still reads V. Every caller gets a version read after it asked (it waits for the
next read if one is already under way), so an answer is never older than the request: a
booking, a cancellation or a schedule change shows at once, in every process. Concurrent callers
share one read: at 64 connections on one doctor, one query serves dozens of requests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Generic, NamedTuple, TypeVar

from api.db import FairPool

K = TypeVar("K")
V = TypeVar("V")


class Coalesced(Generic[K, V]):
    """`get(key)`: the value of `read(key)` from a read that started after the call."""

    def __init__(self, read: Callable[[K], Awaitable[V]]) -> None:
        self._read = read
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._running: dict[K, asyncio.Task[None]] = {}

    async def get(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        # A future per caller: one that gives up cancels its own, not the others'.
        mine: asyncio.Future[V] = loop.create_future()
        self._waiting.setdefault(key, []).append(mine)
        if key not in self._running:
            self._running[key] = loop.create_task(self._reads(key))
        return await mine

    async def _reads(self, key: K) -> None:
        try:
            while (waiting := self._waiting.pop(key, None)) is not None:
                try:
                    value = await self._read(key)
                except Exception as exc:
                    for future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for future in waiting:
                        if not future.done():
                            future.set_result(value)
        finally:
            del self._running[key]


class Scope(NamedTuple):
    """What a version covers: one doctor's or one facility's slots on some clinic days."""

    doctor_id: uuid.UUID | None
    facility_id: uuid.UUID | None
    date_from: dt.date
    date_to: dt.date


class Versions(NamedTuple):
    schedules: int
    """Changes to the schedules themselves (day '-infinity')."""
    days: int
    """Changes to places taken on the days of the scope."""

    def covers(self, other: Versions) -> bool:
        """Data read after this version includes every change `other` counted (both only grow)."""
        return self.schedules >= other.schedules and self.days >= other.days


_DOCTOR = """SELECT coalesce(sum(version) FILTER (WHERE day = '-infinity'), 0)::bigint,
                     coalesce(sum(version) FILTER (WHERE day <> '-infinity'), 0)::bigint
                FROM slot_versions
               WHERE doctor_id = $1 AND (day = '-infinity' OR day BETWEEN $2 AND $3)"""
_FACILITY = _DOCTOR.replace("WHERE doctor_id = $1", "WHERE facility_id = $1")


async def read_versions(pool: FairPool, scope: Scope) -> Versions:
    """The versions of a scope (a doctor's, when it names one: a doctor belongs to one facility)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            _DOCTOR if scope.doctor_id is not None else _FACILITY,
            scope.doctor_id or scope.facility_id,
            scope.date_from,
            scope.date_to,
        )
    assert row is not None
    return Versions(row[0], row[1])
