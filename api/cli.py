"""The `telehealth` command: serve, worker, migrate, seed, openapi, dev-token, staff."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

import click

from api.settings import Settings, SettingsError, load_settings

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(f"invalid setting {exc}") from None


def _database_url(settings: Settings) -> str:
    from api.server import prepare_database

    return prepare_database(settings)


@click.group()
def main() -> None:
    """Telehealth backend for the Điện Biên health system."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
def serve(host: str, port: int, workers: int) -> None:
    """Start the API server (embedded PostgreSQL when DATABASE_URL is unset)."""
    from api.server import serve as run

    run(_settings(), host=host, port=port, workers=workers)


@main.command()
def worker() -> None:
    """Send notifications through FCM and expire booking holds; run one or more beside the API in production."""
    from notifications.runner import run_standalone

    settings = _settings()
    if not settings.database_url:
        raise click.ClickException(
            "DATABASE_URL: not set (in dev, `telehealth serve` runs the worker in its own process)"
        )
    try:
        import uvloop  # installed with uvicorn[standard]: the same loop the API server runs on
    except ImportError:  # pragma: no cover (Windows)
        asyncio.run(run_standalone(settings))
    else:
        uvloop.run(run_standalone(settings))


@main.command()
def migrate() -> None:
    """Apply pending database migrations."""
    from api.migrate import MigrationError
    from api.migrate import migrate as apply

    settings = _settings()
    if not settings.database_url:
        _database_url(settings)  # the embedded database is migrated as it starts
        return
    try:
        applied = asyncio.run(apply(settings.database_url))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {name}" for name in applied))


@main.command()
def seed() -> None:
    """Load the Điện Biên demo data (idempotent)."""
    from api.demo.seed import seed as load

    url = _database_url(_settings())
    counts = asyncio.run(load(url))
    click.echo("demo data: " + ", ".join(f"{n} {what}" for what, n in counts.items()))


@main.command()
@click.option("--output", type=click.Path(path_type=Path), default=OPENAPI_PATH, show_default=True)
def openapi(output: Path) -> None:
    """Write the OpenAPI document generated from the app."""
    from api.openapi_doc import openapi_json

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(openapi_json(), encoding="utf-8")
    click.echo(f"wrote {output}")


@main.command("dev-token")
@click.argument("personal_id")
@click.option("--name", default="Nguyễn Văn An", show_default=True)
@click.option("--birthdate", default=None, help="YYYY-MM-DD; defaults to 1 January of the ID's birth year.")
@click.option("--gender", type=click.Choice(["male", "female"]), default=None, help="Defaults to the ID's.")
@click.option("--phone", default=None)
@click.option(
    "--dependent",
    "dependents",
    multiple=True,
    metavar="PERSONAL_ID:NAME:YYYY-MM-DD",
    help="A child VNeID lists for this guardian; repeat for several.",
)
def dev_token(
    personal_id: str,
    name: str,
    birthdate: str | None,
    gender: str | None,
    phone: str | None,
    dependents: tuple[str, ...],
) -> None:
    """Print a VNeID-shaped ID token signed by the dev issuer (dev mode only)."""
    from api.identity.dev_issuer import mint_id_token
    from api.identity.personal_id import birth_year, is_valid_personal_id
    from api.identity.vneid import Dependent

    settings = _settings()
    if not settings.dev_issuer_enabled:
        raise click.ClickException("the dev issuer is off (TELEHEALTH_ENV=prod or DEV_ISSUER=false)")
    if not is_valid_personal_id(personal_id):
        raise click.ClickException(f"{personal_id} is not a valid personal ID")
    born = dt.date.fromisoformat(birthdate) if birthdate else dt.date(birth_year(personal_id), 1, 1)
    parsed = []
    for item in dependents:
        try:
            dep_id, dep_name, dep_born = item.split(":")
            parsed.append(
                Dependent(personal_id=dep_id, name=dep_name, birthdate=dt.date.fromisoformat(dep_born))
            )
        except ValueError:
            raise click.ClickException(
                f"--dependent {item!r}: expected PERSONAL_ID:NAME:YYYY-MM-DD"
            ) from None
    token = mint_id_token(
        settings,
        personal_id=personal_id,
        name=name,
        birthdate=born,
        gender=gender or ("male" if int(personal_id[3]) % 2 == 0 else "female"),
        phone_number=phone,
        dependents=parsed,
    )
    click.echo(token)


async def _grant_role(url: str, personal_id: str, facility: str, role: str) -> object:
    import asyncpg

    from api.directory import queries

    conn = await asyncpg.connect(url)
    try:
        facility_id = await queries.find_facility_id(conn, facility)
        if facility_id is not None:
            await queries.add_staff(conn, facility_id, personal_id, role)
        return facility_id
    finally:
        await conn.close()


@main.group()
def staff() -> None:
    """Manage staff roles (bootstrap the first administrator of a facility)."""


@staff.command("add")
@click.argument("personal_id")
@click.option("--facility", required=True, help="Facility id or code.")
@click.option("--role", type=click.Choice(["doctor", "facility_staff", "admin"]), required=True)
def staff_add(personal_id: str, facility: str, role: str) -> None:
    """Grant PERSONAL_ID a staff role at a facility."""
    from api.identity.personal_id import is_valid_personal_id

    if not is_valid_personal_id(personal_id):
        raise click.ClickException(f"{personal_id} is not a valid personal ID")
    url = _database_url(_settings())
    facility_id = asyncio.run(_grant_role(url, personal_id, facility, role))
    if facility_id is None:
        raise click.ClickException(f"no facility with id or code {facility!r}")
    click.echo(json.dumps({"facility_id": str(facility_id), "role": role}))


if __name__ == "__main__":
    sys.exit(main())
