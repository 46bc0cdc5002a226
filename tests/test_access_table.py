"""The route × role table (api/access.py) against the application itself.

1. Every route the app serves has an entry, and every entry names a route that exists.
2. Every entry is checked with real tokens: anonymous callers get 401 on role routes, people
   without the role 403, holders of an allowed role neither; public routes never refuse;
   nothing answers 5xx.
3. A route missing from the table is refused to everyone (deny by default).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute, WebSocketRoute

from api import access
from api.access import PUBLIC, ROUTE_ROLES
from api.app import create_app
from tests.factories import Citizen, Session, child_of, grant_staff, personal_id, serve, sign_in

FACILITY = "TTYT-MUONGANG"  # the facility this file's staff work at (other files use other ones)
KNOWN_ROLES = {"citizen", "guardian", "doctor", "facility_staff", "admin"}
# Routes only some configurations mount, with the configuration that mounts them.
CONDITIONAL_ROUTES = {
    ("GET", "/dev/vneid/jwks.json"): "mounted only when the dev issuer is enabled (dev_issuer=True)",
}


def table_keys(app: Litestar) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, as api/access.py looks them up."""
    keys: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            keys |= {(m, route.path_format) for m in route.route_handler_map if m not in ("OPTIONS", "HEAD")}
        elif isinstance(route, WebSocketRoute):
            keys.add(("WEBSOCKET", route.path_format))
        else:  # a mounted ASGI app would bypass the per-method table
            raise AssertionError(f"route {route.path_format} is neither HTTP nor WebSocket: {type(route)}")
    return keys


def dev_app(settings) -> Litestar:
    return create_app(msgspec.structs.replace(settings, dev_issuer=True))


# --- 1. the table and the routes -------------------------------------------------------------


def test_every_route_is_in_the_table(app):
    missing = sorted(table_keys(app) - ROUTE_ROLES.keys())
    assert not missing, f"routes missing from api.access.ROUTE_ROLES (denied to everyone): {missing}"


def test_every_route_of_the_dev_configuration_is_in_the_table(settings):
    missing = sorted(table_keys(dev_app(settings)) - ROUTE_ROLES.keys())
    assert not missing, f"routes missing from api.access.ROUTE_ROLES: {missing}"


def test_no_stale_table_entries(app, settings):
    assert not app.state.settings.dev_issuer_enabled
    served = table_keys(app)
    stale = sorted(ROUTE_ROLES.keys() - served - CONDITIONAL_ROUTES.keys())
    assert not stale, f"ROUTE_ROLES entries that match no route: {stale}"
    # The conditional entries are served by the configuration that mounts them, and only by it.
    dev_served = table_keys(dev_app(settings))
    for key, reason in CONDITIONAL_ROUTES.items():
        assert key in ROUTE_ROLES, f"{key} is listed as conditional but is not in the table"
        assert key not in served, f"{key} is served by the test app although it is {reason}"
        assert key in dev_served, f"{key} is not served even by the dev configuration ({reason})"
    assert dev_served - served == CONDITIONAL_ROUTES.keys()


def test_every_rule_is_public_or_names_known_roles():
    for key, rule in ROUTE_ROLES.items():
        if rule == PUBLIC:
            continue
        assert isinstance(rule, frozenset) and rule, f"{key}: empty or malformed rule {rule!r}"
        assert rule <= KNOWN_ROLES, f"{key}: unknown roles {set(rule) - KNOWN_ROLES}"
        assert key[0] in {"GET", "POST", "PUT", "PATCH", "DELETE", "WEBSOCKET"}, key


def test_facility_administration_is_never_public():
    for (method, path), rule in ROUTE_ROLES.items():
        if path.startswith("/v1/admin/") or path.startswith("/v1/me") or path == "/v1/auth/logout":
            assert rule != PUBLIC, f"{method} {path} must not be public"
        front_desk = path.endswith("/guardianships") or "/notifications/" in path
        if path.startswith("/v1/admin/"):
            expected = access.FRONT_DESK if front_desk else access.ADMIN
            assert rule == expected, f"{method} {path} is for {sorted(expected)} only"


async def test_dev_issuer_keys_are_public_when_mounted(settings):
    async with serve(dev_app(settings)) as client:
        response = await client.get("/dev/vneid/jwks.json")
        assert response.status_code == 200
        assert response.json()["keys"][0]["kty"] == "RSA"
        assert "d" not in response.json()["keys"][0], "only the public key is published"


async def test_dev_issuer_keys_are_not_served_otherwise(client):
    assert (await client.get("/dev/vneid/jwks.json")).status_code == 404


# --- 2. every entry with real tokens ---------------------------------------------------------


@dataclass
class Caller:
    name: str
    citizen: Citizen | None = None
    session: Session | None = None
    roles: frozenset[str] = frozenset()
    sessions: list[Session] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return self.session.headers if self.session else {}


@dataclass
class World:
    """Real ids to put in URLs and plausible bodies, all at one facility where the staff callers work."""

    client: Any
    db: Any
    issuer: Any
    facility_id: uuid.UUID
    service_id: uuid.UUID
    doctor_id: uuid.UUID
    guardian_pid: str

    async def fresh_staff_id(self) -> uuid.UUID:
        return await self.db.fetchval(
            "INSERT INTO staff (personal_id, facility_id, role) VALUES ($1, $2, 'facility_staff') RETURNING id",
            personal_id(),
            self.facility_id,
        )


def _code() -> str:
    return f"ACL-{uuid.uuid4().hex[:8].upper()}"


# Plausible bodies: a holder of the role should get past validation to the real work.
BODIES: dict[tuple[str, str], Callable[[World, Caller], Any]] = {
    ("POST", "/v1/auth/vneid"): lambda w, c: {"id_token": w.issuer.id_token(c.citizen or Citizen())},
    ("PATCH", "/v1/me"): lambda w, c: {"locale": "vi"},
    ("POST", "/v1/auth/logout"): lambda w, c: {},
    ("POST", "/v1/admin/facilities/{facility_id}/services"): lambda w, c: {
        "code": _code(),
        "name": "Khám kiểm tra quyền",
        "duration_minutes": 15,
        "price_vnd": 30_000,
    },
    ("PATCH", "/v1/admin/facilities/{facility_id}/services/{service_id}"): lambda w, c: {"price_vnd": 31_000},
    ("POST", "/v1/admin/facilities/{facility_id}/doctors"): lambda w, c: {
        "code": _code(),
        "name": "Bác sĩ Kiểm Quyền",
    },
    ("PATCH", "/v1/admin/facilities/{facility_id}/doctors/{doctor_id}"): lambda w, c: {"title": "BS"},
    ("POST", "/v1/admin/facilities/{facility_id}/staff"): lambda w, c: {
        "personal_id": personal_id(),
        "role": "facility_staff",
    },
    ("POST", "/v1/admin/facilities/{facility_id}/guardianships"): lambda w, c: {
        "guardian_personal_id": w.guardian_pid,
        "dependent_personal_id": personal_id(born=2020, sex="male"),
        "dependent_name": "Lò Văn Bé",
        "dependent_birthdate": "2020-02-02",
        "relationship": "child",
    },
}
SAMPLE_PATHS = {"/docs/{path}": {"path": "openapi.yaml"}}


async def refresh_body(world: World, caller: Caller) -> dict[str, Any]:
    session = await sign_in(world.client, world.issuer, caller.citizen or Citizen())
    return {"refresh_token": session.refresh_token}


async def concrete_request(world: World, caller: Caller, route: HTTPRoute, method: str) -> tuple[str, Any]:
    """A URL with real ids for the route's path parameters, and a body for the method."""
    path = route.path_format
    values: dict[str, str] = dict(SAMPLE_PATHS.get(path, {}))
    for name, parameter in route.path_parameters.items():
        if name in values:
            continue
        known = {
            "facility_id": world.facility_id,
            "service_id": world.service_id,
            "doctor_id": world.doctor_id,
        }
        if name == "staff_id":
            values[name] = str(await world.fresh_staff_id())
        elif name in known:
            values[name] = str(known[name])
        elif parameter.type is uuid.UUID:
            values[name] = str(
                uuid.uuid4()
            )  # an unknown object: 404 for those allowed, still 401/403 for others
        elif parameter.type is int:
            values[name] = "1"
        elif parameter.type is dt.date:
            values[name] = dt.date.today().isoformat()
        else:
            values[name] = "x"
    url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
    key = (method, path)
    if key == ("POST", "/v1/auth/refresh"):
        return url, await refresh_body(world, caller)
    if key in BODIES:
        return url, BODIES[key](world, caller)
    return url, ({} if method in ("POST", "PUT", "PATCH") else None)


async def make_caller(world: World, name: str, role: str | None = None, **citizen: Any) -> Caller:
    person = Citizen(name=f"Người thử {name}", **citizen)
    if role:
        await grant_staff(world.db, person, FACILITY, role)
    session = await sign_in(world.client, world.issuer, person)
    return Caller(name, person, session, frozenset(session.user["roles"]))


@pytest.fixture
async def world(client, db, issuer) -> World:
    facility_id = await db.fetchval("SELECT id FROM facilities WHERE code = $1", FACILITY)
    service_id = await db.fetchval(
        "SELECT id FROM services WHERE facility_id = $1 AND code = 'KHAM-BENH'", facility_id
    )
    doctor_id = await db.fetchval(
        "INSERT INTO doctors (facility_id, code, full_name) VALUES ($1, $2, 'Bác sĩ Bảng Quyền') RETURNING id",
        facility_id,
        _code(),
    )
    guardian = await sign_in(client, issuer, Citizen(name="Người giám hộ thử"))
    return World(client, db, issuer, facility_id, service_id, doctor_id, guardian.user["personal_id"])


async def callers(world: World) -> list[Caller]:
    result = [
        Caller("anonymous"),
        await make_caller(world, "citizen"),
        await make_caller(world, "guardian", dependents=[child_of()]),
        await make_caller(world, "doctor", "doctor"),
        await make_caller(world, "facility_staff", "facility_staff"),
        await make_caller(world, "admin", "admin"),
    ]
    # Each caller holds exactly the roles its name says (plus citizen), as the server sees them.
    assert result[1].roles == {"citizen"}
    assert result[2].roles == {"citizen", "guardian"}
    for caller in result[3:]:
        assert caller.roles == {"citizen", caller.name}, caller
        assert {"facility_id": str(world.facility_id), "role": caller.name} in caller.session.user["staff"]
    return result


async def headers_for(world: World, caller: Caller, method: str, path: str) -> dict[str, str]:
    if caller.session and (method, path) == ("POST", "/v1/auth/logout"):
        # Logging out ends the session: use a session of its own so the caller stays signed in.
        return (await sign_in(world.client, world.issuer, caller.citizen)).headers
    return caller.headers


async def test_every_entry_with_real_tokens(app, world):
    everyone = await callers(world)
    checked: list[tuple[str, str, str, int]] = []
    failures: list[str] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method in sorted(route.route_handler_map):
            if method in ("OPTIONS", "HEAD"):
                continue
            rule = ROUTE_ROLES.get((method, route.path_format))
            if rule is None:
                failures.append(f"no table entry for {method} {route.path_format}")
                continue
            for caller in everyone:
                url, body = await concrete_request(world, caller, route, method)
                headers = await headers_for(world, caller, method, route.path_format)
                response = await world.client.request(method, url, json=body, headers=headers)
                status = response.status_code
                checked.append((method, route.path_format, caller.name, status))
                where = f"{method} {url} as {caller.name} -> {status} {response.text[:200]}"
                if status >= 500:
                    failures.append(f"server error: {where}")
                elif rule == PUBLIC:
                    # A provider callback without a valid signature is refused as such, not for lack of a user.
                    signed = route.path_format.startswith("/v1/payments/callbacks/")
                    if status in (401, 403) and not (
                        signed and response.json().get("code") == "invalid_signature"
                    ):
                        failures.append(f"public route refused: {where}")
                elif caller.session is None:
                    if status != 401 or response.json().get("code") != "unauthorized":
                        failures.append(f"anonymous not 401 unauthorized: {where}")
                elif caller.roles & rule:
                    if status in (401, 403):
                        failures.append(f"role {sorted(caller.roles & rule)} refused: {where}")
                elif status != 403 or response.json().get("code") != "forbidden":
                    failures.append(f"caller without {sorted(rule)} not 403 forbidden: {where}")
    assert not failures, "\n".join(failures)
    # Every served entry was exercised by every caller.
    exercised = {(m, p) for m, p, _, _ in checked}
    assert exercised == table_keys(app)
    assert len(checked) == len(exercised) * len(everyone)


async def test_role_holders_actually_get_through(world, client, db):
    """Spot checks that 'neither 401 nor 403' above meant the work was done."""
    everyone = {c.name: c for c in await callers(world)}
    admin = everyone["admin"]
    base = f"/v1/admin/facilities/{world.facility_id}"
    response = await client.get(f"{base}/staff", headers=admin.headers)
    assert response.status_code == 200
    response = await client.post(
        f"{base}/services",
        json=BODIES[("POST", "/v1/admin/facilities/{facility_id}/services")](world, admin),
        headers=admin.headers,
    )
    assert response.status_code == 201
    response = await client.post(
        f"{base}/guardianships",
        json=BODIES[("POST", "/v1/admin/facilities/{facility_id}/guardianships")](
            world, everyone["facility_staff"]
        ),
        headers=everyone["facility_staff"].headers,
    )
    assert response.status_code == 201, response.text
    assert (await client.get("/v1/me/dependents", headers=everyone["guardian"].headers)).status_code == 200


# --- 3. deny by default ----------------------------------------------------------------------


async def test_a_route_missing_from_the_table_is_refused_even_to_an_admin(monkeypatch, world, client):
    admin = await make_caller(world, "admin", "admin")
    url = f"/v1/admin/facilities/{world.facility_id}/staff"
    assert (await client.get(url, headers=admin.headers)).status_code == 200

    monkeypatch.delitem(ROUTE_ROLES, ("GET", "/v1/admin/facilities/{facility_id}/staff"))
    response = await client.get(url, headers=admin.headers)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert (await client.get(url)).status_code == 403, "anonymous too: no entry means nobody"

    monkeypatch.undo()
    assert (await client.get(url, headers=admin.headers)).status_code == 200


async def test_a_public_route_missing_from_the_table_is_refused(monkeypatch, client):
    assert (await client.get("/v1/facilities")).status_code == 200
    monkeypatch.delitem(ROUTE_ROLES, ("GET", "/v1/facilities"))
    response = await client.get("/v1/facilities")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


async def test_a_write_is_refused_without_writing_when_its_entry_is_missing(monkeypatch, world, client, db):
    admin = await make_caller(world, "admin", "admin")
    monkeypatch.delitem(ROUTE_ROLES, ("POST", "/v1/admin/facilities/{facility_id}/services"))
    body = BODIES[("POST", "/v1/admin/facilities/{facility_id}/services")](world, admin)
    response = await client.post(
        f"/v1/admin/facilities/{world.facility_id}/services", json=body, headers=admin.headers
    )
    assert response.status_code == 403
    assert not await db.fetchval("SELECT count(*) FROM services WHERE code = $1", body["code"])


async def test_head_follows_the_get_rule(client, world):
    """HEAD is judged by the GET entry; routes without a HEAD handler answer 405, never data or 5xx."""
    assert access.rule_for("HEAD", "/v1/facilities") == PUBLIC
    assert access.rule_for("HEAD", "/v1/admin/facilities/{facility_id}/staff") == access.ADMIN
    admin = await make_caller(world, "admin", "admin")
    url = f"/v1/admin/facilities/{world.facility_id}/staff"
    assert (await client.request("HEAD", url)).status_code in (401, 405)
    assert (await client.request("HEAD", url, headers=admin.headers)).status_code in (200, 405)
