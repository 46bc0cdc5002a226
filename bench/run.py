"""Throughput and latency of the real server under load, against a bare-route baseline.

For each worker count: a fresh database, `telehealth serve` in its own process group, one
sign-in, then `wrk` (a separate process) at N connections against

  baseline   GET /health/live            bare unauthenticated route, small JSON body
  facility   GET /v1/facilities/{id}     public, one database query
  me         GET /v1/me                  bearer token verified, user loaded from the database

and a table of requests/s, p50, p99 and throughput relative to the baseline, checked
against the targets in bench/README.md. See that file for how to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
TELEHEALTH = ROOT / ".venv" / "bin" / "telehealth"
LUA_REPORT = Path(__file__).resolve().parent / "report.lua"
HOST = "127.0.0.1"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEMO_DOCTOR = "011080000101"
ACCESS_TOKEN_TTL = 900  # seconds; the server's maximum (api/settings.py ACCESS_TOKEN_TTL_MAX)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets: throughput as a share of the baseline on the same server, and p99 latency.
MIN_RATIO = {"facility": 0.50, "me": 0.35}
MAX_P99_MS = 20.0


class BenchError(Exception):
    pass


@dataclass
class Endpoint:
    key: str
    label: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    workers: int
    endpoint: str
    label: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    # Cores used on average during the measured run: the server's processes together and the
    # busiest one, PostgreSQL, wrk, and everything else on the machine (noise from other work).
    cpu_server: float
    cpu_server_busiest: float
    cpu_postgres: float
    cpu_wrk: float
    cpu_other: float
    ratio: float = 0.0
    rounds: int = 1
    rps_min: float = 0.0
    rps_max: float = 0.0


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def http(method: str, url: str, *, body: Any = None, token: str | None = None, timeout: float = 5) -> Any:
    """One JSON request to the server under test; raises BenchError on a non-2xx answer."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise BenchError(f"refusing a non-loopback URL: {url}")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (http on loopback only)
    request.add_header("accept", "application/json")
    if data is not None:
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise BenchError(f"{method} {urlsplit(url).path} answered {exc.code}: {detail}") from None


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _admin(server_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(with_database(server_url, "postgres"), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(server_url: str, name: str) -> None:
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))


def drop_database(server_url: str, name: str) -> None:
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _proc_stats() -> list[tuple[int, int, str, int]]:
    """(pid, process group, command name, CPU ticks) of every process we may read."""
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
        # After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        stats.append((int(entry.name), int(fields[2]), comm, int(fields[11]) + int(fields[12])))
    return stats


def cpu_snapshot(server_pgid: int) -> dict[str, Any]:
    """CPU seconds so far: the server's processes (each and together), PostgreSQL, the whole machine."""
    per_process: dict[int, float] = {}
    postgres = 0
    for pid, pgid, comm, ticks in _proc_stats():
        if comm.startswith("postgres"):
            postgres += ticks
        elif pgid == server_pgid:
            per_process[pid] = ticks / CLOCK_TICKS
    # /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return {
        "server": sum(per_process.values()),
        "per_process": per_process,
        "postgres": postgres / CLOCK_TICKS,
        "machine": busy / CLOCK_TICKS,
    }


def machine_busy(seconds: float = 1.0) -> float:
    """Cores busy on the machine over `seconds`, before the benchmark starts anything."""
    before = cpu_snapshot(-1)["machine"]
    time.sleep(seconds)
    return (cpu_snapshot(-1)["machine"] - before) / seconds


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- the server


class Server:
    """`telehealth serve` as a subprocess in its own process group, with its database."""

    def __init__(self, args: argparse.Namespace, workers: int, workdir: Path) -> None:
        self.args = args
        self.workers = workers
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = workdir / f"server-w{workers}.log"
        self.database: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "TELEHEALTH_ENV": "dev",
            "LOG_LEVEL": "WARNING",
            "PUBLIC_BASE_URL": self.base,
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("REDIS_URL", "DATABASE_URL", "VNEID_ISSUER", "VNEID_AUDIENCE", "VNEID_JWKS_URL"):
            self.env.pop(name, None)
        if args.embedded:
            self.env.setdefault("DATA_DIR", str(ROOT / ".data"))
        else:
            self.env["DATA_DIR"] = str(workdir / f"data-w{workers}")  # the dev issuer's key lives here
            self.database = f"telehealth_bench_{os.getpid()}_w{workers}"
            self.env["DATABASE_URL"] = with_database(args.pg_url, self.database)

    def start(self) -> None:
        if self.database:
            print(f"  database {self.database}: create, migrate, seed", flush=True)
            create_database(self.args.pg_url, self.database)
            seeded = subprocess.run(
                [str(TELEHEALTH), "seed"], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            if seeded.returncode != 0:
                raise BenchError(f"telehealth seed failed:\n{seeded.stderr[-2000:]}")
        print(f"  server: telehealth serve --port {self.port} --workers {self.workers}", flush=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(TELEHEALTH),
                    "serve",
                    "--host",
                    HOST,
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGTERM reaches every worker
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.args.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, BenchError, ValueError):
                if http("GET", f"{self.base}/health/ready", timeout=2).get("status") == "ok":
                    return
            time.sleep(0.25)
        raise BenchError(f"the server was not ready within {self.args.start_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def sign_in(self) -> str:
        """The one sign-in of this run: a dev-issuer ID token exchanged for an access token."""
        minted = subprocess.run(
            [str(TELEHEALTH), "dev-token", DEMO_DOCTOR],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if minted.returncode != 0:
            raise BenchError(f"telehealth dev-token failed:\n{minted.stderr[-2000:]}")
        pair = http("POST", f"{self.base}/v1/auth/vneid", body={"id_token": minted.stdout.strip()})
        token: str = pair["access_token"]
        return token

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL if it outlives the graceful timeout; then drop the database."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc is not None:  # workers that outlived the parent, if any
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.database:
            try:
                drop_database(self.args.pg_url, self.database)
                print(f"  database {self.database}: dropped", flush=True)
            except Exception as exc:
                print(f"  could not drop database {self.database}: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- load


def run_wrk(
    args: argparse.Namespace, server: Server, endpoint: Endpoint, seconds: float, raw_log: Path | None
) -> tuple[dict[str, float], float]:
    """Run wrk once; return its parsed summary and its own CPU seconds."""
    command = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(LUA_REPORT),
    ]
    for name, value in endpoint.headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(f"{server.base}{endpoint.path}")
    before = children_cpu()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wrk_cpu = children_cpu() - before
    if raw_log is not None:
        with raw_log.open("a") as log:
            log.write(f"$ {' '.join(command[:-1])} {endpoint.path}\n{output}\n")
    line = next((ln for ln in output.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{output[-2000:]}")
    summary: dict[str, float] = json.loads(line.removeprefix("BENCH_JSON "))
    return summary, wrk_cpu


def measure(args: argparse.Namespace, server: Server, endpoint: Endpoint, workdir: Path) -> Result:
    assert server.proc is not None
    raw_log = workdir / f"wrk-w{server.workers}.log"
    if args.warmup > 0:
        run_wrk(args, server, endpoint, args.warmup, None)
    cpu_before = cpu_snapshot(server.proc.pid)
    started = time.monotonic()
    summary, wrk_cpu = run_wrk(args, server, endpoint, args.duration, raw_log)
    wall = time.monotonic() - started
    cpu_after = cpu_snapshot(server.proc.pid)
    seconds = summary["duration_us"] / 1e6
    errors = sum(int(v) for k, v in summary.items() if k.startswith("errors_"))
    cpu = {k: (cpu_after[k] - cpu_before[k]) / wall for k in ("server", "postgres", "machine")}
    per_process = [
        (ticks - cpu_before["per_process"].get(pid, 0.0)) / wall
        for pid, ticks in cpu_after["per_process"].items()
    ]
    return Result(
        workers=server.workers,
        endpoint=endpoint.key,
        label=endpoint.label,
        requests=int(summary["requests"]),
        seconds=round(seconds, 3),
        rps=summary["requests"] / seconds,
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        errors=errors,
        cpu_server=cpu["server"],
        cpu_server_busiest=max(per_process, default=0.0),
        cpu_postgres=cpu["postgres"],
        cpu_wrk=wrk_cpu / wall,
        cpu_other=max(0.0, cpu["machine"] - cpu["server"] - cpu["postgres"] - wrk_cpu / wall),
        rps_min=summary["requests"] / seconds,
        rps_max=summary["requests"] / seconds,
    )


def combine(rounds: list[Result]) -> Result:
    """One row from several rounds of the same endpoint: the median of each figure, errors summed."""
    first = rounds[0]
    median = {
        name: statistics.median(getattr(r, name) for r in rounds)
        for name in (
            "seconds",
            "rps",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "cpu_server",
            "cpu_server_busiest",
            "cpu_postgres",
            "cpu_wrk",
            "cpu_other",
        )
    }
    return Result(
        workers=first.workers,
        endpoint=first.endpoint,
        label=first.label,
        requests=sum(r.requests for r in rounds),
        errors=sum(r.errors for r in rounds),
        rounds=len(rounds),
        rps_min=min(r.rps for r in rounds),
        rps_max=max(r.rps for r in rounds),
        **median,
    )


def bench_workers(
    args: argparse.Namespace, workers: int, workdir: Path, all_rounds: list[Result]
) -> list[Result]:
    print(f"\n== {workers} worker(s)", flush=True)
    server = Server(args, workers, workdir)
    try:
        server.start()
        token = server.sign_in()
        facilities = http("GET", f"{server.base}/v1/facilities?limit=1")
        if not facilities.get("items"):
            raise BenchError("GET /v1/facilities returned no facility: is the demo data loaded?")
        facility_id = facilities["items"][0]["id"]
        endpoints = [
            Endpoint("baseline", "GET /health/live", "/health/live"),
            Endpoint("facility", "GET /v1/facilities/{id}", f"/v1/facilities/{facility_id}"),
            Endpoint("me", "GET /v1/me", "/v1/me", {"Authorization": f"Bearer {token}"}),
        ]
        # Each endpoint must answer 200 before it is measured (wrk counts other statuses as errors).
        me = http("GET", f"{server.base}/v1/me", token=token)
        if me.get("personal_id") != DEMO_DOCTOR:
            raise BenchError(f"GET /v1/me returned an unexpected user: {me!r}")
        http("GET", f"{server.base}{endpoints[1].path}")
        # Rounds interleave the endpoints so that a slow spell of the machine hits all of them alike.
        rounds: dict[str, list[Result]] = {e.key: [] for e in endpoints}
        for number in range(1, args.repeat + 1):
            for endpoint in endpoints:
                print(
                    f"  round {number}/{args.repeat}: {endpoint.label} for {args.duration:g}s ...",
                    end="",
                    flush=True,
                )
                result = measure(args, server, endpoint, workdir)
                print(f" {result.rps:.0f} req/s, p99 {result.p99_ms:.1f} ms", flush=True)
                rounds[endpoint.key].append(result)
        results = [combine(rounds[e.key]) for e in endpoints]
        baseline = results[0].rps
        for result in results:
            result.ratio = result.rps / baseline if baseline else 0.0
        all_rounds.extend(r for key in rounds for r in rounds[key])
        return results
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


# --------------------------------------------------------------------------- report


def print_table(results: list[Result]) -> None:
    header = (
        f"{'workers':>7}  {'endpoint':<24} {'req/s':>7} {'(min-max)':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs base':>8} {'errors':>7}   {'CPU cores: server (busiest) / pg / wrk / other'}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.workers:>7}  {r.label:<24} {r.rps:>7.0f} {f'({r.rps_min:.0f}-{r.rps_max:.0f})':>13} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.ratio:>7.0%} {r.errors:>8}   {r.cpu_server:.2f} ({r.cpu_server_busiest:.2f}) / "
            f"{r.cpu_postgres:.2f} / {r.cpu_wrk:.2f} / {r.cpu_other:.2f}"
        )


def check_targets(results: list[Result]) -> bool:
    print("\nTargets")
    ok = True
    for r in results:
        if r.endpoint == "baseline":
            continue
        checks = [
            (
                f"{r.label} throughput >= {MIN_RATIO[r.endpoint]:.0%} of baseline",
                f"{r.ratio:.0%}",
                r.ratio >= MIN_RATIO[r.endpoint],
            ),
            (f"{r.label} p99 < {MAX_P99_MS:.0f} ms", f"{r.p99_ms:.2f} ms", r.p99_ms < MAX_P99_MS),
        ]
        if r.errors:
            checks.append((f"{r.label} without errors", f"{r.errors} errors", False))
        for name, value, passed in checks:
            ok &= passed
            print(f"  workers={r.workers}  {name:<52} {value:>10}  {'PASS' if passed else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per endpoint (10)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds per endpoint, interleaved; medians are reported (3)"
    )
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds before each run (2)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections (64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts (1 2)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1: the machine has 2 cores)")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432",
        help="local PostgreSQL server; a fresh database is created on it per worker count",
    )
    parser.add_argument(
        "--embedded", action="store_true", help="use the embedded PostgreSQL under DATA_DIR instead"
    )
    parser.add_argument("--start-timeout", type=float, default=None, help="seconds to wait for /health/ready")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="path of the wrk binary")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep server and wrk logs (printed path)")
    args = parser.parse_args(argv)
    if args.start_timeout is None:
        args.start_timeout = 180.0 if args.embedded else 60.0
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be >= 1 and --warmup >= 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if 3 * args.repeat * (args.duration + args.warmup) + 60 > ACCESS_TOKEN_TTL:
        parser.error(
            f"one sign-in per server and the access token lives {ACCESS_TOKEN_TTL}s: "
            "keep 3 x repeat x (duration + warmup) under 840s"
        )
    if not 1 <= args.connections <= 10_000 or args.threads < 1 or args.threads > args.connections:
        parser.error("--connections must be 1..10000 and --threads 1..connections")
    if any(not 1 <= w <= 64 for w in args.workers):
        parser.error("--workers must be 1..64")
    if urlsplit(args.pg_url).hostname not in LOOPBACK:
        parser.error("--pg-url must point at a loopback address")
    if not shutil.which(args.wrk):
        parser.error("wrk not found: install it (Debian: apt-get install wrk) or pass --wrk PATH")
    if not TELEHEALTH.exists():
        parser.error(f"{TELEHEALTH} not found: create the venv and `pip install -e .` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    workdir = Path(tempfile.mkdtemp(prefix="telehealth-bench-"))
    cpus = os.cpu_count()
    print(
        f"bench: {args.connections} connections, wrk -t{args.threads}, {args.duration:g}s per endpoint "
        f"(+{args.warmup:g}s warm-up), workers {args.workers}, {cpus} CPUs, "
        f"{'embedded PostgreSQL' if args.embedded else args.pg_url}"
    )
    busy = machine_busy()
    if busy > 0.2:
        print(f"warning: {busy:.2f} cores already busy before the benchmark; the figures will be low")
    results: list[Result] = []
    all_rounds: list[Result] = []
    status = 0
    try:
        for workers in args.workers:
            results += bench_workers(args, workers, workdir, all_rounds)
    except KeyboardInterrupt:
        print("\ninterrupted: server stopped, database dropped", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        status = 2
    if results:
        print_table(results)
        print(
            f"\nMedians over {args.repeat} interleaved round(s) per endpoint; (min-max) is the spread of req/s."
            "\nCPU cores: average cores busy during each measured run: the server's processes (the "
            "busiest one), all PostgreSQL processes, wrk, and the rest of the machine "
            f"({cpus} available). 'other' well above 0.1 means the figures are disturbed by other work."
        )
        if not check_targets(results) and status == 0:
            status = 1
        if status in (0, 1):
            print(f"\n{'ALL TARGETS PASS' if status == 0 else 'SOME TARGETS FAIL'}")
        if args.json:
            report = {
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "results": [asdict(r) for r in results],
                "rounds": [asdict(r) for r in all_rounds],
            }
            args.json.write_text(json.dumps(report, indent=2))
    if args.keep_logs or status == 2:
        print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
