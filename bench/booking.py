"""Booking under load: a storm on slots released at once, sustained bookings beside pgbench, availability.

One `telehealth serve --workers 1` on a fresh database (bench/run.py's Server), the demo data,
then, as the demo admin of BVDK-DB, extra doctors and schedules made through the staff API:

  storm         N patients (distinct users, real tokens, signed in beforehand) wait for S slots
                released at the same minute (schedules with `release_time`) and all book at once;
                after a 409 each one refreshes the free slots from GET /v1/availability and tries
                another, until it has one or none is left. Bookings made must be exactly S and
                double bookings 0 (checked in the database); 5xx 0; p99 latency of the POSTs.
  sustained     bookings on distinct slots (distinct users, doctors and days: no contention) from
                C concurrent clients for T seconds, beside `pgbench -N` on a scratch database of
                the same PostgreSQL, run in the same run.
  availability  `wrk -t1 -c64` on GET /v1/availability for one doctor over 14 days (the demo
                doctor BS-AN: two schedules, a third of the visits booked).

A table of the figures and the targets (PASS/FAIL) follows. Exit status as bench/run.py: 0 all
targets pass, 1 some fail, 2 the benchmark failed, 130 interrupted. See bench/README.md ("Booking").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# `api` and `notifications` must resolve to the packages: bench/notifications.py would shadow the latter.
sys.path.insert(0, str(ROOT))
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

import asyncpg  # noqa: E402
import msgspec  # noqa: E402
import run as httpbench  # noqa: E402  (bench/run.py: the server, wrk, CPU accounting)
from harness import (  # noqa: E402
    PY_SPY,
    Profiler,
    percentile,
    postgres_database,
    profile_summary,
    run_benchmark,
)
from run import BenchError, Endpoint, Server, cpu_snapshot, create_database, drop_database, http  # noqa: E402

HOST = httpbench.HOST
CLINIC_TZ = dt.timezone(dt.timedelta(hours=7), "Asia/Ho_Chi_Minh")  # no daylight saving
ADMIN = "011078000201"  # the demo admin of BVDK-DB (api/demo/dien_bien.py STAFF)
FACILITY = "BVDK-DB"
SERVICE = "KHAM-NOI"  # 15 minutes, no prepayment: `booked` at once, with a queue number
AVAILABILITY_DOCTOR = "BS-AN"  # demo schedules: KHAM-NOI on weekdays, video consultations in the evening
STORM_PATIENT_IDS = "011090"  # + 6 digits: men born 1990, registered in Điện Biên
EXTRA_PATIENT_IDS = "011195"  # + 6 digits: women born 1995 (the availability doctor's patients)

# Targets (bench/README.md, "Booking").
STORM_P99_MS = 250.0
SUSTAINED_MIN_RATIO = 0.25
AVAILABILITY_P99_MS = 30.0
KERNEL_THREADS = ("kworker", "ksoftirqd", "kdamond", "jbd2", "kswapd", "rcu", "migration", "kcompactd")
DISTURBED_CORES = 0.25  # CPU used by other processes during a phase above which its figures are suspect


# --------------------------------------------------------------------------- a small HTTP client


class Conn:
    """One keep-alive HTTP/1.1 connection, as one phone holds.

    Deliberately minimal (a request line, a few headers, Content-Length or chunked bodies): a
    thousand of them share one asyncio process and must leave the CPU to the server.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.host_header = f"{HOST}:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        token: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None or self.reader.at_eof():
            self.close()
            await self.open()
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {target} HTTP/1.1", f"host: {self.host_header}", "accept: application/json"]
        if token:
            lines.append(f"authorization: Bearer {token}")
        lines += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, chunked, close = None, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if chunked:
                data = await self._chunked()
            elif length is not None:
                data = await self.reader.readexactly(length)
            else:
                data, close = await self.reader.read(), True
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, data

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class SlotIn(msgspec.Struct):
    doctor_id: str
    start: str  # sent back as is


class AvailabilityIn(msgspec.Struct):
    slots: list[SlotIn]


decode_availability = msgspec.json.Decoder(AvailabilityIn).decode
encode = msgspec.json.encode


# --------------------------------------------------------------------------- figures


class CpuMeter:
    """Cores used during a phase: the server, PostgreSQL, this process (the clients), the rest.

    PostgreSQL is its background processes and the backends of the benchmark's databases;
    backends of other databases (someone's tests) count as `other`, which is broken down into
    the busiest other processes and interrupt time (loopback networking is largely softirq work
    that no process is charged for).
    """

    def __init__(self, server: Server, databases: tuple[str, ...] = ()) -> None:
        assert server.proc is not None
        self.pgid = server.proc.pid
        self.databases = {d for d in (server.database, *databases) if d}

    def _read(self) -> tuple[dict[tuple[int, str], int], float, float, float]:
        """(ticks of other processes, server seconds, our PostgreSQL seconds, machine seconds)."""
        me = os.getpid()
        others: dict[tuple[int, str], int] = {}
        server = postgres = 0
        for pid, pgid, comm, ticks in httpbench._proc_stats():
            if pgid == self.pgid:
                server += ticks
            elif comm.startswith("postgres"):
                database = postgres_database(pid)
                if database is None or database in self.databases:
                    postgres += ticks
                else:
                    others[(pid, f"postgres:{database}")] = ticks
            elif pid != me:
                others[(pid, comm)] = ticks
        machine = cpu_snapshot(-2)["machine"]
        return others, server / httpbench.CLOCK_TICKS, postgres / httpbench.CLOCK_TICKS, machine

    def __enter__(self) -> CpuMeter:
        self.before = self._read()
        self.irq_before = _irq_ticks()
        self.self_before = _self_cpu()
        self.children_before = httpbench.children_cpu()
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self.started, 1e-6)
        others, server, postgres, machine = self._read()
        others_before, server_before, postgres_before, machine_before = self.before
        self.server = (server - server_before) / wall
        self.postgres = (postgres - postgres_before) / wall
        self.clients = (_self_cpu() - self.self_before) / wall
        self.children = (httpbench.children_cpu() - self.children_before) / wall
        busy = (machine - machine_before) / wall
        self.other = max(0.0, busy - self.server - self.postgres - self.clients - self.children)
        self.irq = (_irq_ticks() - self.irq_before) / httpbench.CLOCK_TICKS / wall
        deltas = sorted(
            ((ticks - others_before.get(key, 0), key) for key, ticks in others.items()), reverse=True
        )
        # User-space processes only: kernel threads (kworker, ...) mostly work for this benchmark.
        self.other_processes = (
            sum(ticks for ticks, (_, name) in deltas if ticks > 0 and not name.startswith(KERNEL_THREADS))
            / httpbench.CLOCK_TICKS
            / wall
        )
        busiest = deltas[:3]
        self.other_top = ", ".join(
            f"{name}[{pid}] {ticks / httpbench.CLOCK_TICKS / wall:.2f}"
            for ticks, (pid, name) in busiest
            if ticks / httpbench.CLOCK_TICKS / wall >= 0.01
        )

    def summary(self) -> dict[str, Any]:
        return {
            "cpu_server": round(self.server, 2),
            "cpu_postgres": round(self.postgres, 2),
            "cpu_clients": round(self.clients + self.children, 2),
            "cpu_other": round(self.other, 2),
            "cpu_other_irq": round(self.irq, 2),
            "cpu_other_processes": round(self.other_processes, 2),
            "cpu_other_top": self.other_top,
        }


def _irq_ticks() -> int:
    # /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[6]) + int(fields[7])


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class StormResult:
    patients: int
    slots: int
    bookings_client: int = 0  # 201 answers
    bookings_db: int = 0  # booked appointments on the storm's slots, counted in the database
    double_bookings: int = 0  # (doctor, start) held by more than one live appointment, whole database
    patients_twice: int = 0  # storm patients with more than one of the storm's slots
    posts: int = 0
    conflicts: int = 0  # 409 slot_taken
    other_4xx: int = 0
    server_errors: int = 0  # 5xx
    transport_errors: int = 0
    refreshes: int = 0  # GET /v1/availability after a 409
    refresh_errors: int = 0
    gave_up: int = 0  # patients left without a slot (none free any more)
    stopped: int = 0  # patients who stopped after 3 answers other than 201 and 409
    fill_s: float = 0.0  # first POST to the S-th 201
    total_s: float = 0.0  # first POST to the last patient done
    post_p50_ms: float = 0.0
    post_p99_ms: float = 0.0
    post_max_ms: float = 0.0
    refresh_p50_ms: float = 0.0
    refresh_p99_ms: float = 0.0
    # The floor: as many bare GET /health/live requests, one per patient's connection, sent at once.
    floor_p50_ms: float = 0.0
    floor_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class SustainedResult:
    clients: int
    seconds: float
    bookings: int = 0
    rate: float = 0.0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    per_second: list[int] = field(default_factory=list)  # bookings in each second of the window
    statuses: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class PgbenchResult:
    command: str
    tps: float
    # pgbench's backends come and go with the run, so PostgreSQL's share is read off the whole
    # machine: cores busy in all, and pgbench's own.
    cpu_machine: float
    cpu_pgbench: float
    cpu_other_processes: float  # other user-space processes (someone's tests) during the run
    cpu_other_top: str


@dataclass
class Setup:
    facility_id: str
    service_id: str
    slot_minutes: int
    admin_token: str = ""
    storm_doctors: list[str] = field(default_factory=list)
    sustained_doctors: list[str] = field(default_factory=list)
    availability_doctor: str = ""
    storm_day: dt.date | None = None
    first_sustained_day: dt.date | None = None


@dataclass
class User:
    personal_id: str
    user_id: str
    token: str


# --------------------------------------------------------------------------- setup


async def _sql(server: Server, query: str, *params: Any) -> list[asyncpg.Record]:
    assert server.database is not None
    conn = await asyncpg.connect(with_db(server), timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *params)
        return rows
    finally:
        await conn.close()


def with_db(server: Server) -> str:
    return httpbench.with_database(server.args.pg_url, server.database or "")


def sql(server: Server, query: str, *params: Any) -> list[asyncpg.Record]:
    return asyncio.run(_sql(server, query, *params))


def clinic_now() -> dt.datetime:
    return dt.datetime.now(CLINIC_TZ)


def mint_id_tokens(server: Server, personal_ids: list[str]) -> list[str]:
    """VNeID-shaped ID tokens from the dev issuer, signed in-process with the server's key and settings."""
    from jose import jwk as jose_jwk

    from api.identity.dev_issuer import mint_id_token
    from api.identity.personal_id import birth_year
    from api.settings import load_settings

    settings = load_settings(server.env)
    # mint_id_token hands python-jose the PEM text, which parses and checks the RSA key on every
    # call (about 40 ms here): keep the parsed key while minting, or 1,000 tokens take 40 s.
    construct = jose_jwk.construct
    jose_jwk.construct = functools.lru_cache(maxsize=4)(construct)  # type: ignore[assignment]
    try:
        return [
            mint_id_token(
                settings,
                personal_id=pid,
                name=f"Bệnh nhân {pid[-6:]}",
                birthdate=dt.date(birth_year(pid), 1, 1),
                gender="male" if int(pid[3]) % 2 == 0 else "female",
            )
            for pid in personal_ids
        ]
    finally:
        jose_jwk.construct = construct


async def sign_in_all(server: Server, personal_ids: list[str], concurrency: int = 8) -> list[User]:
    """Each personal ID signs in once (POST /v1/auth/vneid): distinct users with real tokens."""
    id_tokens = mint_id_tokens(server, personal_ids)
    users: list[User | None] = [None] * len(personal_ids)
    todo = iter(range(len(personal_ids)))

    async def signer() -> None:
        conn = Conn(server.port)
        try:
            for i in todo:
                status, data = await conn.request(
                    "POST", "/v1/auth/vneid", body=encode({"id_token": id_tokens[i]})
                )
                if status != 200:
                    raise BenchError(f"sign-in of {personal_ids[i]} answered {status}: {data[:300]!r}")
                pair = json.loads(data)
                users[i] = User(personal_ids[i], pair["user"]["id"], pair["access_token"])
        finally:
            conn.close()

    await asyncio.gather(*(signer() for _ in range(concurrency)))
    return [u for u in users if u is not None]


def admin_post(server: Server, setup: Setup, path: str, body: dict[str, Any]) -> Any:
    return http("POST", f"{server.base}{path}", body=body, token=setup.admin_token, timeout=30)


def create_doctors(server: Server, setup: Setup, prefix: str, count: int) -> list[str]:
    ids = []
    for i in range(1, count + 1):
        doctor = admin_post(
            server,
            setup,
            f"/v1/admin/facilities/{setup.facility_id}/doctors",
            {"code": f"{prefix}-{i:03d}", "name": f"Bác sĩ thử tải {prefix} {i}", "specialties": ["Nội"]},
        )
        ids.append(doctor["id"])
    return ids


def create_schedule(
    server: Server,
    setup: Setup,
    doctor_id: str,
    *,
    weekly: list[dict[str, Any]],
    valid_from: dt.date,
    valid_until: dt.date,
    horizon_days: int,
    release_time: str,
) -> None:
    admin_post(
        server,
        setup,
        "/v1/staff/schedules",
        {
            "facility_id": setup.facility_id,
            "doctor_id": doctor_id,
            "service_id": setup.service_id,
            "weekly": weekly,
            "valid_from": valid_from.isoformat(),
            "valid_until": valid_until.isoformat(),
            "modes": ["in_person"],
            "capacity": 1,
            "horizon_days": horizon_days,
            "release_time": release_time,
        },
    )


def availability_path(date_from: dt.date, date_to: dt.date, **ids: str) -> str:
    """GET /v1/availability for doctor_id=, facility_id=, service_id= over the days asked for."""
    return f"/v1/availability?{urlencode({**ids, 'date_from': date_from, 'date_to': date_to})}"


def _slots(server: Server, path: str) -> list[SlotIn]:
    return decode_availability(encode(http("GET", f"{server.base}{path}", timeout=30))).slots


def prepare(args: argparse.Namespace, server: Server) -> tuple[Setup, list[User], list[User]]:
    """Look-ups, the admin's sign-in, the sustained doctors, sign-ins, bookings on the availability doctor."""
    rows = sql(
        server,
        """SELECT f.id::text AS facility_id, s.id::text AS service_id, s.duration_minutes,
                  s.prepayment_required, d.id::text AS doctor_id
             FROM facilities f JOIN services s ON s.facility_id = f.id AND s.code = $2
             JOIN doctors d ON d.facility_id = f.id AND d.code = $3
            WHERE f.code = $1""",
        FACILITY,
        SERVICE,
        AVAILABILITY_DOCTOR,
    )
    if not rows:
        raise BenchError(f"{FACILITY}, {SERVICE} or {AVAILABILITY_DOCTOR} missing: is the demo data loaded?")
    row = rows[0]
    if row["prepayment_required"]:
        raise BenchError(f"{SERVICE} needs prepayment: a booking would be held, not booked")
    setup = Setup(row["facility_id"], row["service_id"], row["duration_minutes"])
    setup.availability_doctor = row["doctor_id"]
    [admin_id_token] = mint_id_tokens(server, [ADMIN])
    setup.admin_token = http("POST", f"{server.base}/v1/auth/vneid", body={"id_token": admin_id_token})[
        "access_token"
    ]

    # The storm's day: the next weekend day, when the demo KHAM-NOI schedules (weekdays) have no
    # slots, so the facility's free slots that day are exactly the storm's.
    today = clinic_now().date()
    setup.storm_day = next(
        today + dt.timedelta(days=n) for n in range(1, 8) if (today + dt.timedelta(days=n)).isoweekday() >= 6
    )
    setup.first_sustained_day = setup.storm_day + dt.timedelta(days=1)

    # Sustained: doctors with a slot every 15 minutes all day, released long ago, for 14 days.
    print(f"  setup: {args.sustained_doctors} doctors for the sustained run (staff API)", flush=True)
    setup.sustained_doctors = create_doctors(server, setup, "BENCH-SUS", args.sustained_doctors)
    last_minute = (24 * 60 // setup.slot_minutes - 1) * setup.slot_minutes
    all_day = [
        {"weekday": d, "start": "00:00", "end": f"{last_minute // 60:02d}:{last_minute % 60:02d}"}
        for d in range(1, 8)
    ]
    for doctor_id in setup.sustained_doctors:
        create_schedule(
            server,
            setup,
            doctor_id,
            weekly=all_day,
            valid_from=setup.first_sustained_day,
            valid_until=setup.first_sustained_day + dt.timedelta(days=13),
            horizon_days=30,
            release_time="00:00",
        )

    print(
        f"  setup: sign in {args.patients} storm patients and {args.extra_patients} others "
        "(POST /v1/auth/vneid, not timed)",
        flush=True,
    )
    started = time.monotonic()
    patients = asyncio.run(sign_in_all(server, [f"{STORM_PATIENT_IDS}{i:06d}" for i in range(args.patients)]))
    others = asyncio.run(
        sign_in_all(server, [f"{EXTRA_PATIENT_IDS}{i:06d}" for i in range(args.extra_patients)])
    )
    print(f"    {len(patients) + len(others)} sign-ins in {time.monotonic() - started:.1f}s", flush=True)

    # The availability doctor: book a third of BS-AN's KHAM-NOI visits over the measured 14 days.
    window = availability_path(
        today,
        today + dt.timedelta(days=args.availability_days - 1),
        doctor_id=setup.availability_doctor,
        service_id=setup.service_id,
    )
    visits = _slots(server, window)
    booked = asyncio.run(book_each(server, setup, others, visits[::3]))
    print(f"  setup: {booked} of {len(visits)} {AVAILABILITY_DOCTOR} visits booked", flush=True)
    return setup, patients, others


async def book_each(server: Server, setup: Setup, users: list[User], slots: list[SlotIn]) -> int:
    conn = Conn(server.port)
    try:
        for i, slot in enumerate(slots):
            status, data = await conn.request(
                "POST",
                "/v1/appointments",
                body=encode(
                    {"doctor_id": slot.doctor_id, "service_id": setup.service_id, "start": slot.start}
                ),
                token=users[i % len(users)].token,
                headers=(("idempotency-key", str(uuid.uuid4())),),
            )
            if status != 201:
                raise BenchError(f"setup booking answered {status}: {data[:300]!r}")
    finally:
        conn.close()
    return len(slots)


# --------------------------------------------------------------------------- storm


def release_storm(args: argparse.Namespace, server: Server, setup: Setup) -> tuple[dt.datetime, str]:
    """Doctors whose slots on the storm's day add up to `--slots`, all opening at one minute.

    Returns the release moment and the facility's availability path for that day.
    """
    assert setup.storm_day is not None
    per_doctor = args.slots // args.storm_doctors
    print(
        f"  storm: {args.storm_doctors} doctors x {per_doctor} slots of {setup.slot_minutes} min "
        f"on {setup.storm_day} (staff API)",
        flush=True,
    )
    setup.storm_doctors = create_doctors(server, setup, "BENCH-STORM", args.storm_doctors)
    end_minutes = 7 * 60 + per_doctor * setup.slot_minutes
    window = [
        {
            "weekday": setup.storm_day.isoweekday(),
            "start": "07:00",
            "end": f"{end_minutes // 60:02d}:{end_minutes % 60:02d}",
        }
    ]
    # The release: the first whole minute at least `--release-lead` seconds away (release_time is
    # HH:MM), the day it falls on `horizon_days` before the storm's day.
    now = clinic_now()
    release = (now + dt.timedelta(seconds=args.release_lead + 60)).replace(second=0, microsecond=0)
    horizon = (setup.storm_day - release.date()).days
    if horizon < 1:
        raise BenchError("the storm's day is not after the release day: run again after midnight")
    for doctor_id in setup.storm_doctors:
        create_schedule(
            server,
            setup,
            doctor_id,
            weekly=window,
            valid_from=setup.storm_day,
            valid_until=setup.storm_day,
            horizon_days=horizon,
            release_time=release.strftime("%H:%M"),
        )
    path = availability_path(
        setup.storm_day, setup.storm_day, facility_id=setup.facility_id, service_id=setup.service_id
    )
    early = _slots(server, path)
    if early:
        raise BenchError(f"{len(early)} storm slots were open before their release time")
    return release, path


async def storm(
    args: argparse.Namespace,
    server: Server,
    setup: Setup,
    patients: list[User],
    release: dt.datetime,
    path: str,
) -> tuple[StormResult, list[SlotIn]]:
    result = StormResult(patients=len(patients), slots=args.slots)
    post_latency: list[float] = []
    refresh_latency: list[float] = []
    success_at: list[float] = []
    done_at: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    go = asyncio.Event()
    slots: list[tuple[str, str]] = []
    rng = random.Random(args.seed)

    async def patient(user: User, conn: Conn, seed: int) -> None:
        pick = random.Random(seed)
        await go.wait()
        if args.arrival_spread:
            await asyncio.sleep(pick.uniform(0, args.arrival_spread))
        free = list(slots)
        misses = failures = 0
        while free:
            choice = free[pick.randrange(len(free))]
            body = encode(
                {
                    "doctor_id": choice[0],
                    "service_id": setup.service_id,
                    "start": choice[1],
                    "mode": "in_person",
                }
            )
            started = time.perf_counter()
            try:
                status, _ = await conn.request(
                    "POST",
                    "/v1/appointments",
                    body=body,
                    token=user.token,
                    headers=(("idempotency-key", str(uuid.uuid4())),),
                )
            except TRANSPORT_ERRORS:
                result.transport_errors += 1
                free.remove(choice)
                failures += 1
                if failures >= 3:
                    result.stopped += 1
                    break
                continue
            finished = time.perf_counter()
            post_latency.append(finished - started)
            statuses[f"POST {status}"] += 1
            if status == 201:
                success_at.append(finished)
                break
            free.remove(choice)
            if status != 409:
                failures += 1  # another 4xx or a 5xx: counted; a patient stops after a few
                if failures >= 3:
                    result.stopped += 1
                    break
            else:
                misses += 1
                if args.refresh_every and misses % args.refresh_every == 0 and free:
                    started = time.perf_counter()
                    try:
                        status, data = await conn.request("GET", path)
                    except TRANSPORT_ERRORS:
                        result.transport_errors += 1
                        continue
                    refresh_latency.append(time.perf_counter() - started)
                    statuses[f"GET {status}"] += 1
                    if status == 200:
                        still = {(s.doctor_id, s.start) for s in decode_availability(data).slots}
                        free = [s for s in free if s in still]
                    else:
                        result.refresh_errors += 1
        else:
            result.gave_up += 1
        done_at.append(time.perf_counter())

    conns = [Conn(server.port) for _ in patients]
    tasks = [
        asyncio.create_task(patient(user, conn, rng.getrandbits(64)))
        for user, conn in zip(patients, conns, strict=True)
    ]
    try:
        # Every phone has its connection open (a few seconds before: the server's keep-alive is 5 s).
        await asyncio.sleep(max(0.0, (release - clinic_now()).total_seconds() - args.connect_ahead))
        await asyncio.gather(*(c.open() for c in conns))
        await asyncio.sleep(max(0.0, (release - clinic_now()).total_seconds() + 0.02))
        # The released slots, as the app lists them at the release (one request, not timed).
        for _ in range(50):
            listed = decode_availability((await _get(server.port, path)) or b'{"slots":[]}').slots
            if len(listed) >= args.slots:
                break
            await asyncio.sleep(0.05)
        if len(listed) != args.slots or {s.doctor_id for s in listed} != set(setup.storm_doctors):
            raise BenchError(f"at the release {len(listed)} slots were listed, not {args.slots}")
        slots.extend((s.doctor_id, s.start) for s in listed)
        print(f"  storm: {len(slots)} slots released; {len(patients)} patients book ...", end="", flush=True)
        with CpuMeter(server) as cpu:
            first = time.perf_counter()
            go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.storm_timeout)
        last = max(done_at, default=first)
    finally:
        for task in tasks:
            task.cancel()
        for conn in conns:
            conn.close()
    success_at.sort()
    result.bookings_client = len(success_at)
    result.posts = len(post_latency)
    result.conflicts = statuses["POST 409"]
    result.other_4xx = sum(n for k, n in statuses.items() if k.startswith("POST 4") and k != "POST 409")
    result.server_errors = sum(n for k, n in statuses.items() if k.split()[1].startswith("5"))
    result.refreshes = len(refresh_latency)
    result.fill_s = (success_at[args.slots - 1] - first) if len(success_at) >= args.slots else math.nan
    result.total_s = last - first
    result.post_p50_ms, result.post_p99_ms = (
        1000 * percentile(post_latency, 50),
        1000 * percentile(post_latency, 99),
    )
    result.post_max_ms = 1000 * percentile(post_latency, 100)
    result.refresh_p50_ms, result.refresh_p99_ms = (
        1000 * percentile(refresh_latency, 50),
        1000 * percentile(refresh_latency, 99),
    )
    result.statuses = dict(sorted(statuses.items()))
    result.cpu = cpu.summary()
    print(
        f" {result.bookings_client} booked in {result.fill_s:.2f}s, {result.posts} POSTs, "
        f"p99 {result.post_p99_ms:.0f} ms",
        flush=True,
    )
    return result, listed


async def storm_floor(server: Server, patients: int) -> tuple[float, float]:
    """p50 and p99 of `patients` bare requests (GET /health/live: no token, no database) sent at
    once on as many open connections: what no route of this server can beat in the storm."""
    conns = [Conn(server.port) for _ in range(patients)]
    go = asyncio.Event()
    latency: list[float] = []

    async def ask(conn: Conn) -> None:
        await go.wait()
        started = time.perf_counter()
        status, _ = await conn.request("GET", "/health/live")
        if status != 200:
            raise BenchError(f"GET /health/live answered {status}")
        latency.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(c.open() for c in conns))
        tasks = [asyncio.create_task(ask(c)) for c in conns]
        await asyncio.sleep(0.5)  # every request waits at the start line
        go.set()
        await asyncio.gather(*tasks)
    finally:
        for conn in conns:
            conn.close()
    return 1000 * percentile(latency, 50), 1000 * percentile(latency, 99)


async def _get(port: int, path: str) -> bytes | None:
    conn = Conn(port)
    try:
        status, data = await conn.request("GET", path)
        return data if status == 200 else None
    finally:
        conn.close()


def verify_storm(server: Server, setup: Setup, result: StormResult) -> None:
    """What the database says: bookings on the storm's slots, double bookings anywhere."""
    [row] = sql(
        server,
        """SELECT (SELECT count(*) FROM appointments
                    WHERE doctor_id = ANY($1::uuid[]) AND status = 'booked') AS booked,
                  (SELECT count(*) FROM (SELECT patient_id FROM appointments
                    WHERE doctor_id = ANY($1::uuid[]) AND status = 'booked'
                    GROUP BY patient_id HAVING count(*) > 1) p) AS twice""",
        setup.storm_doctors,
    )
    result.bookings_db = row["booked"]
    result.patients_twice = row["twice"]
    result.double_bookings = double_bookings(server)


def double_bookings(server: Server) -> int:
    [row] = sql(
        server,
        """SELECT count(*) AS n FROM (
               SELECT doctor_id, starts_at FROM appointments
                WHERE status IN ('held', 'booked', 'checked_in', 'completed')
                GROUP BY doctor_id, starts_at HAVING count(*) > 1) d""",
    )
    return int(row["n"])


# --------------------------------------------------------------------------- sustained


def sustained_plan(server: Server, setup: Setup, patients: list[User]) -> list[tuple[User, str, str]]:
    """(patient, doctor, start) for every sustained slot, in an order without contention.

    Consecutive bookings go to different doctors and days (queue numbers are counted per doctor
    and day, under a row lock) and to different patients (each patient's bookings are serialised);
    a patient's slots never overlap (one patient, one place at a time).
    """
    assert setup.first_sustained_day is not None
    entries = []
    for index, doctor_id in enumerate(setup.sustained_doctors):
        path = availability_path(
            setup.first_sustained_day, setup.first_sustained_day + dt.timedelta(days=13), doctor_id=doctor_id
        )
        per_day: dict[str, list[str]] = collections.defaultdict(list)
        for slot in _slots(server, path):
            per_day[slot.start[:10]].append(slot.start)
        for day, starts in per_day.items():
            for t, start in enumerate(sorted(starts)):
                entries.append((t, day, index, doctor_id, start))
    entries.sort()
    return [(patients[i % len(patients)], e[3], e[4]) for i, e in enumerate(entries)]


async def sustained(
    args: argparse.Namespace, server: Server, setup: Setup, plan: list[tuple[User, str, str]]
) -> SustainedResult:
    result = SustainedResult(clients=args.sustained_clients, seconds=args.sustained_seconds)
    todo = iter(plan)
    records: list[tuple[float, float, int]] = []  # (finished, latency, status)
    conns = [Conn(server.port) for _ in range(args.sustained_clients)]
    await asyncio.gather(*(c.open() for c in conns))
    begin = time.perf_counter()
    measure_from = begin + args.sustained_warmup
    stop_at = measure_from + args.sustained_seconds

    async def client(conn: Conn) -> None:
        for user, doctor_id, start in todo:
            if time.perf_counter() >= stop_at:
                return
            body = encode(
                {"doctor_id": doctor_id, "service_id": setup.service_id, "start": start, "mode": "in_person"}
            )
            started = time.perf_counter()
            try:
                status, _ = await conn.request(
                    "POST",
                    "/v1/appointments",
                    body=body,
                    token=user.token,
                    headers=(("idempotency-key", str(uuid.uuid4())),),
                )
            except TRANSPORT_ERRORS:
                status = 0
            finished = time.perf_counter()
            records.append((finished, finished - started, status))

    try:
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(client(c)) for c in conns]
        await asyncio.sleep(args.sustained_warmup)
        with CpuMeter(server) as cpu:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.sustained_seconds + 60)
    finally:
        for conn in conns:
            conn.close()
    window_end = min(stop_at, max((r[0] for r in records), default=stop_at))
    measured = [r for r in records if measure_from <= r[0] <= window_end]
    if window_end < stop_at - 0.5:
        print(f"  warning: the sustained slots ran out after {window_end - measure_from:.1f}s", flush=True)
    result.seconds = round(window_end - measure_from, 2)
    result.bookings = sum(1 for r in measured if r[2] == 201)
    result.errors = sum(1 for r in records if r[2] != 201)
    result.rate = result.bookings / result.seconds if result.seconds > 0 else 0.0
    result.per_second = [0] * max(1, int(result.seconds))
    for finished, _, status in measured:
        if status == 201:
            result.per_second[min(len(result.per_second) - 1, int(finished - measure_from))] += 1
    latencies = [r[1] for r in measured]
    result.p50_ms, result.p99_ms = 1000 * percentile(latencies, 50), 1000 * percentile(latencies, 99)
    result.statuses = dict(collections.Counter(str(r[2]) for r in records))
    result.cpu = cpu.summary()
    return result


def measure_wrk(
    args: argparse.Namespace, server: Server, endpoint: Endpoint, workdir: Path
) -> tuple[httpbench.Result, dict[str, Any]]:
    """bench/run.py's wrk run (warm-up, then measured), with this script's CPU attribution."""
    if args.warmup > 0:
        httpbench.run_wrk(args, server, endpoint, args.warmup, None)
    with CpuMeter(server) as cpu:
        summary, wrk_cpu = httpbench.run_wrk(args, server, endpoint, args.duration, workdir / "wrk.log")
    seconds = summary["duration_us"] / 1e6
    wall = args.duration
    result = httpbench.Result(
        workers=1,
        endpoint=endpoint.key,
        label=endpoint.label,
        requests=int(summary["requests"]),
        seconds=round(seconds, 3),
        rps=summary["requests"] / seconds,
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        errors=sum(int(v) for k, v in summary.items() if k.startswith("errors_")),
        cpu_server=round(cpu.server, 2),
        cpu_server_busiest=round(cpu.server, 2),
        cpu_postgres=round(cpu.postgres, 2),
        cpu_wrk=round(wrk_cpu / wall, 2),
        cpu_other=round(cpu.other, 2),
    )
    return result, cpu.summary()


# --------------------------------------------------------------------------- pgbench


def run_pgbench(args: argparse.Namespace, server: Server, workdir: Path) -> PgbenchResult:
    """`pgbench -N` on a scratch database of the same PostgreSQL: its simple-write ceiling here."""
    name = f"telehealth_bench_{os.getpid()}_pgbench"
    parts = urlsplit(args.pg_url)
    target = ["-h", parts.hostname or HOST, "-p", str(parts.port or 5432), "-U", parts.username or "postgres"]
    print(f"  pgbench: database {name}: pgbench -i -s {args.pgbench_scale}", flush=True)
    create_database(args.pg_url, name)
    try:
        init = subprocess.run(
            [args.pgbench, "-i", "-q", "-s", str(args.pgbench_scale), *target, name],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if init.returncode != 0:
            raise BenchError(f"pgbench -i failed:\n{init.stderr[-2000:]}")
        command = [
            args.pgbench,
            "-N",
            "-c",
            str(args.pgbench_clients),
            "-j",
            str(args.pgbench_jobs),
            "-T",
            str(args.pgbench_seconds),
            *target,
            name,
        ]
        shown = " ".join(["pgbench", *command[1:8]])
        print(f"  pgbench: {shown} ...", end="", flush=True)
        with CpuMeter(server, (name,)) as cpu:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.pgbench_seconds + 120)
        (workdir / "pgbench.log").write_text(done.stdout + done.stderr)
        match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
        if done.returncode != 0 or match is None:
            raise BenchError(f"pgbench failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
        result = PgbenchResult(
            command=shown,
            tps=float(match.group(1)),
            cpu_machine=round(cpu.server + cpu.postgres + cpu.children + cpu.other, 2),
            cpu_pgbench=round(cpu.children, 2),
            cpu_other_processes=round(cpu.other_processes, 2),
            cpu_other_top=cpu.other_top,
        )
        print(f" {result.tps:.0f} transactions/s", flush=True)
        return result
    finally:
        try:
            drop_database(args.pg_url, name)
            print(f"  database {name}: dropped", flush=True)
        except Exception as exc:
            print(f"  could not drop database {name}: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- profiling


# --------------------------------------------------------------------------- report


@contextlib.contextmanager
def profiled(args: argparse.Namespace, server: Server, workdir: Path, phase: str) -> Iterator[None]:
    """py-spy on the server during one phase (`--profile`); its busiest frames are printed after."""
    path = workdir / f"py-spy-{phase}.txt"
    with Profiler(args.profile, server.proc.pid if server.proc else 0, path):
        yield
    if args.profile:
        summary = profile_summary(path, 15)
        print(f"\nProfile of the server during {phase} ({summary['samples']} samples, {path}):")
        print("  own time:")
        for frame, share in summary["own"]:
            print(f"    {share:6.1%}  {frame}")
        print("  including callees (app and library frames):")
        for frame, share in summary["inclusive"]:
            print(f"    {share:6.1%}  {frame}")


def print_report(
    args: argparse.Namespace,
    storm_result: StormResult | None,
    sustained_result: SustainedResult | None,
    pgbench: PgbenchResult | None,
    availability: httpbench.Result | None,
    availability_cpu: dict[str, Any],
) -> bool:
    print()
    if storm_result:
        s = storm_result
        print(
            f"Storm: {s.patients} patients, {s.slots} slots released at once\n"
            f"  bookings made        {s.bookings_db} in the database ({s.bookings_client} answered 201)\n"
            f"  double bookings      {s.double_bookings}   (patients with two storm slots: {s.patients_twice})\n"
            f"  POSTs                {s.posts}: 409 {s.conflicts}, other 4xx {s.other_4xx}, "
            f"5xx {s.server_errors}, transport errors {s.transport_errors}\n"
            f"  refreshes            {s.refreshes} GET /v1/availability after a 409 "
            f"(p50 {s.refresh_p50_ms:.0f} ms, p99 {s.refresh_p99_ms:.0f} ms)\n"
            f"  time to fill         {s.fill_s:.2f} s (all patients done after {s.total_s:.2f} s; "
            f"{s.gave_up} left without a slot, {s.stopped} stopped by errors)\n"
            f"  POST latency         p50 {s.post_p50_ms:.0f} ms, p99 {s.post_p99_ms:.0f} ms, "
            f"max {s.post_max_ms:.0f} ms\n"
            f"  floor                {s.patients} bare GET /health/live sent at once: p50 {s.floor_p50_ms:.0f} ms, "
            f"p99 {s.floor_p99_ms:.0f} ms\n"
            f"  CPU cores            server {s.cpu['cpu_server']:.2f} / pg {s.cpu['cpu_postgres']:.2f} / "
            f"clients {s.cpu['cpu_clients']:.2f} / other {s.cpu['cpu_other']:.2f}\n"
            f"  other                irq+softirq {s.cpu['cpu_other_irq']:.2f}; {s.cpu['cpu_other_top'] or '-'}"
        )
    if sustained_result:
        u = sustained_result
        print(
            f"Sustained: {u.clients} clients, distinct slots, {u.seconds:g} s measured\n"
            f"  bookings/s           {u.rate:.0f} ({u.bookings} bookings; errors {u.errors}); "
            f"per second {min(u.per_second)}-{max(u.per_second)}\n"
            f"  latency              p50 {u.p50_ms:.1f} ms, p99 {u.p99_ms:.1f} ms\n"
            f"  CPU cores            server {u.cpu['cpu_server']:.2f} / pg {u.cpu['cpu_postgres']:.2f} / "
            f"clients {u.cpu['cpu_clients']:.2f} / other {u.cpu['cpu_other']:.2f}\n"
            f"  other                irq+softirq {u.cpu['cpu_other_irq']:.2f}; {u.cpu['cpu_other_top'] or '-'}"
        )
    if pgbench:
        ratio = (sustained_result.rate / pgbench.tps) if sustained_result and pgbench.tps else math.nan
        print(
            f"pgbench: {pgbench.command}\n"
            f"  transactions/s       {pgbench.tps:.0f}   (bookings/s are {ratio:.1%} of it)\n"
            f"  CPU cores            machine {pgbench.cpu_machine:.2f}, of which pgbench {pgbench.cpu_pgbench:.2f}"
            f" (busiest others: {pgbench.cpu_other_top or '-'})"
        )
    if availability:
        a = availability
        print(
            f"Availability: {a.label}, wrk -t{args.threads} -c{args.connections}\n"
            f"  req/s                {a.rps:.0f}   (errors {a.errors})\n"
            f"  latency              p50 {a.p50_ms:.1f} ms, p99 {a.p99_ms:.1f} ms, max {a.max_ms:.1f} ms\n"
            f"  CPU cores            server {a.cpu_server:.2f} / pg {a.cpu_postgres:.2f} / "
            f"wrk {a.cpu_wrk:.2f} / other {a.cpu_other:.2f}\n"
            f"  other                irq+softirq {availability_cpu['cpu_other_irq']:.2f}; "
            f"{availability_cpu['cpu_other_top'] or '-'}"
        )

    checks: list[tuple[str, str, bool]] = []
    if storm_result:
        s = storm_result
        checks += [
            (
                f"storm: bookings made == {s.slots}",
                f"{s.bookings_db} / {s.bookings_client}",
                s.bookings_db == s.slots == s.bookings_client,
            ),
            ("storm: double bookings == 0", str(s.double_bookings), s.double_bookings == 0),
            (
                "storm: 5xx == 0 (and no transport error)",
                f"{s.server_errors} / {s.transport_errors}",
                s.server_errors == 0 and s.transport_errors == 0,
            ),
            (
                f"storm: POST p99 < {STORM_P99_MS:.0f} ms",
                f"{s.post_p99_ms:.0f} ms",
                s.post_p99_ms < STORM_P99_MS,
            ),
        ]
    if sustained_result and pgbench:
        ratio = sustained_result.rate / pgbench.tps if pgbench.tps else 0.0
        checks.append(
            (
                f"sustained bookings/s >= {SUSTAINED_MIN_RATIO:.0%} of pgbench -N",
                f"{sustained_result.rate:.0f} / {pgbench.tps:.0f} = {ratio:.1%}",
                ratio >= SUSTAINED_MIN_RATIO and sustained_result.errors == 0,
            )
        )
    if availability:
        checks.append(
            (
                f"availability p99 < {AVAILABILITY_P99_MS:.0f} ms (64 connections)",
                f"{availability.p99_ms:.1f} ms",
                availability.p99_ms < AVAILABILITY_P99_MS and availability.errors == 0,
            )
        )
    disturbed = [
        f"{phase} ({other:.2f} cores)"
        for phase, other in (
            ("storm", storm_result.cpu["cpu_other"] if storm_result else 0.0),
            ("sustained", sustained_result.cpu["cpu_other"] if sustained_result else 0.0),
            ("availability", availability.cpu_other if availability else 0.0),
            ("pgbench", pgbench.cpu_other_processes if pgbench else 0.0),
        )
        if other > DISTURBED_CORES
    ]
    if disturbed:
        print(
            f"\nDISTURBED: other processes used the CPU during {', '.join(disturbed)}; "
            "those figures are low: run again on a quiet machine."
        )
    print("\nTargets")
    ok = True
    for name, value, passed in checks:
        ok &= passed
        print(f"  {name:<52} {value:>22}  {'PASS' if passed else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------- main


def wait_quiet(args: argparse.Namespace, phase: str, report: dict[str, Any]) -> None:
    """Before a measured phase: wait (up to --quiet-wait s) until the machine is nearly idle.

    The server is idle then, so what is busy is someone else's work (tests, another benchmark)
    that would take the 2 cores from the server and PostgreSQL.
    """
    deadline = time.monotonic() + args.quiet_wait
    told = False
    while True:
        busy = httpbench.machine_busy(1.0)
        if busy <= args.quiet_below or time.monotonic() > deadline:
            break
        if not told:
            print(
                f"  {phase}: {busy:.2f} cores busy elsewhere; waiting up to {args.quiet_wait:g}s ...",
                flush=True,
            )
            told = True
        time.sleep(3)
    if busy > args.quiet_below:
        print(
            f"  warning: {busy:.2f} cores busy elsewhere before the {phase}; its figures will be low",
            flush=True,
        )
    report.setdefault("busy_before", {})[phase] = round(busy, 2)


def bench(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> bool:
    server = Server(args, 1, workdir)
    server.env.update(
        {
            # The in-process notification worker would take the CPU the API needs: run it apart.
            "NOTIFICATION_WORKER": "external",
            "SIGN_IN_RATE_PER_MINUTE": "1000000",
            "BOOKING_RATE_PER_MINUTE": "1000000",
            "BOOKING_MAX_PER_FACILITY": str(args.max_per_facility),
        }
    )
    storm_result = sustained_result = pgbench = availability = None
    availability_cpu: dict[str, Any] = {}
    try:
        server.start()
        setup, patients, _ = prepare(args, server)
        signed_in = time.monotonic()
        # Statistics, as autovacuum keeps them on a live database. Without them the pool's cached
        # generic plan for the per-facility count used the facility index and read every future
        # appointment of the facility on each booking: bookings/s fell by 40 % within 10 s.
        sql(server, "ANALYZE")

        wait_quiet(args, "storm", report)
        release, path = release_storm(args, server, setup)
        with profiled(args, server, workdir, "storm"):
            storm_result, _ = asyncio.run(storm(args, server, setup, patients, release, path))
        verify_storm(server, setup, storm_result)
        wait_quiet(args, "storm floor", report)
        storm_result.floor_p50_ms, storm_result.floor_p99_ms = asyncio.run(storm_floor(server, args.patients))
        print(
            f"  storm floor: {args.patients} GET /health/live at once: p50 {storm_result.floor_p50_ms:.0f} ms, "
            f"p99 {storm_result.floor_p99_ms:.0f} ms",
            flush=True,
        )
        report["storm"] = asdict(storm_result)

        plan = sustained_plan(server, setup, patients)
        needed = (args.sustained_warmup + args.sustained_seconds) * 2000
        if len(plan) < needed:
            print(f"  warning: {len(plan)} sustained slots; more than ~2,000/s would run out", flush=True)
        if time.monotonic() - signed_in + args.sustained_warmup + args.sustained_seconds > 840:
            raise BenchError("the access tokens would expire during the sustained run (15 min)")
        wait_quiet(args, "sustained run", report)
        print(
            f"  sustained: {len(plan)} distinct slots, {args.sustained_clients} clients, "
            f"{args.sustained_warmup:g}s warm-up + {args.sustained_seconds:g}s ...",
            end="",
            flush=True,
        )
        with profiled(args, server, workdir, "sustained"):
            sustained_result = asyncio.run(sustained(args, server, setup, plan))
        print(f" {sustained_result.rate:.0f} bookings/s, p99 {sustained_result.p99_ms:.0f} ms", flush=True)
        report["sustained"] = asdict(sustained_result)

        today = clinic_now().date()
        endpoint = Endpoint(
            "availability",
            f"GET /v1/availability ({AVAILABILITY_DOCTOR}, {args.availability_days} days)",
            availability_path(
                today,
                today + dt.timedelta(days=args.availability_days - 1),
                doctor_id=setup.availability_doctor,
            ),
        )
        listed = _slots(server, endpoint.path)
        wait_quiet(args, "availability run", report)
        print(
            f"  availability: {endpoint.path} lists {len(listed)} free slots; "
            f"wrk -t{args.threads} -c{args.connections} {args.duration:g}s ...",
            end="",
            flush=True,
        )
        with profiled(args, server, workdir, "availability"):
            availability, availability_cpu = measure_wrk(args, server, endpoint, workdir)
        print(f" {availability.rps:.0f} req/s, p99 {availability.p99_ms:.1f} ms", flush=True)
        report["availability"] = asdict(availability) | {"free_slots": len(listed), "cpu": availability_cpu}

        wait_quiet(args, "pgbench run", report)
        pgbench = run_pgbench(args, server, workdir)
        report["pgbench"] = asdict(pgbench)

        final = double_bookings(server)
        report["double_bookings_final"] = final
        if final:
            storm_result.double_bookings = max(storm_result.double_bookings, final)
    except BenchError:
        if server.proc is not None:
            print(f"--- server log (tail)\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        # Let the clean-up finish: a second Ctrl-C or SIGTERM would leave the server or database behind.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if any((storm_result, sustained_result, pgbench, availability)):
            report["passed"] = print_report(
                args, storm_result, sustained_result, pgbench, availability, availability_cpu
            )
    return bool(report.get("passed"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    storm_group = parser.add_argument_group("storm")
    storm_group.add_argument("--patients", type=int, default=1000, help="concurrent patients (1000)")
    storm_group.add_argument("--slots", type=int, default=200, help="slots released at once (200)")
    storm_group.add_argument("--storm-doctors", type=int, default=10, help="doctors sharing the slots (10)")
    storm_group.add_argument(
        "--refresh-every",
        type=int,
        default=1,
        help="refresh the free slots after every Nth 409 (1); 0: never, only what each patient saw",
    )
    storm_group.add_argument("--release-lead", type=float, default=15, help="min seconds to the release (15)")
    storm_group.add_argument(
        "--connect-ahead", type=float, default=2, help="seconds before the release connections open (2)"
    )
    storm_group.add_argument(
        "--arrival-spread",
        type=float,
        default=0,
        help="patients send their first request at a random moment in this many seconds after the release (0)",
    )
    storm_group.add_argument("--storm-timeout", type=float, default=300, help="give up after (300 s)")
    storm_group.add_argument("--seed", type=int, default=1, help="random seed of the patients' picks (1)")
    sus = parser.add_argument_group("sustained")
    sus.add_argument("--sustained-clients", type=int, default=32, help="concurrent clients (32)")
    sus.add_argument("--sustained-seconds", type=float, default=10, help="measured seconds (10)")
    sus.add_argument("--sustained-warmup", type=float, default=2, help="unmeasured seconds first (2)")
    sus.add_argument("--sustained-doctors", type=int, default=20, help="doctors, 95 slots/day x 14 days (20)")
    pg = parser.add_argument_group("pgbench")
    pg.add_argument("--pgbench", default=shutil.which("pgbench") or "pgbench", help="path of pgbench")
    pg.add_argument("--pgbench-scale", type=int, default=1, help="pgbench -i -s (1)")
    pg.add_argument("--pgbench-clients", type=int, default=16, help="pgbench -c (16)")
    pg.add_argument("--pgbench-jobs", type=int, default=2, help="pgbench -j (2)")
    pg.add_argument("--pgbench-seconds", type=int, default=10, help="pgbench -T (10)")
    av = parser.add_argument_group("availability")
    av.add_argument("--availability-days", type=int, default=14, help="days asked for (14)")
    av.add_argument("--duration", type=float, default=10, help="seconds of wrk (10)")
    av.add_argument("--warmup", type=float, default=2, help="unmeasured seconds of wrk first (2)")
    av.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    av.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    av.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="path of the wrk binary")
    parser.add_argument(
        "--max-per-facility",
        type=int,
        default=100,
        help="BOOKING_MAX_PER_FACILITY for the server (100, the highest the settings accept)",
    )
    parser.add_argument(
        "--extra-patients", type=int, default=20, help="patients who book the availability doctor (20)"
    )
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432",
        help="local PostgreSQL server; fresh databases are created on it and dropped",
    )
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for /health/ready")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="max seconds to wait for a quiet machine per phase (120)",
    )
    parser.add_argument(
        "--quiet-below", type=float, default=0.25, help="cores busy elsewhere that count as quiet (0.25)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server in each phase (disturbs it)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for bench/run.py or notifications.py"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the server, wrk and pgbench logs")
    args = parser.parse_args(argv)
    args.embedded = False  # bench/run.py's Server: always a fresh database on --pg-url
    if args.slots < 1 or args.storm_doctors < 1 or args.slots % args.storm_doctors:
        parser.error("--slots must be a positive multiple of --storm-doctors")
    if 7 * 60 + (args.slots // args.storm_doctors) * 15 >= 24 * 60:
        parser.error("too many slots per doctor for one day: add --storm-doctors")
    if args.patients < args.slots:
        parser.error("--patients must be at least --slots")
    if args.sustained_doctors < 1 or args.sustained_clients < 1 or args.sustained_seconds < 1:
        parser.error("--sustained-doctors, --sustained-clients and --sustained-seconds must be positive")
    if args.patients < 2 * args.sustained_doctors:
        parser.error("--patients must be at least twice --sustained-doctors")
    if not 1 <= args.availability_days <= 31:
        parser.error("--availability-days must be 1..31")
    if not 1 <= args.max_per_facility <= 100:
        parser.error("--max-per-facility must be 1..100 (api/settings.py)")
    if args.extra_patients < 1:
        parser.error("--extra-patients must be positive")
    if urlsplit(args.pg_url).hostname not in httpbench.LOOPBACK:
        parser.error("--pg-url must point at a loopback address")
    for tool in (args.wrk, args.pgbench):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (Debian: apt-get install wrk postgresql-client)")
    if not httpbench.TELEHEALTH.exists():
        parser.error(f"{httpbench.TELEHEALTH} not found: create the venv and `pip install -e .` first")
    if args.profile and not PY_SPY.exists():
        parser.error(f"{PY_SPY} not found: pip install py-spy")
    return args


def bench_all(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> bool:
    busy = httpbench.machine_busy()
    if busy > 0.2:
        print(f"warning: {busy:.2f} cores already busy before the benchmark; the figures will be low")
    return bench(args, workdir, report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headline = (
        f"{args.patients} patients on {args.slots} slots; sustained {args.sustained_clients} clients x "
        f"{args.sustained_seconds:g}s; availability wrk -t{args.threads} -c{args.connections} {args.duration:g}s; "
        "1 API worker"
    )
    return run_benchmark(args, "booking", headline, bench_all)


if __name__ == "__main__":
    sys.exit(main())
