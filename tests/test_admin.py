"""Facility administration: an administrator manages their own facility's services, doctors and staff;
front-desk staff record guardianships. Everything is checked through the API and in the database."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from typing import Any

import pytest

from tests.factories import Citizen, Session, grant_staff, personal_id, serve, sign_in

# Demo facilities these tests work in (other test files use other ones).
HOME = "TTYT-MUONGCHA"
OTHER = "TTYT-TUACHUA"
LAST_ADMIN = "TYT-SINTHAU"
CONCURRENT = "TTYT-MUONGLAY"
MASKED = re.compile(r"^\d{3}\*{7}\d{2}$")


def base(facility_id: Any) -> str:
    return f"/v1/admin/facilities/{facility_id}"


def code(prefix: str = "T") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10].upper()}"


def masked(pid: str) -> str:
    return f"{pid[:3]}*******{pid[-2:]}"


async def staff_member(client, db, issuer, facility_code: str, role: str) -> tuple[Session, Any, Citizen]:
    """A fresh person with `role` at the facility, signed in."""
    citizen = Citizen(name="Lò Văn Quản")
    facility_id = await grant_staff(db, citizen, facility_code, role)
    return await sign_in(client, issuer, citizen), facility_id, citizen


@pytest.fixture
async def admin(client, db, issuer) -> tuple[Session, Any]:
    session, facility_id, _ = await staff_member(client, db, issuer, HOME, "admin")
    return session, facility_id


@pytest.fixture
async def other_facility(db) -> Any:
    return await db.fetchval("SELECT id FROM facilities WHERE code = $1", OTHER)


def service_body(**overrides: Any) -> dict[str, Any]:
    return {
        "code": code("SV"),
        "name": "Khám sức khoẻ định kỳ",
        "duration_minutes": 30,
        "price_vnd": 150_000,
        "video_offered": True,
        "prepayment_required": False,
        **overrides,
    }


async def public_services(client, facility_id: Any) -> dict[str, dict[str, Any]]:
    response = await client.get(f"/v1/facilities/{facility_id}/services", params={"limit": 100})
    assert response.status_code == 200
    return {s["code"]: s for s in response.json()["items"]}


async def me(client, session: Session) -> dict[str, Any]:
    response = await client.get("/v1/me", headers=session.headers)
    assert response.status_code == 200, response.text
    return response.json()


def assert_problem(response, status: int, code_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code_
    return body


def assert_field_error(response, field: str) -> None:
    body = assert_problem(response, 422, "validation_failed")
    fields = [e["field"] for e in body["errors"]]
    assert any(field in f for f in fields), fields


async def table_snapshot(db, facility_id: Any) -> tuple[Any, ...]:
    """Everything facility administration can write about one facility."""
    return (
        await db.fetch("SELECT * FROM services WHERE facility_id = $1 ORDER BY id", facility_id),
        await db.fetch(
            "SELECT id, code, full_name, title, specialties, languages, video, active, personal_id "
            "FROM doctors WHERE facility_id = $1 ORDER BY id",
            facility_id,
        ),
        await db.fetch("SELECT * FROM staff WHERE facility_id = $1 ORDER BY id", facility_id),
    )


# --- services --------------------------------------------------------------------------------


async def test_admin_creates_a_service_that_the_public_sees(client, db, admin):
    session, fid = admin
    body = service_body(price_vnd=175_500)
    response = await client.post(f"{base(fid)}/services", json=body, headers=session.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["price_vnd"] == 175_500
    assert created["facility_id"] == str(fid)
    assert created["active"] is True
    row = await db.fetchrow("SELECT * FROM services WHERE id = $1", uuid.UUID(created["id"]))
    assert row["facility_id"] == fid
    assert row["price_vnd"] == 175_500
    assert row["duration_minutes"] == 30
    assert row["video_offered"] is True
    listed = (await public_services(client, fid))[body["code"]]
    assert listed["price_vnd"] == 175_500
    assert listed["video_offered"] is True
    assert listed["prepayment_required"] is False


async def test_admin_updates_and_deactivates_a_service(client, db, admin):
    session, fid = admin
    created = (
        await client.post(f"{base(fid)}/services", json=service_body(), headers=session.headers)
    ).json()
    url = f"{base(fid)}/services/{created['id']}"

    response = await client.patch(
        url, json={"price_vnd": 99_000, "prepayment_required": True}, headers=session.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["price_vnd"] == 99_000
    assert response.json()["name"] == created["name"], "fields not sent stay as they were"
    assert (await public_services(client, fid))[created["code"]]["prepayment_required"] is True

    response = await client.patch(url, json={"active": False}, headers=session.headers)
    assert response.status_code == 200
    assert response.json()["active"] is False
    assert created["code"] not in await public_services(client, fid)
    row = await db.fetchrow("SELECT active, price_vnd FROM services WHERE id = $1", uuid.UUID(created["id"]))
    assert (row["active"], row["price_vnd"]) == (False, 99_000)

    response = await client.patch(url, json={"active": True}, headers=session.headers)
    assert response.status_code == 200
    assert created["code"] in await public_services(client, fid)


async def test_patching_an_unknown_service_is_404(client, admin):
    session, fid = admin
    response = await client.patch(
        f"{base(fid)}/services/{uuid.uuid4()}", json={"price_vnd": 1}, headers=session.headers
    )
    assert_problem(response, 404, "not_found")


async def test_a_service_of_another_facility_cannot_be_patched_through_ones_own(
    client, db, admin, other_facility
):
    session, fid = admin
    service_id = await db.fetchval(
        "SELECT id FROM services WHERE facility_id = $1 AND code = 'KHAM-BENH'", other_facility
    )
    before = await db.fetchrow("SELECT * FROM services WHERE id = $1", service_id)
    response = await client.patch(
        f"{base(fid)}/services/{service_id}", json={"price_vnd": 1, "active": False}, headers=session.headers
    )
    assert_problem(response, 404, "not_found")
    assert await db.fetchrow("SELECT * FROM services WHERE id = $1", service_id) == before


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"price_vnd": -1}, "price_vnd"),
        ({"price_vnd": 1.5}, "price_vnd"),
        ({"price_vnd": 10_000_000_000}, "price_vnd"),
        ({"duration_minutes": 0}, "duration_minutes"),
        ({"duration_minutes": 481}, "duration_minutes"),
        ({"name": ""}, "name"),
        ({"code": "có dấu"}, "code"),
        ({"video_offered": "yes"}, "video_offered"),
    ],
)
async def test_invalid_service_values_are_422_naming_the_field(client, db, admin, overrides, field):
    session, fid = admin
    body = service_body(**overrides)
    response = await client.post(f"{base(fid)}/services", json=body, headers=session.headers)
    assert_field_error(response, field)
    assert not await db.fetchval(
        "SELECT count(*) FROM services WHERE facility_id = $1 AND code = $2", fid, body["code"]
    )


@pytest.mark.parametrize("missing", ["code", "name", "duration_minutes", "price_vnd"])
async def test_missing_service_fields_are_422(client, db, admin, missing):
    session, fid = admin
    body = service_body()
    del body[missing]
    response = await client.post(f"{base(fid)}/services", json=body, headers=session.headers)
    assert_field_error(response, missing)


@pytest.mark.parametrize(
    "extra",
    [{"price": 1}, {"id": str(uuid.uuid4())}, {"active": False}, {"facility_id": str(uuid.uuid4())}],
)
async def test_unknown_fields_in_a_new_service_are_422_and_nothing_is_written(client, db, admin, extra):
    session, fid = admin
    body = service_body(**extra)
    response = await client.post(f"{base(fid)}/services", json=body, headers=session.headers)
    errors = assert_problem(response, 422, "validation_failed")["errors"]
    (unknown,) = extra
    assert any(unknown in e["field"] or f"`{unknown}`" in e["message"] for e in errors), errors
    assert not await db.fetchval("SELECT count(*) FROM services WHERE code = $1", body["code"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"price_vnd": -5}, "price_vnd"),
        ({"duration_minutes": 0}, "duration_minutes"),
        ({"name": None}, "name"),
        ({"price": 1}, None),
        ({"id": "00000000-0000-0000-0000-000000000000"}, None),
        ({"facility_id": "00000000-0000-0000-0000-000000000000"}, None),
    ],
)
async def test_invalid_service_update_changes_nothing(client, db, admin, body, field):
    session, fid = admin
    created = (
        await client.post(f"{base(fid)}/services", json=service_body(), headers=session.headers)
    ).json()
    before = await db.fetchrow("SELECT * FROM services WHERE id = $1", uuid.UUID(created["id"]))
    response = await client.patch(f"{base(fid)}/services/{created['id']}", json=body, headers=session.headers)
    if field:
        assert_field_error(response, field)
    else:
        assert_problem(response, 422, "validation_failed")
    assert await db.fetchrow("SELECT * FROM services WHERE id = $1", uuid.UUID(created["id"])) == before


async def test_nul_character_in_a_service_name_is_a_client_error(client, db, admin):
    session, fid = admin
    body = service_body(name="Khám\x00bệnh")
    response = await client.post(f"{base(fid)}/services", json=body, headers=session.headers)
    assert 400 <= response.status_code < 500, response.text
    assert not await db.fetchval("SELECT count(*) FROM services WHERE code = $1", body["code"])


# --- doctors ---------------------------------------------------------------------------------


async def test_doctor_with_personal_id_gets_the_doctor_role_on_sign_in(client, db, issuer, admin):
    session, fid = admin
    doctor = Citizen(name="Mùa A Chứ", born=dt.date(1985, 2, 1))
    body = {
        "code": code("BS"),
        "name": "Mùa A Chứ",
        "title": "BSCKI",
        "specialties": ["Nhi khoa"],
        "languages": ["vi", "H'Mông"],
        "video": True,
        "personal_id": doctor.personal_id,
    }
    response = await client.post(f"{base(fid)}/doctors", json=body, headers=session.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    assert "personal_id" not in created
    assert doctor.personal_id not in response.text
    assert created["facility_id"] == str(fid)
    assert created["specialties"] == ["Nhi khoa"]

    row = await db.fetchrow(
        "SELECT personal_id, facility_id FROM doctors WHERE id = $1", uuid.UUID(created["id"])
    )
    assert (row["personal_id"], row["facility_id"]) == (doctor.personal_id, fid)

    signed_in = await sign_in(client, issuer, doctor)
    assert "doctor" in signed_in.user["roles"]
    assert {"facility_id": str(fid), "role": "doctor"} in signed_in.user["staff"]

    listed = await client.get("/v1/doctors", params={"facility_id": str(fid), "q": "mua a chu"})
    assert [d["id"] for d in listed.json()["items"]] == [created["id"]]
    assert doctor.personal_id not in listed.text


async def test_doctor_without_personal_id_grants_no_role(client, db, admin):
    session, fid = admin
    before = await db.fetchval("SELECT count(*) FROM staff WHERE facility_id = $1", fid)
    response = await client.post(
        f"{base(fid)}/doctors", json={"code": code("BS"), "name": "Lầu A Dơ"}, headers=session.headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["languages"] == ["vi"]
    assert response.json()["video"] is False
    assert await db.fetchval("SELECT count(*) FROM staff WHERE facility_id = $1", fid) == before


@pytest.mark.parametrize(
    "bad_id", ["999080000101", "011980000101", "01108000010", "0110800001011", "abcdefghijkl"]
)
async def test_doctor_with_invalid_personal_id_is_rejected(client, db, admin, bad_id):
    session, fid = admin
    body = {"code": code("BS"), "name": "Bác sĩ Sai Số", "personal_id": bad_id}
    response = await client.post(f"{base(fid)}/doctors", json=body, headers=session.headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] in ("invalid_personal_id", "validation_failed")
    assert not await db.fetchval("SELECT count(*) FROM doctors WHERE code = $1", body["code"])
    assert not await db.fetchval("SELECT count(*) FROM staff WHERE personal_id = $1", bad_id)


async def test_same_person_twice_as_doctor_at_one_facility_is_a_conflict(client, db, admin):
    session, fid = admin
    pid = personal_id(born=1980)
    first = {"code": code("BS"), "name": "Thào A Dình", "personal_id": pid}
    assert (await client.post(f"{base(fid)}/doctors", json=first, headers=session.headers)).status_code == 201
    second = {**first, "code": code("BS")}
    response = await client.post(f"{base(fid)}/doctors", json=second, headers=session.headers)
    assert_problem(response, 409, "conflict")
    assert not await db.fetchval("SELECT count(*) FROM doctors WHERE code = $1", second["code"])
    assert await db.fetchval("SELECT count(*) FROM doctors WHERE personal_id = $1", pid) == 1


async def test_admin_updates_and_deactivates_a_doctor(client, db, admin):
    session, fid = admin
    created = (
        await client.post(
            f"{base(fid)}/doctors",
            json={"code": code("BS"), "name": "Cứ A Dế", "specialties": ["Đa khoa"]},
            headers=session.headers,
        )
    ).json()
    url = f"{base(fid)}/doctors/{created['id']}"
    response = await client.patch(
        url, json={"title": "BSCKII", "specialties": ["Tim mạch"], "video": True}, headers=session.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "BSCKII"
    assert response.json()["name"] == "Cứ A Dế"
    found = await client.get("/v1/doctors", params={"specialty": "tim mach", "facility_id": str(fid)})
    assert created["id"] in [d["id"] for d in found.json()["items"]]

    response = await client.patch(url, json={"name": "Cứ A Dề"}, headers=session.headers)
    assert response.json()["name"] == "Cứ A Dề"
    assert (
        await db.fetchval("SELECT full_name FROM doctors WHERE id = $1", uuid.UUID(created["id"]))
        == "Cứ A Dề"
    )

    response = await client.patch(url, json={"active": False}, headers=session.headers)
    assert response.status_code == 200
    assert response.json()["active"] is False
    listed = await client.get("/v1/doctors", params={"facility_id": str(fid), "limit": 100})
    assert created["id"] not in [d["id"] for d in listed.json()["items"]]


async def test_patching_an_unknown_or_foreign_doctor_is_404(client, db, admin, other_facility):
    session, fid = admin
    response = await client.patch(
        f"{base(fid)}/doctors/{uuid.uuid4()}", json={"title": "x"}, headers=session.headers
    )
    assert_problem(response, 404, "not_found")
    foreign = await db.fetchval("SELECT id FROM doctors WHERE code = 'BS-AN'")
    before = await db.fetchrow("SELECT title, active FROM doctors WHERE id = $1", foreign)
    response = await client.patch(
        f"{base(fid)}/doctors/{foreign}", json={"title": "hacked", "active": False}, headers=session.headers
    )
    assert_problem(response, 404, "not_found")
    assert await db.fetchrow("SELECT title, active FROM doctors WHERE id = $1", foreign) == before


@pytest.mark.parametrize(
    "body",
    [
        {"facility_id": "00000000-0000-0000-0000-000000000000"},
        {"personal_id": "011080000101"},
        {"id": "00000000-0000-0000-0000-000000000000"},
        {"specialties": "Nhi khoa"},
        {"name": ""},
        {"specialties": [""]},
    ],
)
async def test_invalid_doctor_update_is_422_and_changes_nothing(client, db, admin, body):
    session, fid = admin
    created = (
        await client.post(
            f"{base(fid)}/doctors", json={"code": code("BS"), "name": "Giàng A Tủa"}, headers=session.headers
        )
    ).json()
    before = await db.fetchrow("SELECT * FROM doctors WHERE id = $1", uuid.UUID(created["id"]))
    response = await client.patch(f"{base(fid)}/doctors/{created['id']}", json=body, headers=session.headers)
    assert_problem(response, 422, "validation_failed")
    assert await db.fetchrow("SELECT * FROM doctors WHERE id = $1", uuid.UUID(created["id"])) == before


async def test_unknown_fields_in_a_new_doctor_are_422(client, db, admin):
    session, fid = admin
    body = {"code": code("BS"), "name": "Vừ A Sử", "active": False, "role": "admin"}
    response = await client.post(f"{base(fid)}/doctors", json=body, headers=session.headers)
    assert_problem(response, 422, "validation_failed")
    assert not await db.fetchval("SELECT count(*) FROM doctors WHERE code = $1", body["code"])


# --- staff -----------------------------------------------------------------------------------


async def test_staff_list_masks_personal_ids(client, db, admin):
    session, fid = admin
    response = await client.get(f"{base(fid)}/staff", headers=session.headers)
    assert response.status_code == 200
    staff = response.json()
    rows = await db.fetch("SELECT id, personal_id, role FROM staff WHERE facility_id = $1", fid)
    assert {s["id"] for s in staff} == {str(r["id"]) for r in rows}
    for member in staff:
        assert MASKED.match(member["personal_id"]), member["personal_id"]
        assert member["facility_id"] == str(fid)
    for row in rows:
        assert row["personal_id"] not in response.text
    own = session.user["personal_id"]
    mine = [s for s in staff if s["personal_id"] == masked(own) and s["role"] == "admin"]
    assert mine and mine[0]["name"] == "Lò Văn Quản"


async def test_granted_role_shows_on_the_persons_next_request(client, db, issuer, admin):
    session, fid = admin
    person = Citizen(name="Hoàng Thị Lễ Tân", gender="female")
    person_session = await sign_in(client, issuer, person)
    assert "facility_staff" not in person_session.user["roles"]

    response = await client.post(
        f"{base(fid)}/staff",
        json={"personal_id": person.personal_id, "role": "facility_staff"},
        headers=session.headers,
    )
    assert response.status_code == 201, response.text
    granted = response.json()
    assert granted["personal_id"] == masked(person.personal_id)
    assert granted["role"] == "facility_staff"
    assert granted["name"] == "Hoàng Thị Lễ Tân"

    profile = await me(client, person_session)  # same token as before the grant
    assert "facility_staff" in profile["roles"]
    assert {"facility_id": str(fid), "role": "facility_staff"} in profile["staff"]

    again = await client.post(
        f"{base(fid)}/staff",
        json={"personal_id": person.personal_id, "role": "facility_staff"},
        headers=session.headers,
    )
    assert again.status_code == 201
    assert again.json()["id"] == granted["id"], "granting twice is one role"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM staff WHERE personal_id = $1 AND facility_id = $2", person.personal_id, fid
        )
        == 1
    )


async def test_role_granted_before_first_sign_in(client, db, issuer, admin):
    session, fid = admin
    person = Citizen(name="Lò Văn Mới")
    response = await client.post(
        f"{base(fid)}/staff",
        json={"personal_id": person.personal_id, "role": "admin"},
        headers=session.headers,
    )
    assert response.status_code == 201
    assert response.json()["name"] is None
    assert {"facility_id": str(fid), "role": "admin"} in (await sign_in(client, issuer, person)).user["staff"]


@pytest.mark.parametrize(
    ("body", "expected_code"),
    [
        ({"personal_id": "999080000101", "role": "facility_staff"}, "invalid_personal_id"),
        ({"personal_id": "011980000101", "role": "facility_staff"}, "invalid_personal_id"),
        ({"personal_id": "12345", "role": "facility_staff"}, "validation_failed"),
        ({"personal_id": "011080000777", "role": "superuser"}, "validation_failed"),
        ({"personal_id": "011080000777", "role": "citizen"}, "validation_failed"),
        ({"personal_id": "011080000777"}, "validation_failed"),
        (
            {"personal_id": "011080000777", "role": "admin", "facility_id": str(uuid.uuid4())},
            "validation_failed",
        ),
    ],
)
async def test_invalid_staff_grants_write_nothing(client, db, admin, body, expected_code):
    session, fid = admin
    before = await db.fetch("SELECT * FROM staff ORDER BY id")
    response = await client.post(f"{base(fid)}/staff", json=body, headers=session.headers)
    assert_problem(response, 422, expected_code)
    assert await db.fetch("SELECT * FROM staff ORDER BY id") == before


async def test_removed_role_is_gone_on_the_persons_next_request(client, db, issuer, admin):
    session, fid = admin
    front_desk, _, person = await staff_member(client, db, issuer, HOME, "facility_staff")
    assert "facility_staff" in (await me(client, front_desk))["roles"]
    staff_id = await db.fetchval(
        "SELECT id FROM staff WHERE personal_id = $1 AND facility_id = $2 AND role = 'facility_staff'",
        person.personal_id,
        fid,
    )
    response = await client.delete(f"{base(fid)}/staff/{staff_id}", headers=session.headers)
    assert response.status_code == 204, response.text
    assert not await db.fetchval("SELECT count(*) FROM staff WHERE id = $1", staff_id)

    profile = await me(client, front_desk)  # the token issued while they held the role
    assert "facility_staff" not in profile["roles"]
    assert profile["staff"] == []
    guardian = await sign_in(client, issuer, Citizen())
    response = await client.post(
        f"{base(fid)}/guardianships",
        json=guardianship_body(guardian.user["personal_id"]),
        headers=front_desk.headers,
    )
    assert_problem(response, 403, "forbidden")


async def test_removing_unknown_or_foreign_staff_is_404(client, db, admin, other_facility):
    session, fid = admin
    response = await client.delete(f"{base(fid)}/staff/{uuid.uuid4()}", headers=session.headers)
    assert_problem(response, 404, "not_found")
    foreign = await db.fetchval(
        "INSERT INTO staff (personal_id, facility_id, role) VALUES ($1, $2, 'facility_staff') RETURNING id",
        personal_id(),
        other_facility,
    )
    response = await client.delete(f"{base(fid)}/staff/{foreign}", headers=session.headers)
    assert_problem(response, 404, "not_found")
    assert await db.fetchval("SELECT count(*) FROM staff WHERE id = $1", foreign) == 1


async def _only_admin(client, db, issuer, facility_code: str) -> tuple[Session, Any, Citizen]:
    """A fresh admin who has removed every other admin of the facility through the API."""
    session, fid, citizen = await staff_member(client, db, issuer, facility_code, "admin")
    others = await db.fetch(
        "SELECT id FROM staff WHERE facility_id = $1 AND role = 'admin' AND personal_id <> $2",
        fid,
        citizen.personal_id,
    )
    for row in others:
        response = await client.delete(f"{base(fid)}/staff/{row['id']}", headers=session.headers)
        assert response.status_code == 204, response.text
    return session, fid, citizen


async def test_the_last_admin_cannot_be_removed(client, db, issuer):
    session, fid, citizen = await _only_admin(client, db, issuer, LAST_ADMIN)
    own = await db.fetchval(
        "SELECT id FROM staff WHERE facility_id = $1 AND role = 'admin' AND personal_id = $2",
        fid,
        citizen.personal_id,
    )
    response = await client.delete(f"{base(fid)}/staff/{own}", headers=session.headers)
    body = assert_problem(response, 409, "last_admin")
    assert body["detail"] == "Không thể xoá quản trị viên cuối cùng của cơ sở."
    assert await db.fetchval("SELECT count(*) FROM staff WHERE id = $1", own) == 1
    assert "admin" in (await me(client, session))["roles"]

    # With a second admin the first may step down.
    second, _, _ = await staff_member(client, db, issuer, LAST_ADMIN, "admin")
    response = await client.delete(f"{base(fid)}/staff/{own}", headers=session.headers)
    assert response.status_code == 204
    assert "admin" not in (await me(client, session))["roles"]
    assert (await client.get(f"{base(fid)}/staff", headers=session.headers)).status_code == 403
    assert (await client.get(f"{base(fid)}/staff", headers=second.headers)).status_code == 200


async def test_two_admins_removing_each_other_concurrently_leave_one(client, db, issuer, settings):
    async with serve(settings) as concurrent:
        for _ in range(5):
            first, fid, first_citizen = await _only_admin(client, db, issuer, CONCURRENT)
            second, _, second_citizen = await staff_member(client, db, issuer, CONCURRENT, "admin")
            ids = {
                r["personal_id"]: r["id"]
                for r in await db.fetch(
                    "SELECT id, personal_id FROM staff WHERE facility_id = $1 AND role = 'admin'", fid
                )
            }
            assert len(ids) == 2
            responses = await asyncio.gather(
                concurrent.delete(
                    f"{base(fid)}/staff/{ids[second_citizen.personal_id]}", headers=first.headers
                ),
                concurrent.delete(
                    f"{base(fid)}/staff/{ids[first_citizen.personal_id]}", headers=second.headers
                ),
            )
            statuses = sorted(r.status_code for r in responses)
            assert statuses[0] == 204, [r.text for r in responses]
            assert statuses[1] in (403, 409), [r.text for r in responses]
            remaining = await db.fetchval(
                "SELECT count(*) FROM staff WHERE facility_id = $1 AND role = 'admin'", fid
            )
            assert remaining == 1


# --- guardianships ---------------------------------------------------------------------------


def guardianship_body(guardian_pid: str, **overrides: Any) -> dict[str, Any]:
    born = dt.date(2019, 8, 20)
    return {
        "guardian_personal_id": guardian_pid,
        "dependent_personal_id": personal_id(born=born.year, sex="female"),
        "dependent_name": "Lò Thị Hoa",
        "dependent_birthdate": born.isoformat(),
        "relationship": "child",
        **overrides,
    }


async def test_front_desk_records_a_guardianship_the_guardian_then_sees(client, db, issuer):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    guardian = await sign_in(client, issuer, Citizen(name="Lò Văn Bố"))
    assert await me_dependents(client, guardian) == []
    body = guardianship_body(guardian.user["personal_id"])

    response = await client.post(f"{base(fid)}/guardianships", json=body, headers=front_desk.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["source"] == "staff"
    assert created["guardian_id"] == guardian.user["id"]
    assert created["relationship"] == "child"

    row = await db.fetchrow(
        "SELECT source, relationship FROM guardianships WHERE guardian_id = $1 AND dependent_id = $2",
        uuid.UUID(created["guardian_id"]),
        uuid.UUID(created["dependent_id"]),
    )
    assert (row["source"], row["relationship"]) == ("staff", "child")
    dependent = await db.fetchrow("SELECT * FROM users WHERE id = $1", uuid.UUID(created["dependent_id"]))
    assert dependent["personal_id"] == body["dependent_personal_id"]
    assert dependent["sex"] == "female"
    assert dependent["birthdate"] == dt.date(2019, 8, 20)

    dependents = await me_dependents(client, guardian)
    assert len(dependents) == 1
    assert dependents[0]["id"] == created["dependent_id"]
    assert dependents[0]["name"] == "Lò Thị Hoa"
    assert dependents[0]["source"] == "staff"
    assert dependents[0]["personal_id"] == masked(body["dependent_personal_id"])
    assert "guardian" in (await me(client, guardian))["roles"]


async def me_dependents(client, session: Session) -> list[dict[str, Any]]:
    response = await client.get("/v1/me/dependents", headers=session.headers)
    assert response.status_code == 200, response.text
    return response.json()


async def test_admin_may_record_guardianships_too(client, db, issuer, admin):
    session, fid = admin
    guardian = await sign_in(client, issuer, Citizen(name="Quàng Thị Mẹ", gender="female"))
    response = await client.post(
        f"{base(fid)}/guardianships",
        json=guardianship_body(guardian.user["personal_id"], relationship="mother"),
        headers=session.headers,
    )
    assert response.status_code == 201, response.text
    assert [d["relationship"] for d in await me_dependents(client, guardian)] == ["mother"]


async def test_guardian_who_never_signed_in_is_404_and_nothing_written(client, db, issuer):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    body = guardianship_body(personal_id())
    response = await client.post(f"{base(fid)}/guardianships", json=body, headers=front_desk.headers)
    assert_problem(response, 404, "not_found")
    assert not await db.fetchval(
        "SELECT count(*) FROM users WHERE personal_id = $1", body["dependent_personal_id"]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"dependent_personal_id": personal_id(born=1990, sex="female")},  # not born in 2019
        {"dependent_personal_id": "999319000001"},  # no such province
        {"dependent_birthdate": "2030-01-01"},  # mismatching birth year
    ],
)
async def test_invalid_dependent_personal_id_is_422(client, db, issuer, overrides):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    guardian = await sign_in(client, issuer, Citizen())
    body = guardianship_body(guardian.user["personal_id"], **overrides)
    response = await client.post(f"{base(fid)}/guardianships", json=body, headers=front_desk.headers)
    assert_problem(response, 422, "invalid_personal_id")
    assert not await db.fetchval(
        "SELECT count(*) FROM users WHERE personal_id = $1", body["dependent_personal_id"]
    )
    assert await me_dependents(client, guardian) == []


async def test_guardian_cannot_be_their_own_dependent(client, db, issuer):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    person = Citizen(born=dt.date(1990, 3, 14))
    guardian = await sign_in(client, issuer, person)
    body = guardianship_body(
        person.personal_id, dependent_personal_id=person.personal_id, dependent_birthdate="1990-03-14"
    )
    response = await client.post(f"{base(fid)}/guardianships", json=body, headers=front_desk.headers)
    assert_problem(response, 422, "invalid_personal_id")
    assert await me_dependents(client, guardian) == []


@pytest.mark.parametrize(
    "extra",
    [{"source": "vneid"}, {"guardian_id": str(uuid.uuid4())}, {"facility_id": str(uuid.uuid4())}],
)
async def test_unknown_guardianship_fields_are_422(client, db, issuer, extra):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    guardian = await sign_in(client, issuer, Citizen())
    body = guardianship_body(guardian.user["personal_id"], **extra)
    response = await client.post(f"{base(fid)}/guardianships", json=body, headers=front_desk.headers)
    assert_problem(response, 422, "validation_failed")
    assert await me_dependents(client, guardian) == []


async def test_doctor_cannot_record_guardianships(client, db, issuer):
    doctor, fid, _ = await staff_member(client, db, issuer, HOME, "doctor")
    guardian = await sign_in(client, issuer, Citizen())
    response = await client.post(
        f"{base(fid)}/guardianships",
        json=guardianship_body(guardian.user["personal_id"]),
        headers=doctor.headers,
    )
    assert_problem(response, 403, "forbidden")
    assert await me_dependents(client, guardian) == []


async def test_front_desk_of_another_facility_cannot_record_here(client, db, issuer, other_facility):
    front_desk, _, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    guardian = await sign_in(client, issuer, Citizen())
    response = await client.post(
        f"{base(other_facility)}/guardianships",
        json=guardianship_body(guardian.user["personal_id"]),
        headers=front_desk.headers,
    )
    assert_problem(response, 403, "forbidden")
    assert await me_dependents(client, guardian) == []


async def test_front_desk_cannot_administer(client, db, issuer):
    front_desk, fid, _ = await staff_member(client, db, issuer, HOME, "facility_staff")
    before = await table_snapshot(db, fid)
    for method, path, body in admin_requests(fid, uuid.uuid4(), uuid.uuid4(), uuid.uuid4()):
        response = await client.request(method, path, json=body, headers=front_desk.headers)
        assert_problem(response, 403, "forbidden")
    assert await table_snapshot(db, fid) == before


# --- who may call at all ---------------------------------------------------------------------


def admin_requests(fid: Any, service_id: Any, doctor_id: Any, staff_id: Any) -> list[tuple[str, str, Any]]:
    return [
        ("POST", f"{base(fid)}/services", service_body()),
        ("PATCH", f"{base(fid)}/services/{service_id}", {"price_vnd": 1, "active": False}),
        ("POST", f"{base(fid)}/doctors", {"code": code("BS"), "name": "Kẻ Lạ", "personal_id": personal_id()}),
        ("PATCH", f"{base(fid)}/doctors/{doctor_id}", {"title": "hacked", "active": False}),
        ("GET", f"{base(fid)}/staff", None),
        ("POST", f"{base(fid)}/staff", {"personal_id": personal_id(), "role": "admin"}),
        ("DELETE", f"{base(fid)}/staff/{staff_id}", None),
    ]


async def foreign_targets(db, fid: Any) -> tuple[Any, Any, Any]:
    service_id = await db.fetchval("SELECT id FROM services WHERE facility_id = $1 ORDER BY id LIMIT 1", fid)
    doctor_id = await db.fetchval(
        "INSERT INTO doctors (facility_id, code, full_name) VALUES ($1, $2, 'Bác sĩ Ở Xa') RETURNING id",
        fid,
        code("BS"),
    )
    staff_id = await db.fetchval(
        "INSERT INTO staff (personal_id, facility_id, role) VALUES ($1, $2, 'admin') RETURNING id",
        personal_id(),
        fid,
    )
    return service_id, doctor_id, staff_id


async def test_admin_of_one_facility_cannot_touch_another(client, db, issuer, admin, other_facility):
    session, _ = admin
    targets = await foreign_targets(db, other_facility)
    before = await table_snapshot(db, other_facility)
    for method, path, body in admin_requests(other_facility, *targets):
        response = await client.request(method, path, json=body, headers=session.headers)
        assert_problem(response, 403, "forbidden")
    guardian = await sign_in(client, issuer, Citizen())
    response = await client.post(
        f"{base(other_facility)}/guardianships",
        json=guardianship_body(guardian.user["personal_id"]),
        headers=session.headers,
    )
    assert_problem(response, 403, "forbidden")
    assert await table_snapshot(db, other_facility) == before
    assert await me_dependents(client, guardian) == []


async def test_citizen_is_forbidden_and_anonymous_unauthorized(client, db, issuer, other_facility):
    targets = await foreign_targets(db, other_facility)
    citizen = await sign_in(client, issuer, Citizen())
    guardian = await sign_in(client, issuer, Citizen())
    before = await table_snapshot(db, other_facility)
    requests = [
        *admin_requests(other_facility, *targets),
        ("POST", f"{base(other_facility)}/guardianships", guardianship_body(guardian.user["personal_id"])),
    ]
    for method, path, body in requests:
        response = await client.request(method, path, json=body, headers=citizen.headers)
        assert_problem(response, 403, "forbidden")
        response = await client.request(method, path, json=body)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        response = await client.request(
            method, path, json=body, headers={"Authorization": "Bearer not-a-token"}
        )
        assert response.status_code == 401
    assert await table_snapshot(db, other_facility) == before
    assert await me_dependents(client, guardian) == []


async def test_unknown_facility_is_forbidden_not_a_crash(client, admin):
    session, _ = admin
    response = await client.get(f"{base(uuid.uuid4())}/staff", headers=session.headers)
    assert_problem(response, 403, "forbidden")
    response = await client.get("/v1/admin/facilities/not-a-uuid/staff", headers=session.headers)
    assert 400 <= response.status_code < 500


async def test_granting_the_same_role_twice_at_once_gives_one_role(client, db, issuer, settings, admin):
    session, fid = admin
    for _ in range(5):
        pid = personal_id()
        body = {"personal_id": pid, "role": "facility_staff"}
        async with serve(settings) as concurrent:
            responses = await asyncio.gather(
                *(concurrent.post(f"{base(fid)}/staff", json=body, headers=session.headers) for _ in range(4))
            )
        assert [r.status_code for r in responses] == [201] * 4, [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        assert await db.fetchval("SELECT count(*) FROM staff WHERE personal_id = $1", pid) == 1


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"null", b'"text"', b"{", b""])
async def test_malformed_bodies_are_client_errors(client, db, admin, raw):
    session, fid = admin
    before = await table_snapshot(db, fid)
    for path in ("services", "doctors", "staff", "guardianships"):
        response = await client.post(
            f"{base(fid)}/{path}",
            content=raw,
            headers={**session.headers, "content-type": "application/json"},
        )
        assert 400 <= response.status_code < 500, (path, response.text)
        assert response.json()["code"] == "validation_failed"
    assert await table_snapshot(db, fid) == before
