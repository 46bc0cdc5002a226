"""Running the service: the database it needs, then uvicorn with N workers.

Without `DATABASE_URL` an embedded PostgreSQL is started under `<DATA_DIR>/postgres`, migrated
and loaded with the Điện Biên demo data; this process owns it and stops it on exit. With
`DATABASE_URL`, pending migrations are applied (safe from several instances at once: they
take an advisory lock) and no demo data is loaded unless `telehealth seed` is run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import tempfile
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar
from uvicorn.supervisors import Multiprocess

from api.app import create_app
from api.db import ensure_database, start_embedded_postgres
from api.demo.seed import seed
from api.identity.dev_issuer import load_or_create_key
from api.migrate import migrate
from api.settings import Settings

log = logging.getLogger("telehealth.server")
EMBEDDED_DATABASE = "telehealth"


def prepare_database(settings: Settings) -> str:
    """Return the database URL to use, starting, migrating and seeding the embedded one if needed."""
    if settings.database_url:
        asyncio.run(migrate(settings.database_url))
        return settings.database_url
    server_url = start_embedded_postgres(settings.data_path)
    url = asyncio.run(ensure_database(server_url, EMBEDDED_DATABASE))
    asyncio.run(migrate(url))
    asyncio.run(seed(url))
    return url


def _freeze_startup_heap() -> None:
    # The tens of thousands of objects made at start-up (routes, models, the OpenAPI schema) live
    # as long as the process. Left in the collector's oldest generation, each full collection
    # walks them all: a 40 ms pause about once a second under load, which set the p99.
    gc.collect()
    gc.freeze()


def served_app() -> Litestar:
    """The app as each uvicorn worker runs it."""
    app = create_app()
    app.on_startup.append(_freeze_startup_heap)
    return app


def listen_reuse_port(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket of its own for one worker, in the port's SO_REUSEPORT group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class ReusePortListener:
    """Stands in for uvicorn's shared socket: each worker that unpickles it listens on its own.

    With one socket shared by all workers, whichever worker wakes first accepts a whole burst of
    connections, and keep-alive clients stay where they landed: at 2 workers one served three
    times as many requests as the other (bench/README.md). With a socket per worker the kernel
    spreads new connections evenly over them. uvicorn's supervisor still starts, watches and
    restarts the workers; a restarted worker joins the group with a new socket.
    """

    def __init__(self, host: str, port: int, backlog: int) -> None:
        self.address = (host, port, backlog)
        # Fail here, once, if the port is taken, rather than in every worker.
        listen_reuse_port(host, port, backlog).close()

    def __reduce__(self) -> tuple[Any, tuple[str, int, int]]:
        return listen_reuse_port, self.address


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default
    # handler that killed the process before `finally` and atexit ran, leaving the embedded
    # PostgreSQL running. Turn SIGTERM into a normal exit so both run.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    url = prepare_database(settings)
    print(f"telehealth: database {url}", flush=True)
    if settings.dev_issuer_enabled:
        load_or_create_key(settings)  # created once here, not raced by the workers
    os.environ["DATABASE_URL"] = url
    if not os.environ.get("PUBLIC_BASE_URL"):
        os.environ["PUBLIC_BASE_URL"] = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    # Metrics from every worker are merged from files in this directory (prometheus_client multiprocess mode).
    metrics_dir = tempfile.mkdtemp(prefix="telehealth-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = uvicorn.Config(
        "api.server:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,  # our middleware logs one line per request, without query strings
        proxy_headers=False,
        timeout_graceful_shutdown=20,
        log_config=None,
    )
    try:
        if workers > 1:
            Multiprocess(config, sockets=[ReusePortListener(host, port, config.backlog)]).run()  # type: ignore[list-item]
        else:
            server = uvicorn.Server(config)
            server.run()
            if not server.started:
                raise SystemExit(3)  # uvicorn's start-up failure status
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
