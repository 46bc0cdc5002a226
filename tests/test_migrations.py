"""Forward-only migrations: each file once, even from several processes; edits and gaps stop start-up."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from api.db import ensure_database
from api.migrate import _LOCK_KEY, MIGRATIONS_DIR, MigrationError, discover, migrate
from tests.conftest import drop_database

ROOT = Path(__file__).resolve().parent.parent
TELEHEALTH = ROOT / ".venv" / "bin" / "telehealth"
FILES = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))


@pytest.fixture
async def empty_db(server_url: str) -> AsyncIterator[str]:
    url = await ensure_database(server_url, f"telehealth_mig_{uuid.uuid4().hex[:12]}")
    yield url
    await drop_database(server_url, url)


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


async def recorded(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        )
    finally:
        await conn.close()


async def table_exists(url: str, name: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{name}"))
    finally:
        await conn.close()


async def run_cli(url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("TELEHEALTH_ENV", None)
    process = await asyncio.create_subprocess_exec(
        str(TELEHEALTH),
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()


async def test_three_processes_migrate_at_once(empty_db):
    assert FILES, "the project has migrations"
    results = await asyncio.gather(*(run_cli(empty_db, "migrate") for _ in range(3)))
    for code, _stdout, stderr in results:
        assert code == 0, stderr
        assert "Traceback" not in stderr
    # Exactly one process applied each file; the others found nothing to do.
    for name in FILES:
        assert sum(name in stdout for _, stdout, _ in results) == 1, [r[1] for r in results]
    assert sorted(stdout.splitlines()[0] for _, stdout, _ in results) == sorted(
        [f"applied {len(FILES)} migration(s)", "applied 0 migration(s)", "applied 0 migration(s)"]
    )
    rows = await recorded(empty_db)
    assert [r["name"] for r in rows] == FILES
    for row in rows:
        assert row["checksum"] == sha256(MIGRATIONS_DIR / row["name"])
        assert row["version"] == int(row["name"][:4])
    assert await table_exists(empty_db, "users")
    assert await table_exists(empty_db, "facilities")


async def test_running_again_applies_nothing(empty_db):
    assert await migrate(empty_db) == FILES
    before = await recorded(empty_db)
    assert await migrate(empty_db) == []
    code, stdout, stderr = await run_cli(empty_db, "migrate")
    assert code == 0, stderr
    assert stdout.strip() == "applied 0 migration(s)"
    assert await recorded(empty_db) == before  # same rows, same applied_at


async def test_an_edited_applied_migration_is_refused(empty_db, migrations_copy):
    assert await migrate(empty_db, directory=migrations_copy) == FILES
    edited = migrations_copy / FILES[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "\n-- a harmless-looking edit\n", encoding="utf-8")
    with pytest.raises(MigrationError) as caught:
        await migrate(empty_db, directory=migrations_copy)
    assert FILES[0] in str(caught.value)
    assert "changed" in str(caught.value)
    rows = await recorded(empty_db)
    assert rows[0]["checksum"] == sha256(MIGRATIONS_DIR / FILES[0])  # the record is untouched


async def test_an_edit_stops_pending_migrations_too(empty_db, migrations_copy):
    """With an edited file nothing else is applied, so the schema never drifts further."""
    await migrate(empty_db, directory=migrations_copy)
    (migrations_copy / FILES[0]).write_text("-- rewritten\n", encoding="utf-8")
    (migrations_copy / "9001_next.sql").write_text("CREATE TABLE next_step (id int);", encoding="utf-8")
    with pytest.raises(MigrationError, match=FILES[0]):
        await migrate(empty_db, directory=migrations_copy)
    assert not await table_exists(empty_db, "next_step")


async def test_an_applied_migration_missing_from_the_directory_is_refused(empty_db, migrations_copy):
    extra = migrations_copy / "9002_extra_table.sql"
    extra.write_text("CREATE TABLE extra_table (id int PRIMARY KEY);", encoding="utf-8")
    assert await migrate(empty_db, directory=migrations_copy) == [*FILES, extra.name]
    extra.unlink()
    with pytest.raises(MigrationError) as caught:
        await migrate(empty_db, directory=migrations_copy)
    assert extra.name in str(caught.value)
    assert "missing" in str(caught.value)


async def test_a_failing_migration_leaves_no_partial_change(empty_db, migrations_copy):
    await migrate(empty_db, directory=migrations_copy)
    failing = migrations_copy / "9003_half_done.sql"
    failing.write_text(
        "CREATE TABLE half_done (id int PRIMARY KEY);\n"
        "INSERT INTO half_done VALUES (1);\n"
        "ALTER TABLE users ADD COLUMN half_done_flag boolean;\n"
        "SELECT * FROM no_such_table;\n",
        encoding="utf-8",
    )
    later = migrations_copy / "9004_after.sql"
    later.write_text("CREATE TABLE after_failure (id int);", encoding="utf-8")
    with pytest.raises(MigrationError) as caught:
        await migrate(empty_db, directory=migrations_copy)
    assert failing.name in str(caught.value)
    assert "no_such_table" in str(caught.value)

    assert not await table_exists(empty_db, "half_done")
    assert not await table_exists(empty_db, "after_failure")
    conn = await asyncpg.connect(empty_db)
    try:
        column = await conn.fetchval(
            "SELECT 1 FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'half_done_flag'"
        )
        lock_free = await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    assert column is None
    assert lock_free  # the failed run released its advisory lock
    assert [r["name"] for r in await recorded(empty_db)] == FILES

    # Fixed, the same file then applies, followed by the next one.
    failing.write_text("CREATE TABLE half_done (id int PRIMARY KEY);", encoding="utf-8")
    assert await migrate(empty_db, directory=migrations_copy) == [failing.name, later.name]
    assert await table_exists(empty_db, "half_done")


@pytest.mark.parametrize(
    "bad_name",
    [
        "1_init.sql",
        "0002-init.sql",
        "0002_Init.sql",
        "0002_init.SQL",
        "00002_init.sql",
        "0002_.sql",
        "init.sql",
    ],
)
async def test_bad_file_names_are_refused_before_anything_runs(empty_db, migrations_copy, bad_name):
    (migrations_copy / bad_name).write_text("CREATE TABLE should_not_exist (id int);", encoding="utf-8")
    with pytest.raises(MigrationError) as caught:
        await migrate(empty_db, directory=migrations_copy)
    assert bad_name in str(caught.value)
    assert not await table_exists(empty_db, "schema_migrations")
    assert not await table_exists(empty_db, "should_not_exist")


async def test_two_files_with_one_number_are_refused(empty_db, migrations_copy):
    (migrations_copy / "9005_one.sql").write_text("SELECT 1;", encoding="utf-8")
    (migrations_copy / "9005_other.sql").write_text("SELECT 2;", encoding="utf-8")
    with pytest.raises(MigrationError, match="share a number"):
        await migrate(empty_db, directory=migrations_copy)
    assert not await table_exists(empty_db, "schema_migrations")


def test_other_files_in_the_directory_are_ignored(migrations_copy):
    (migrations_copy / "README.md").write_text("notes", encoding="utf-8")
    (migrations_copy / "0002_draft.sql.bak").write_text("DROP TABLE users;", encoding="utf-8")
    assert [m.name for m in discover(migrations_copy)] == FILES


def test_the_project_migrations_are_well_formed():
    migrations = discover()
    assert [m.name for m in migrations] == FILES
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
