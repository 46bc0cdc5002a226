"""Forward-only SQL migrations: `migrations/NNNN_name.sql`, applied in order.

Each file runs in its own transaction under a session advisory lock, so any number of
processes may call `migrate` at once and each file is applied exactly once. Applied files
are recorded with a SHA-256 checksum; a file edited after it was applied stops start-up.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import asyncpg
import msgspec

log = logging.getLogger("telehealth.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_LOCK_KEY = 0x7E1E_4EA1  # any constant shared by every process of this app
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    pass


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    # Any case of `.sql`: a `0002_x.SQL` must be refused by name, not silently skipped.
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() == ".sql"):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    return found


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    migrations = discover(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY,
               name text NOT NULL,
               checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    applied = {
        r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    }
    for migration in migrations:
        row = applied.get(migration.version)
        if row is not None and row["checksum"] != migration.checksum:
            raise MigrationError(
                f"{migration.name} was changed after it was applied (recorded checksum {row['checksum'][:12]}…, "
                f"file now {migration.checksum[:12]}…). Applied migrations are never edited: add a new file."
            )
    known = {m.version for m in migrations}
    for version, row in applied.items():
        if version not in known:
            raise MigrationError(
                f"{row['name']} is applied in the database but missing from {MIGRATIONS_DIR.name}/"
            )
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        except asyncpg.PostgresError as exc:
            # Name the file: the driver's error alone does not say which migration failed.
            raise MigrationError(f"{migration.name} failed and was rolled back: {exc}") from exc
        log.info("migration applied", extra={"migration": migration.name})
        done.append(migration.name)
    return done
