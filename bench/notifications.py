"""Notification drain: one `telehealth worker` pushing a burst of notifications to the local FCM server.

For each batch size: a fresh database with 5,000 users of 2 devices each, the FCM emulator
(`python -m notifications.fcm_emulator --record N`) and ONE `telehealth worker` as their own
processes; then 20,000 `payment_failed` notifications are enqueued the way domain code does it
(`notifications.enqueue` inside transactions, from several connections at once) while the worker
drains them (40,000 device messages). It prints

  - the enqueue phase's own rate (notifications/s),
  - the drain rate in device messages/s, from the first enqueue commit to the last FCM request,
    and the steady rate (10th to 90th percentile of arrivals),
  - end-to-end latency per device message: arrival at the emulator - notifications.created_at,
  - CPU seconds of the worker, the emulator, PostgreSQL, this script and the rest of the machine,
  - whether each message reached each device exactly once (the emulator's records),
  - the emulator's own ceiling: `wrk` POSTing a realistic messages:send request straight to it,

checked against the target in bench/README.md (>= 2,000 device messages/s). See that file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import importlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# This script is named like the package it measures: `notifications` must be the package.
sys.path.insert(0, str(ROOT))

from run import BenchError, children_cpu, free_port, with_database  # noqa: E402  (bench/run.py)

VENV_BIN = ROOT / ".venv" / "bin"
TELEHEALTH = VENV_BIN / "telehealth"
PYTHON = VENV_BIN / "python"
PY_SPY = VENV_BIN / "py-spy"
LUA_REPORT = BENCH / "report.lua"
HOST = "127.0.0.1"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROJECT_ID = "telehealth-dev"  # the emulator's default
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
KIND = "payment_failed"

TARGET_RATE = 2000.0  # device messages per second, one worker process


@dataclass
class Round:
    batch_size: int
    notifications: int
    device_messages: int
    # Enqueue phase: notifications committed per second, over the wall time of the phase.
    enqueue_seconds: float
    enqueue_rate: float
    # Drain: first enqueue commit -> last FCM request at the emulator.
    drain_seconds: float
    drain_rate: float
    steady_rate: float  # between the 10th and the 90th percentile of arrivals
    rate_during_enqueue: float
    rate_after_enqueue: float
    backlog_at_last_commit: int  # device messages not yet at the emulator when the last commit returned
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    # CPU seconds from the start of the enqueue phase to the last notification recorded as sent.
    window_seconds: float
    cpu_worker: float
    cpu_emulator: float
    cpu_postgres: float
    cpu_bench: float
    cpu_other: float
    delivered: int  # distinct (notification, device) pairs answered 200
    duplicates: int
    missing: int
    unexpected: int
    errors: int  # messages:send requests not answered 200
    deliveries_sent: int  # push_deliveries rows with outcome 'sent'
    ceiling_rps: float = 0.0
    ceiling_p99_ms: float = 0.0
    ceiling_errors: int = 0
    ceiling_cpu_emulator: float = 0.0  # cores
    ceiling_cpu_wrk: float = 0.0

    @property
    def exactly_once(self) -> bool:
        return (
            self.delivered == self.device_messages
            and not (self.duplicates or self.missing or self.unexpected or self.errors)
            and self.deliveries_sent == self.device_messages
        )


# --------------------------------------------------------------------------- helpers


def http(method: str, url: str, timeout: float = 10) -> Any:
    """One request to the emulator on loopback; its JSON answer."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise BenchError(f"refusing a non-loopback URL: {url}")
    request = urllib.request.Request(url, method=method)  # noqa: S310 (http on loopback only)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise BenchError(f"{method} {urlsplit(url).path} answered {exc.code}") from None


async def admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(with_database(server_url, "postgres"), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def percentile(ordered: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def _proc_stats() -> list[tuple[int, int, str, int]]:
    """(pid, process group, command name, CPU ticks) of every process we may read.

    The ticks include those of its children that exited and were waited for: PostgreSQL's
    postmaster thus keeps the CPU time of the enqueue connections' backends after they close.
    """
    stats = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime cutime cstime
        ticks = sum(int(v) for v in fields[11:15])
        stats.append((int(entry.name), int(fields[2]), comm, ticks))
    return stats


def cpu_snapshot(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process group, of PostgreSQL, of this process and of the machine."""
    by_group = dict.fromkeys(groups, 0)
    names = {pgid: name for name, pgid in groups.items()}
    postgres = 0
    for _pid, pgid, comm, ticks in _proc_stats():
        if comm.startswith("postgres"):
            postgres += ticks
        elif pgid in names:
            by_group[names[pgid]] += ticks
    # /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    machine = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    own = os.times()
    return {
        **{name: t / CLOCK_TICKS for name, t in by_group.items()},
        "postgres": postgres / CLOCK_TICKS,
        "bench": own.user + own.system,
        "machine": (sum(machine) - machine[3] - machine[4]) / CLOCK_TICKS,
    }


def machine_busy(seconds: float = 1.0) -> float:
    before = cpu_snapshot({})["machine"]
    time.sleep(seconds)
    return (cpu_snapshot({})["machine"] - before) / seconds


async def push_states(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        r["push_state"]: r["count"]
        for r in await conn.fetch("SELECT push_state, count(*) FROM notifications GROUP BY 1")
    }


class Process:
    """A subprocess in its own process group (signals reach all of it), output to a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {self.name} log)"

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """`signum` to the process group, SIGKILL if it outlives `timeout`; its exit status."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # anything it left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


# --------------------------------------------------------------------------- one round


class Scenario:
    """One batch size: database, emulator, worker, enqueue, drain, checks, emulator ceiling."""

    def __init__(self, args: argparse.Namespace, batch_size: int, workdir: Path) -> None:
        self.args = args
        self.batch_size = batch_size
        self.workdir = workdir
        self.database = f"telehealth_bench_{os.getpid()}_notif_b{batch_size}"
        self.url = with_database(args.pg_url, self.database)
        self.service_account = workdir / f"fcm-service-account-b{batch_size}.json"
        self.profile_path = workdir / f"worker-profile-b{batch_size}.txt"
        self.emulator: Process | None = None
        self.worker: Process | None = None
        self.profiler: Process | None = None
        self.emulator_url = ""
        self.created = False
        self.env = {
            **os.environ,
            "TELEHEALTH_ENV": "dev",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            "DATA_DIR": str(workdir / f"data-b{batch_size}"),
            "DATABASE_URL": self.url,
        }
        for name in ("REDIS_URL", "FCM_CREDENTIALS_FILE", "FCM_ENDPOINT", "NOTIFICATION_WORKER"):
            self.env.pop(name, None)
        for name in list(self.env):
            if name.startswith("NOTIFICATION_"):
                self.env.pop(name)

    @property
    def notifications(self) -> int:
        n: int = self.args.notifications
        return n

    @property
    def device_messages(self) -> int:
        n: int = self.args.notifications * self.args.devices_per_user
        return n

    # -- set-up

    def prepare_database(self) -> None:
        print(f"  database {self.database}: create, migrate, load users and devices", flush=True)
        asyncio.run(admin(self.args.pg_url, f'CREATE DATABASE "{self.database}"'))
        self.created = True
        migrated = subprocess.run(
            [str(TELEHEALTH), "migrate"], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        if migrated.returncode != 0:
            raise BenchError(f"telehealth migrate failed:\n{migrated.stderr[-2000:]}")
        started = time.monotonic()
        users, devices = asyncio.run(self._load_people())
        print(
            f"  loaded {users} users and {devices} devices in {time.monotonic() - started:.1f}s", flush=True
        )

    async def _load_people(self) -> tuple[int, int]:
        """Users and their devices with COPY: tokens as long as real FCM tokens, none with an error prefix."""
        users = []
        devices = []
        for i in range(self.args.users):
            user_id = uuid.uuid4()
            users.append(
                (
                    user_id,
                    f"099{i:09d}",
                    f"Người Dùng Thử {i}",
                    dt.date(1950, 1, 1) + dt.timedelta(days=i % 20000),
                    "male" if i % 2 else "female",
                )
            )
            for d in range(self.args.devices_per_user):
                devices.append(
                    (
                        uuid.uuid4(),
                        user_id,
                        f"bench{i}x{d}:{secrets.token_urlsafe(105)}",
                        "android" if d % 2 == 0 else "ios",
                        "vi" if (i + d) % 4 else "en",
                    )
                )
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "users", records=users, columns=["id", "personal_id", "full_name", "birthdate", "sex"]
                )
                await conn.copy_records_to_table(
                    "devices", records=devices, columns=["id", "user_id", "token", "platform", "locale"]
                )
            await conn.execute("ANALYZE users; ANALYZE devices")
        finally:
            await conn.close()
        return len(users), len(devices)

    def start_emulator(self) -> None:
        port = free_port()
        # Room for the drain's messages (about 350 bytes each) and a few retries. The ceiling run
        # starts from an empty record (DELETE) and the emulator only counts what does not fit.
        record = self.device_messages + 1_000
        command = [
            str(PYTHON),
            "-m",
            "notifications.fcm_emulator",
            "--host",
            HOST,
            "--port",
            str(port),
            "--service-account",
            str(self.service_account),
            "--record",
            str(record),
        ]
        print(f"  emulator: python -m notifications.fcm_emulator --port {port} --record {record}", flush=True)
        self.emulator = Process(
            "emulator", command, self.env, self.workdir / f"emulator-b{self.batch_size}.log"
        )
        deadline = time.monotonic() + self.args.start_timeout
        while time.monotonic() < deadline:
            if not self.emulator.alive():
                raise BenchError(f"the emulator exited:\n{self.emulator.log_tail()}")
            for line in self.emulator.log_path.read_text(errors="replace").splitlines():
                if line.startswith("FCM emulator listening on "):
                    self.emulator_url = line.split()[-1]
                    http("GET", f"{self.emulator_url}/emulator/stats")
                    return
            time.sleep(0.05)
        raise BenchError(f"the emulator did not start within {self.args.start_timeout}s")

    @property
    def send_url(self) -> str:
        return f"{self.emulator_url}/v1/projects/{PROJECT_ID}/messages:send"

    async def start_worker(self, conn: asyncpg.Connection) -> None:
        env = {
            **self.env,
            "FCM_CREDENTIALS_FILE": str(self.service_account),
            "FCM_ENDPOINT": self.send_url,
            "NOTIFICATION_BATCH_SIZE": str(self.batch_size),
            "NOTIFICATION_WORKER": "external",
        }
        print(f"  worker: telehealth worker, NOTIFICATION_BATCH_SIZE={self.batch_size}", flush=True)
        self.worker = Process(
            "worker", [str(TELEHEALTH), "worker"], env, self.workdir / f"worker-b{self.batch_size}.log"
        )
        # Started: LISTENing for the outbox's NOTIFY, and its first (empty) claim is done.
        deadline = time.monotonic() + self.args.start_timeout
        while time.monotonic() < deadline:
            if not self.worker.alive():
                raise BenchError(
                    f"the worker exited with {self.worker.proc.returncode}:\n{self.worker.log_tail()}"
                )
            ready = await conn.fetchval(
                """SELECT count(*) FILTER (WHERE query LIKE 'LISTEN %') > 0
                          AND count(*) FILTER (WHERE query LIKE 'WITH due AS%' AND state = 'idle') > 0
                     FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"""
            )
            if ready:
                return
            await asyncio.sleep(0.05)
        raise BenchError(
            f"the worker did not start within {self.args.start_timeout}s:\n{self.worker.log_tail()}"
        )

    def start_profiler(self) -> None:
        assert self.worker is not None
        command = [
            str(PY_SPY),
            "record",
            "--pid",
            str(self.worker.pid),
            "--rate",
            str(self.args.profile_rate),
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(self.profile_path),
        ]
        self.profiler = Process("py-spy", command, self.env, self.workdir / f"py-spy-b{self.batch_size}.log")

    def stop_profiler(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop(signal.SIGINT, timeout=30)  # py-spy writes its output on SIGINT
        if not self.profile_path.exists():
            print(f"  warning: py-spy wrote no profile:\n{self.profiler.log_tail()}", file=sys.stderr)

    # -- the measured part

    async def enqueue_all(self, user_ids: list[uuid.UUID]) -> list[float]:
        """Enqueue `notifications` messages round-robin over the users, as domain code does: inside
        transactions of `per_transaction` each, on `enqueue_connections` connections at once.
        Returns each transaction's commit time (time.time() as COMMIT returned)."""
        enqueue: Callable[..., Awaitable[uuid.UUID | None]] = importlib.import_module("notifications").enqueue
        total, per_transaction = self.notifications, self.args.per_transaction
        chunks = [
            [user_ids[i % len(user_ids)] for i in range(start, min(start + per_transaction, total))]
            for start in range(0, total, per_transaction)
        ]
        pending = iter(chunks)
        commits: list[float] = []

        async def one_connection() -> None:
            conn = await asyncpg.connect(self.url, server_settings={"application_name": "bench-enqueue"})
            try:
                for chunk in pending:
                    async with conn.transaction():
                        for user_id in chunk:
                            await enqueue(conn, user_id, KIND, {"invoice_id": uuid.uuid4()})
                    commits.append(time.time())
            finally:
                await conn.close()

        await asyncio.gather(*(one_connection() for _ in range(self.args.enqueue_connections)))
        return commits

    async def wait_drained(self, conn: asyncpg.Connection, started: float) -> None:
        """Until the emulator answered 200 to every device message and every notification is `sent`."""
        assert self.worker is not None
        deadline = time.monotonic() + self.args.timeout
        last_print = time.monotonic()
        delivered = 0
        while True:
            if not self.worker.alive():
                raise BenchError(
                    f"the worker exited with {self.worker.proc.returncode}:\n{self.worker.log_tail()}"
                )
            stats = await asyncio.to_thread(http, "GET", f"{self.emulator_url}/emulator/stats")
            delivered = int(stats["statuses"].get("200", 0))
            # The database only once the emulator has seen everything: its polling would cost PG CPU.
            if delivered >= self.device_messages:
                states = await push_states(conn)
                if states.get("sent", 0) == self.notifications:
                    return
            now = time.monotonic()
            if now > deadline:
                states = await push_states(conn)
                raise BenchError(
                    f"not drained within {self.args.timeout}s: emulator statuses {stats['statuses']}, "
                    f"notification states {states}\n--- worker log (tail)\n{self.worker.log_tail()}"
                )
            if now - last_print >= 5:
                print(
                    f"    {delivered:>6}/{self.device_messages} device messages at the emulator "
                    f"after {time.time() - started:.1f}s",
                    flush=True,
                )
                last_print = now
            await asyncio.sleep(0.05)

    async def measure(self) -> Round:
        conn = await asyncpg.connect(self.url, server_settings={"application_name": "bench-monitor"})
        try:
            user_ids = [r["id"] for r in await conn.fetch("SELECT id FROM users ORDER BY personal_id")]
            await self.start_worker(conn)
            assert self.worker is not None and self.emulator is not None
            if self.args.profile:
                self.start_profiler()
                await asyncio.sleep(0.5)  # py-spy attaches
            groups = {"worker": self.worker.pid, "emulator": self.emulator.pid}
            if self.profiler is not None:
                groups["py-spy"] = self.profiler.pid
            print(
                f"  enqueue {self.notifications} notifications for {len(user_ids)} users: "
                f"{self.args.enqueue_connections} connections, {self.args.per_transaction} per transaction; "
                "the worker drains meanwhile",
                flush=True,
            )
            cpu_before = cpu_snapshot(groups)
            wall_before = time.monotonic()
            started = time.time()
            commits = await self.enqueue_all(user_ids)
            enqueue_seconds = time.time() - started
            print(
                f"  enqueued in {enqueue_seconds:.2f}s ({self.notifications / enqueue_seconds:.0f} notifications/s)",
                flush=True,
            )
            await self.wait_drained(conn, started)
            wall = time.monotonic() - wall_before
            cpu_after = cpu_snapshot(groups)
            self.stop_profiler()
            cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
            known = sum(v for name, v in cpu.items() if name != "machine")

            created = {
                r["id"]: r["created"]
                for r in await conn.fetch(
                    "SELECT id::text AS id, extract(epoch FROM created_at)::float8 AS created FROM notifications"
                )
            }
            expected = {
                (r["id"], r["token"])
                for r in await conn.fetch(
                    """SELECT n.id::text AS id, d.token FROM notifications n
                         JOIN devices d ON d.user_id = n.user_id AND d.active"""
                )
            }
            deliveries_sent = await conn.fetchval(
                "SELECT count(*) FROM push_deliveries WHERE outcome = 'sent'"
            )
        finally:
            await conn.close()

        answer = await asyncio.to_thread(http, "GET", f"{self.emulator_url}/emulator/arrivals", 60)
        if answer["dropped"]:
            raise BenchError(f"the emulator dropped {answer['dropped']} arrival records: raise --record")
        arrivals = [(nid, token, at) for nid, token, at, status in answer["arrivals"] if status == 200]
        errors = sum(1 for *_, status in answer["arrivals"] if status != 200)
        counts = collections.Counter((nid, token) for nid, token, _ in arrivals)
        received = set(counts)
        latencies = sorted(at - created[nid] for nid, _, at in arrivals if nid in created)
        times = sorted(at for *_, at in arrivals)
        first_commit, last_commit = min(commits), max(commits)
        last_arrival = times[-1] if times else first_commit
        drain_seconds = last_arrival - first_commit
        during = sum(1 for t in times if t <= last_commit)
        after = len(times) - during
        low, high = percentile(times, 0.10), percentile(times, 0.90)
        ms = [v * 1000 for v in latencies]
        return Round(
            batch_size=self.batch_size,
            notifications=self.notifications,
            device_messages=self.device_messages,
            enqueue_seconds=enqueue_seconds,
            enqueue_rate=self.notifications / enqueue_seconds,
            drain_seconds=drain_seconds,
            drain_rate=len(times) / drain_seconds if drain_seconds > 0 else 0.0,
            steady_rate=0.8 * len(times) / (high - low) if high > low else 0.0,
            rate_during_enqueue=during / (last_commit - first_commit) if last_commit > first_commit else 0.0,
            rate_after_enqueue=after / (last_arrival - last_commit) if last_arrival > last_commit else 0.0,
            backlog_at_last_commit=self.device_messages - during,
            latency_p50_ms=percentile(ms, 0.50),
            latency_p90_ms=percentile(ms, 0.90),
            latency_p99_ms=percentile(ms, 0.99),
            latency_max_ms=ms[-1] if ms else 0.0,
            window_seconds=wall,
            cpu_worker=cpu["worker"],
            cpu_emulator=cpu["emulator"],
            cpu_postgres=cpu["postgres"],
            cpu_bench=cpu["bench"],
            cpu_other=max(0.0, cpu["machine"] - known),
            delivered=len(received & expected),
            duplicates=sum(n - 1 for n in counts.values() if n > 1),
            missing=len(expected - received),
            unexpected=len(received - expected),
            errors=errors,
            deliveries_sent=int(deliveries_sent),
        )

    # -- the emulator's ceiling

    def ceiling(self, result: Round) -> None:
        """`wrk` POSTing a realistic messages:send request, with a valid bearer token, straight to the emulator."""
        assert self.emulator is not None
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        http("DELETE", f"{self.emulator_url}/emulator/arrivals")  # the drain's records are read
        credential = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(self.service_account), scopes=[FCM_SCOPE]
        )
        credential.refresh(Request())  # the JWT-bearer grant at the emulator's /token
        body = json.dumps(
            {
                "message": {
                    "android": {"priority": "high"},
                    "data": {
                        "kind": KIND,
                        "notification_id": str(uuid.uuid4()),
                        "invoice_id": str(uuid.uuid4()),
                    },
                    "notification": {
                        "body": "Giao dịch chưa hoàn tất. Bạn có thể thử lại trong ứng dụng.",
                        "title": "Thanh toán không thành công",
                    },
                    "fid": f"ceiling:{secrets.token_urlsafe(105)}",
                }
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        script = self.workdir / "ceiling.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = [==[{body}]==]\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["X-GOOG-API-FORMAT-VERSION"] = "2"\n'
            f'wrk.headers["Authorization"] = "Bearer {credential.token}"\n' + LUA_REPORT.read_text()
        )
        command = [
            self.args.wrk,
            "-t1",
            f"-c{self.args.ceiling_connections}",
            f"-d{max(1, round(self.args.ceiling_duration))}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(script),
            self.send_url,
        ]
        print(
            f"  emulator ceiling: wrk -t1 -c{self.args.ceiling_connections} "
            f"-d{self.args.ceiling_duration:g}s POST messages:send",
            flush=True,
        )
        groups = {"emulator": self.emulator.pid}
        before, wrk_before, wall_before = cpu_snapshot(groups), children_cpu(), time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, timeout=self.args.ceiling_duration + 30)
        wall = time.monotonic() - wall_before
        after, wrk_cpu = cpu_snapshot(groups), children_cpu() - wrk_before
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if run.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({run.returncode}):\n{(run.stdout + run.stderr)[-2000:]}")
        summary = json.loads(line.removeprefix("BENCH_JSON "))
        result.ceiling_rps = summary["requests"] / (summary["duration_us"] / 1e6)
        result.ceiling_p99_ms = summary["p99_us"] / 1000
        result.ceiling_errors = sum(int(v) for k, v in summary.items() if k.startswith("errors_"))
        result.ceiling_cpu_emulator = (after["emulator"] - before["emulator"]) / wall
        result.ceiling_cpu_wrk = wrk_cpu / wall
        http("DELETE", f"{self.emulator_url}/emulator/arrivals")

    # -- tear-down

    def stop(self) -> None:
        if self.profiler is not None and self.profiler.alive():
            self.stop_profiler()
        for process in (self.worker, self.emulator):
            if process is not None:
                status = process.stop()
                if status not in (0, -signal.SIGTERM):
                    print(f"  {process.name} exited with {status}:\n{process.log_tail(10)}", file=sys.stderr)
        if self.created:
            try:
                asyncio.run(
                    admin(self.args.pg_url, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                )
                print(f"  database {self.database}: dropped", flush=True)
            except Exception as exc:
                print(f"  could not drop database {self.database}: {exc}", file=sys.stderr, flush=True)

    def run(self) -> Round:
        print(f"\n== batch size {self.batch_size}", flush=True)
        try:
            self.prepare_database()
            self.start_emulator()
            result = asyncio.run(self.measure())
            print(
                f"  drained {result.device_messages} device messages in {result.drain_seconds:.2f}s: "
                f"{result.drain_rate:.0f}/s, latency p50 {result.latency_p50_ms:.0f} ms, "
                f"p99 {result.latency_p99_ms:.0f} ms",
                flush=True,
            )
            self.ceiling(result)
            print(f"  emulator ceiling: {result.ceiling_rps:.0f} req/s", flush=True)
            if self.args.profile and self.profile_path.exists():
                print_profile(self.profile_path, self.args.profile_top)
            return result
        except BenchError:
            for process in (self.worker, self.emulator):
                if process is not None:
                    print(f"--- {process.name} log (tail)\n{process.log_tail()}", file=sys.stderr)
            raise
        finally:
            # Let the clean-up finish: a second Ctrl-C or SIGTERM would leave processes or the database behind.
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self.stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


# --------------------------------------------------------------------------- report


def print_profile(path: Path, top: int) -> None:
    """The worker's busiest frames from py-spy's raw output: own time and time including callees."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [_short_frame(f) for f in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return
    print(f"  worker profile ({total} busy samples, {path}):")
    print("    own time")
    for frame, samples in own.most_common(top):
        print(f"      {samples / total:>6.1%}  {frame}")
    print("    including callees")
    for frame, samples in inclusive.most_common(top):
        print(f"      {samples / total:>6.1%}  {frame}")


def _short_frame(frame: str) -> str:
    # py-spy: "function (path/to/file.py:line)"; keep the function and the file's tail, not the line.
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})"


def print_table(results: list[Round]) -> None:
    header = (
        f"{'batch':>5} {'msgs':>6} {'enqueue/s':>9} {'drain s':>8} {'drain/s':>8} {'steady/s':>8} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}  {'once':>4}  "
        f"{'CPU s: worker / emulator / pg / bench / other':<46} {'ceiling/s':>9}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        cpu = f"{r.cpu_worker:.1f} / {r.cpu_emulator:.1f} / {r.cpu_postgres:.1f} / {r.cpu_bench:.1f} / {r.cpu_other:.1f}"
        print(
            f"{r.batch_size:>5} {r.device_messages:>6} {r.enqueue_rate:>9.0f} {r.drain_seconds:>8.2f} "
            f"{r.drain_rate:>8.0f} {r.steady_rate:>8.0f} {r.latency_p50_ms:>7.0f} {r.latency_p90_ms:>7.0f} "
            f"{r.latency_p99_ms:>7.0f} {r.latency_max_ms:>7.0f}  {'yes' if r.exactly_once else 'NO':>4}  "
            f"{cpu:<46} {r.ceiling_rps:>9.0f}"
        )
    for r in results:
        if r.cpu_other / r.window_seconds > 0.2:
            print(
                f"\nwarning: batch {r.batch_size}: other work used {r.cpu_other / r.window_seconds:.2f} cores "
                "during the drain; its figures are depressed, re-run it on a quiet machine."
            )
        print(
            f"\nbatch {r.batch_size}: enqueue {r.notifications} notifications in {r.enqueue_seconds:.2f}s; "
            f"drain {r.rate_during_enqueue:.0f}/s while enqueueing, {r.rate_after_enqueue:.0f}/s after "
            f"({r.backlog_at_last_commit} device messages still to send at the last commit)."
            f"\n  CPU over {r.window_seconds:.1f}s: worker {r.cpu_worker / r.window_seconds:.2f} cores, "
            f"emulator {r.cpu_emulator / r.window_seconds:.2f}, PostgreSQL {r.cpu_postgres / r.window_seconds:.2f}, "
            f"bench (enqueue) {r.cpu_bench / r.window_seconds:.2f}, other {r.cpu_other / r.window_seconds:.2f}."
            f"\n  Exactly once: {r.delivered}/{r.device_messages} (notification, device) pairs delivered, "
            f"{r.duplicates} duplicates, {r.missing} missing, {r.unexpected} unexpected, {r.errors} non-200 "
            f"answers; {r.deliveries_sent} push_deliveries rows 'sent'."
            f"\n  Emulator ceiling: {r.ceiling_rps:.0f} req/s (p99 {r.ceiling_p99_ms:.1f} ms, "
            f"{r.ceiling_errors} errors, emulator {r.ceiling_cpu_emulator:.2f} cores, wrk {r.ceiling_cpu_wrk:.2f}) "
            f"vs drain {r.drain_rate:.0f}/s: "
            + (
                f"{r.ceiling_rps / r.drain_rate:.1f}x, the emulator was not the bottleneck."
                if r.drain_rate and r.ceiling_rps >= 3 * r.drain_rate
                else "too close: the emulator may have limited the drain."
            )
        )


def check_targets(results: list[Round]) -> bool:
    print("\nTargets")
    ok = True
    for r in results:
        checks = [
            (
                f"drain >= {TARGET_RATE:,.0f} device messages/s",
                f"{r.drain_rate:,.0f}/s",
                r.drain_rate >= TARGET_RATE,
            ),
            (
                "each message reached each device exactly once",
                "yes" if r.exactly_once else "no",
                r.exactly_once,
            ),
            (
                "emulator ceiling >= 3x the drain rate",
                f"{r.ceiling_rps:,.0f}/s",
                r.ceiling_rps >= 3 * r.drain_rate,
            ),
        ]
        for name, value, passed in checks:
            ok &= passed
            print(f"  batch={r.batch_size:<4} {name:<48} {value:>10}  {'PASS' if passed else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[250],
        help="NOTIFICATION_BATCH_SIZE of the worker, 1..500; one round (fresh database) per value (250)",
    )
    parser.add_argument("--notifications", type=int, default=20_000, help="notifications to enqueue (20000)")
    parser.add_argument("--users", type=int, default=5_000, help="users they go to, round-robin (5000)")
    parser.add_argument("--devices-per-user", type=int, default=2, help="active devices of each user (2)")
    parser.add_argument(
        "--enqueue-connections", type=int, default=4, help="connections enqueueing at once (4)"
    )
    parser.add_argument("--per-transaction", type=int, default=50, help="notifications per transaction (50)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for the drain (300)")
    parser.add_argument(
        "--ceiling-duration", type=float, default=5, help="seconds of wrk against the emulator (5)"
    )
    parser.add_argument(
        "--ceiling-connections", type=int, default=64, help="wrk connections against the emulator (64)"
    )
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432",
        help="local PostgreSQL server; a fresh database is created on it per round",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60, help="seconds for the emulator and worker to start"
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="path of the wrk binary")
    parser.add_argument(
        "--profile", action="store_true", help="profile the worker with py-spy during the drain (kept logs)"
    )
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (100)")
    parser.add_argument("--profile-top", type=int, default=20, help="frames to print from the profile (20)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker, emulator and wrk logs")
    args = parser.parse_args(argv)
    if any(not 1 <= b <= 500 for b in args.batch_size):
        parser.error("--batch-size must be 1..500 (NOTIFICATION_BATCH_SIZE)")
    if min(args.notifications, args.users, args.devices_per_user, args.enqueue_connections) < 1:
        parser.error("--notifications, --users, --devices-per-user and --enqueue-connections must be >= 1")
    if args.per_transaction < 1 or args.timeout <= 0 or args.ceiling_duration < 1:
        parser.error("--per-transaction must be >= 1, --timeout > 0 and --ceiling-duration >= 1")
    if not 1 <= args.ceiling_connections <= 10_000:
        parser.error("--ceiling-connections must be 1..10000")
    if urlsplit(args.pg_url).hostname not in LOOPBACK:
        parser.error("--pg-url must point at a loopback address")
    if not shutil.which(args.wrk):
        parser.error("wrk not found: install it (Debian: apt-get install wrk) or pass --wrk PATH")
    if not TELEHEALTH.exists():
        parser.error(f"{TELEHEALTH} not found: create the venv and `pip install -e .` first")
    if args.profile and not PY_SPY.exists():
        parser.error(f"{PY_SPY} not found: pip install py-spy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    workdir = Path(tempfile.mkdtemp(prefix="telehealth-bench-notifications-"))
    cpus = os.cpu_count()
    print(
        f"bench: {args.notifications} notifications x {args.devices_per_user} devices for {args.users} users, "
        f"one `telehealth worker`, batch sizes {args.batch_size}, {cpus} CPUs, {args.pg_url}"
    )
    busy = machine_busy()
    if busy > 0.2:
        print(f"warning: {busy:.2f} cores already busy before the benchmark; the figures will be low")
    results: list[Round] = []
    status = 0
    try:
        for batch_size in args.batch_size:
            results.append(Scenario(args, batch_size, workdir).run())
    except KeyboardInterrupt:
        print("\ninterrupted: processes stopped, database dropped", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        status = 2
    if results:
        print_table(results)
        print(
            "\ndrain/s: device messages from the first enqueue commit to the last request at the emulator; "
            "steady/s: between the 10th and 90th percentile of arrivals. Latency: arrival at the emulator - "
            "notifications.created_at (the enqueue transaction's now()). CPU s: from the start of the enqueue "
            f"to the last notification marked sent ({cpus} cores shared by all); 'other' well above a few "
            "tenths of a second per second means other work disturbed the figures."
        )
        if not check_targets(results) and status == 0:
            status = 1
        if status in (0, 1):
            print(f"\n{'ALL TARGETS PASS' if status == 0 else 'SOME TARGETS FAIL'}")
        if args.json:
            report = {
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "results": [asdict(r) | {"exactly_once": r.exactly_once} for r in results],
            }
            args.json.write_text(json.dumps(report, indent=2))
    if args.keep_logs or args.profile or status == 2:
        print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
