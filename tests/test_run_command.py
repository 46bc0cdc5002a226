"""The README's run command, as an operator runs it: real processes, real ports, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.settings import Settings
from tests.conftest import drop_database, fresh_database

ROOT = Path(__file__).resolve().parent.parent
TELEHEALTH = ROOT / ".venv" / "bin" / "telehealth"
DEMO_DOCTOR = "011080000101"
# Every variable the settings read: the commands under test see only what each test gives them.
SETTING_VARIABLES = {"TELEHEALTH_ENV"} | {
    f.name.upper() for f in msgspec.structs.fields(Settings) if f.name != "env"
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


class Server:
    """A server command in its own process group, its output in files (a pipe could fill and block it)."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, logs: Path) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.stdout_path = logs / "stdout.txt"
        self.stderr_path = logs / "stderr.txt"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"server exited with {self.process.returncode}:\n{self.stdout}\n{self.stderr[-3000:]}"
                )
            try:
                response = httpx.get(f"{self.base}/health/ready", timeout=2)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"/health/ready not 200 within {timeout}s:\n{self.stdout}\n{self.stderr[-3000:]}")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM to the whole group, as a supervisor would; returns the exit code and the time it took."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return None
    first = pid_file.read_text().splitlines()[:1]
    return int(first[0]) if first and first[0].strip().isdigit() else None


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after `timeout` (zombies count as gone: they hold nothing)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under /tmp, as stack-notes advise: the embedded server opens up its parents' permissions.
    path = Path(tempfile.mkdtemp(prefix="telehealth-run-"))
    yield path
    pid = postmaster_pid(path / "postgres")
    if pid is not None and psutil.pid_exists(pid):  # never leave a database server behind
        psutil.Process(pid).kill()
    shutil.rmtree(path, ignore_errors=True)


def test_readme_command_serves_from_an_empty_data_dir(data_dir, tmp_path):
    assert not any(data_dir.iterdir())
    port = free_port()
    server = Server(["./dev", "serve", "--port", str(port)], base_env(DATA_DIR=str(data_dir)), port, tmp_path)
    try:
        ready = server.wait_ready(timeout=90)
        assert ready.json() == {"status": "ok", "database": "ok", "redis": "not_configured"}

        # It says which database it is using: the embedded one, under DATA_DIR.
        urls = re.findall(r"^telehealth: database (\S+)$", server.stdout, re.MULTILINE)
        assert len(urls) == 1, server.stdout
        assert urls[0].startswith("postgresql://")
        assert str(data_dir.resolve() / "postgres") in urls[0]
        pgdata = data_dir / "postgres"
        pid = postmaster_pid(pgdata)
        assert pid is not None and psutil.pid_exists(pid)
        postmaster = psutil.Process(pid)

        # The Điện Biên demo data is loaded and marked as such.
        facilities = httpx.get(f"{server.base}/v1/facilities", params={"limit": 50}, timeout=10)
        assert facilities.status_code == 200
        items = facilities.json()["items"]
        assert len(items) >= 3
        assert all(item["is_demo"] is True for item in items)
        assert any("Điện Biên" in item["name"] for item in items)

        # A real sign-in through the dev issuer, with the token the README tells people to mint.
        minted = subprocess.run(
            [str(TELEHEALTH), "dev-token", DEMO_DOCTOR],
            cwd=ROOT,
            env=base_env(DATA_DIR=str(data_dir), PUBLIC_BASE_URL=server.base),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert minted.returncode == 0, minted.stderr
        id_token = minted.stdout.strip()
        assert id_token.count(".") == 2
        signed_in = httpx.post(f"{server.base}/v1/auth/vneid", json={"id_token": id_token}, timeout=10)
        assert signed_in.status_code == 200, signed_in.text
        body = signed_in.json()
        assert body["user"]["personal_id"] == DEMO_DOCTOR
        assert "doctor" in body["user"]["roles"]
        me = httpx.get(
            f"{server.base}/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=10
        )
        assert me.status_code == 200
        assert "doctor" in me.json()["roles"]

        # The server's own log lines are JSON and carry no token.
        for line in server.stderr.splitlines():
            if line.startswith("{"):
                json.loads(line)
        assert id_token not in server.stderr
        assert body["access_token"] not in server.stderr

        # Graceful stop: SIGTERM ends it promptly, and the embedded PostgreSQL goes with it.
        code, took = server.terminate(timeout=30)
        assert code == 0, server.stderr[-3000:]
        assert took < 30
        assert wait_gone([postmaster], timeout=5) == []
        assert postmaster_pid(pgdata) is None
        assert "Traceback" not in server.stderr
    finally:
        server.kill()


@pytest.fixture
async def migrated_db(server_url: str) -> AsyncIterator[str]:
    url = await fresh_database(server_url, seeded=False)
    yield url
    await drop_database(server_url, url)


def counter_for(metrics_text: str, path: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "telehealth_requests_total" and sample.labels.get("path") == path:
                total += sample.value
    return total


def _connections_per_worker(workers: list[psutil.Process], port: int, n: int) -> list[int]:
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        for client in clients:
            client.sendall(request)
        for client in clients:
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
        return [
            sum(
                1
                for c in w.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED"
            )
            for w in workers
        ]
    finally:
        for client in clients:
            client.close()


def test_workers_share_metrics_and_redis(migrated_db, redis_url, tmp_path):
    port = free_port()
    env = base_env(DATABASE_URL=migrated_db, REDIS_URL=redis_url, DATA_DIR=str(tmp_path / "data"))
    server = Server([str(TELEHEALTH), "serve", "--workers", "2", "--port", str(port)], env, port, tmp_path)
    try:
        ready = server.wait_ready(timeout=60)
        assert ready.json() == {"status": "ok", "database": "ok", "redis": "ok"}

        workers = [p for p in psutil.Process(server.process.pid).children() if p.is_running()]
        metrics_dirs = {w.environ().get("PROMETHEUS_MULTIPROC_DIR") for w in workers} - {None}
        assert len(metrics_dirs) == 1
        metrics_dir = Path(metrics_dirs.pop())
        assert metrics_dir.is_dir()

        n = 60
        # A fresh connection for each request, so the kernel spreads them over both workers.
        with httpx.Client(base_url=server.base, headers={"Connection": "close"}, timeout=10) as client:
            for _ in range(n):
                assert client.get("/health/live").status_code == 200
            # Whichever worker answers /metrics reports every worker's requests.
            for _ in range(6):
                scraped = client.get("/metrics")
                assert scraped.status_code == 200
                assert counter_for(scraped.text, "/health/live") == n

        started = set(re.findall(r"Started server process \[(\d+)\]", server.stderr))
        assert len(started) == 2, server.stderr[-3000:]

        # 64 keep-alive connections opened at once, as a load balancer or the benchmark opens
        # them, land on both workers (each listens on its own SO_REUSEPORT socket).
        busiest, second = sorted(_connections_per_worker(workers, port, 64), reverse=True)[:2]
        assert second >= 16, f"one worker took {busiest} of the 64 connections, the other {second}"

        code, took = server.terminate(timeout=30)
        assert code == 0, server.stderr[-3000:]
        assert took < 30
        assert not metrics_dir.exists()  # the per-run metrics files are cleaned up
        # Nothing is left behind (helpers such as multiprocessing's tracker exit just after the parent).
        assert wait_gone(workers, timeout=10) == []
    finally:
        server.kill()
