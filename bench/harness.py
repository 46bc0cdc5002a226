"""What the booking and payments benchmarks share: percentiles, which database a PostgreSQL
process serves, py-spy on the server, the code measured, and waiting for another benchmark.

(bench/run.py holds the server, wrk and CPU accounting, which every benchmark uses.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from run import BenchError

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
# Another benchmark on the same 2 cores would halve both results (and another run of the same one).
BENCHMARKS = r"bench/(booking|notifications|run|payments)\.py"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def postgres_database(pid: int) -> str | None:
    """The database of a PostgreSQL backend from its title (`postgres: 15/main: user db host state`);
    None for the server's own processes (checkpointer, WAL writer, ...)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    words = title.split(":", 2)[-1].split()
    if len(words) >= 3 and ("(" in words[2] or words[2] == "[local]"):
        return words[1]  # user, database, client address, state
    return None


class Profiler:
    """py-spy on one process while the block runs (`--profile`), its raw output written to `path`."""

    def __init__(self, enabled: bool, pid: int, path: Path) -> None:
        self.enabled, self.pid, self.path = enabled, pid, path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        if self.enabled:
            command = [
                str(PY_SPY),
                "record",
                "-p",
                str(self.pid),
                "-d",
                "600",
                "-f",
                "raw",
                "-o",
                str(self.path),
            ]
            self.log = self.path.with_suffix(".log").open("wb")
            self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
            time.sleep(1.0)  # attached
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def profile_summary(path: Path, top: int) -> dict[str, Any]:
    """The server's busiest frames: own time (leaf) and time including callees, share of samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [short_frame(re.sub(r":\d+\)$", ")", f.strip())) for f in stack.split(";") if "(" in f]
            if not frames:
                continue
            samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    skip = ("asyncio/", "uvicorn/", "uvloop/", "<module>", "run (", "main (", "serve (", "_run (")
    inclusive = [(f, c) for f, c in total.most_common() if not any(s in f for s in skip)]
    return {
        "path": str(path),
        "samples": samples,
        "own": [(f, c / samples) for f, c in own.most_common(top)] if samples else [],
        "inclusive": [(f, c / samples) for f, c in inclusive[: top + 10]] if samples else [],
    }


def short_frame(frame: str) -> str:
    """A py-spy frame without the long path prefixes."""
    return re.sub(r"\(\S*?(site-packages/|/work/main/|python3\.\d+/)", "(", frame)


def code_version() -> str:
    """The application code measured: the commit, and a digest of uncommitted changes to it."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    paths = ("api", "notifications", "migrations")
    changes = git("diff", "HEAD", "--", *paths)
    for name in git("ls-files", "--others", "--exclude-standard", "--", *paths).split():
        with contextlib.suppress(OSError):
            changes += name + (ROOT / name).read_text(errors="replace")
    if not changes:
        return head
    return f"{head} + uncommitted changes (digest {hashlib.sha256(changes.encode()).hexdigest()[:10]})"


def wait_for_other_benchmarks(max_wait: float) -> None:
    """Wait until no other benchmark runs on this machine (at most `max_wait` seconds)."""
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        found = subprocess.run(["pgrep", "-f", BENCHMARKS], capture_output=True, text=True)
        pids = [p for p in found.stdout.split() if int(p) not in (os.getpid(), os.getppid())]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"other benchmarks still running after {max_wait:.0f}s: pid {', '.join(pids)}")
        if not told:
            print(f"waiting for other benchmarks to finish (pid {', '.join(pids)}) ...", flush=True)
            told = True
        time.sleep(5)


def run_benchmark(
    args: argparse.Namespace,
    name: str,
    headline: str,
    bench: Callable[[argparse.Namespace, Path, dict[str, Any]], bool],
) -> int:
    """Run `bench` (True: every target passes) as a command: Ctrl-C and SIGTERM stop it cleanly,
    the report goes to `--json`, logs are kept when asked or when it failed. Exit status 0 all
    targets pass, 1 some fail, 2 the benchmark failed, 130 interrupted."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    workdir = Path(tempfile.mkdtemp(prefix=f"telehealth-bench-{name}-"))
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    status = 0
    try:
        if not args.no_wait:
            wait_for_other_benchmarks(max_wait=3600)
        print(f"bench {name}: {headline}; {os.cpu_count()} CPUs; {args.pg_url}", flush=True)
        report["code"] = code_version()
        print(f"code: {report['code']}", flush=True)
        status = 0 if bench(args, workdir, report) else 1
    except KeyboardInterrupt:
        print("\ninterrupted: server stopped, databases dropped", file=sys.stderr)
        status = 130
    except (BenchError, OSError, asyncpg.PostgresError, subprocess.SubprocessError) as exc:
        print(f"\nbench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 2
    if status in (0, 1):
        print(f"\n{'ALL TARGETS PASS' if status == 0 else 'SOME TARGETS FAIL'}")
    if args.json:
        report["status"] = status
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.keep_logs or args.profile or status == 2:
        print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status
