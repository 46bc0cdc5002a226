"""The public directory: facility and doctor search (case- and diacritic-insensitive), filters,
keyset pagination, services with prices, and the problem details it answers with."""

from __future__ import annotations

import base64
import json
import unicodedata
import uuid
from typing import Any

import pytest

from api.demo.dien_bien import DOCTORS, FACILITIES

FACILITY_KEYS = {
    "id",
    "code",
    "name",
    "kind",
    "district",
    "address",
    "phone",
    "latitude",
    "longitude",
    "opening_hours",
    "is_demo",
}
SERVICE_KEYS = {
    "id",
    "facility_id",
    "code",
    "name",
    "duration_minutes",
    "price_vnd",
    "video_offered",
    "prepayment_required",
    "active",
}
DOCTOR_KEYS = {
    "id",
    "facility_id",
    "facility_name",
    "code",
    "name",
    "title",
    "specialties",
    "languages",
    "video",
    "active",
}
DEMO_DOCTOR_PERSONAL_IDS = [d[7] for d in DOCTORS if d[7]]


def fold(text: str) -> str:
    """An oracle independent of PostgreSQL: strip combining marks, đ → d, lower case."""
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def facility_id(db, code: str) -> uuid.UUID:
    return await db.fetchval("SELECT id FROM facilities WHERE code = $1", code)


async def get_all(client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paginated list, following `next_cursor`; checks each page on the way."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= int(params.get("limit", 20))
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        assert page["items"], "a page promising more must not be empty"
    raise AssertionError("pagination never ended")


async def search_facilities(client, **params: Any) -> list[dict[str, Any]]:
    return await get_all(client, "/v1/facilities", limit=100, **params)


# --- the database function -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("Đ", "d"),
        ("đ", "d"),
        ("ĐIỆN BIÊN ĐÔNG", "dien bien dong"),
        ("Điện Biên Phủ", "dien bien phu"),
        ("Tuần Giáo", "tuan giao"),
        ("Nậm Pồ", "nam po"),
        ("Mường Ảng", "muong ang"),
        ("Tủa Chùa", "tua chua"),
        ("Giàng A Páo", "giang a pao"),
        ("Sùng A Sinh", "sung a sinh"),
        ("Ỷ Ơ Ư ỹ", "y o u y"),
        (unicodedata.normalize("NFD", "Tuần Giáo"), "tuan giao"),
        ("already plain", "already plain"),
    ],
)
async def test_fold_text_drops_case_and_vietnamese_diacritics(db, text, folded):
    assert await db.fetchval("SELECT fold_text($1)", text) == folded


async def test_fold_text_of_null_is_null(db):
    assert await db.fetchval("SELECT fold_text(NULL)") is None


# --- facility search -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected_codes"),
    [
        ("tuan giao", {"TTYT-TUANGIAO", "TYT-QUAICANG"}),
        ("TUẦN GIÁO", {"TTYT-TUANGIAO", "TYT-QUAICANG"}),
        ("DIEN BIEN DONG", {"TTYT-DBDONG"}),
        ("điện biên đông", {"TTYT-DBDONG"}),
        ("muong nhe", {"TTYT-MUONGNHE", "TYT-SINTHAU"}),
        ("nam po", {"TTYT-NAMPO", "TYT-CHANUA"}),
        ("NẬM PỒ", {"TTYT-NAMPO", "TYT-CHANUA"}),
        ("muong ang", {"TTYT-MUONGANG"}),
        ("him lam", {"BV-YHCT-DB", "TYT-HIMLAM"}),
    ],
)
async def test_facility_search_ignores_case_and_diacritics(client, q, expected_codes):
    found = {f["code"] for f in await search_facilities(client, q=q)}
    assert found == expected_codes


async def test_tuan_giao_finds_the_district_medical_centre(client):
    names = [f["name"] for f in await search_facilities(client, q="tuan giao")]
    assert "Trung tâm Y tế huyện Tuần Giáo" in names


async def test_dien_bien_finds_every_facility_naming_dien_bien(client, db):
    found = await search_facilities(client, q="dien bien")
    names = {f["name"] for f in found}
    assert {
        "Bệnh viện Đa khoa tỉnh Điện Biên",
        "Trung tâm Y tế huyện Điện Biên",
        "Trung tâm Y tế huyện Điện Biên Đông",
        "Trung tâm Y tế thành phố Điện Biên Phủ",
    } <= names
    # Oracle: every facility whose name, district or address folds to contain "dien bien", and only those.
    rows = await db.fetch("SELECT code, name, district, address FROM facilities")
    expected = {r["code"] for r in rows if "dien bien" in fold(f"{r['name']} {r['district']} {r['address']}")}
    assert {f["code"] for f in found} == expected
    for facility in found:
        assert "dien bien" in fold(f"{facility['name']} {facility['district']} {facility['address']}")


async def test_search_typed_in_decomposed_unicode_still_matches(client):
    q = unicodedata.normalize("NFD", "Tuần Giáo")
    assert {f["code"] for f in await search_facilities(client, q=q)} == {"TTYT-TUANGIAO", "TYT-QUAICANG"}


@pytest.mark.parametrize(
    "q", ["%", "_", "%%", "__", "%dien", "y t_", "dien%bien", "\\", "\\%", "'", "' OR 1=1 --"]
)
async def test_like_wildcards_in_q_match_literally(client, q):
    """`%` and `_` are characters to find, not wildcards: no search turns into 'everything'."""
    response = await client.get("/v1/facilities", params={"q": q, "limit": 100})
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}


async def test_q_with_nul_character_is_a_client_error(client):
    response = await client.get("/v1/facilities", params={"q": "dien\x00bien"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"] == "validation_failed"


async def test_kind_filter(client, db):
    found = await search_facilities(client, kind="commune_station")
    expected = await db.fetch("SELECT code FROM facilities WHERE kind = 'commune_station'")
    assert {f["code"] for f in found} == {r["code"] for r in expected}
    assert len(found) == 6
    assert all(f["kind"] == "commune_station" for f in found)


async def test_unknown_kind_is_rejected(client):
    response = await client.get("/v1/facilities", params={"kind": "spa"})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_failed"
    assert [e["field"] for e in body["errors"]] == ["kind"]


@pytest.mark.parametrize("district", ["Tuần Giáo", "tuan giao", "TUAN GIAO", "tuần giáo"])
async def test_district_filter_ignores_case_and_diacritics(client, district):
    found = await search_facilities(client, district=district)
    assert {f["code"] for f in found} == {"TTYT-TUANGIAO", "TYT-QUAICANG"}
    assert all(f["district"] == "Tuần Giáo" for f in found)


async def test_district_dien_bien_is_not_dien_bien_dong(client):
    found = await search_facilities(client, district="dien bien")
    assert {f["code"] for f in found} == {"TTYT-DIENBIEN", "TYT-THANHXUONG", "TYT-MUONGPHANG"}


async def test_kind_and_district_filters_combine(client):
    found = await search_facilities(client, district="tuan giao", kind="commune_station")
    assert [f["code"] for f in found] == ["TYT-QUAICANG"]
    found = await search_facilities(client, q="trung tam", district="nam po")
    assert [f["code"] for f in found] == ["TTYT-NAMPO"]


async def test_district_with_nul_character_is_a_client_error(client):
    response = await client.get("/v1/facilities", params={"district": "\x00"})
    assert response.status_code == 422, response.text


# --- pagination ------------------------------------------------------------------------------


async def test_walking_all_pages_returns_every_facility_once_in_name_order(client, db):
    items = await get_all(client, "/v1/facilities", limit=5)
    ids = [f["id"] for f in items]
    assert len(ids) == len(set(ids)), "a facility appeared on two pages"
    expected = await db.fetch("SELECT id FROM facilities ORDER BY name, id")
    assert ids == [str(r["id"]) for r in expected]
    assert len(ids) == await db.fetchval("SELECT count(*) FROM facilities") == len(FACILITIES)


async def test_pages_of_five_are_full_until_the_last(client):
    first = (await client.get("/v1/facilities", params={"limit": 5})).json()
    assert len(first["items"]) == 5
    assert first["next_cursor"]
    second = (await client.get("/v1/facilities", params={"limit": 5, "cursor": first["next_cursor"]})).json()
    assert len(second["items"]) == 5
    assert not {f["id"] for f in first["items"]} & {f["id"] for f in second["items"]}


async def test_exact_multiple_of_the_page_size_ends_with_no_cursor(client, db):
    total = await db.fetchval("SELECT count(*) FROM facilities")
    response = await client.get("/v1/facilities", params={"limit": total})
    assert response.status_code == 200
    assert len(response.json()["items"]) == total
    assert response.json()["next_cursor"] is None


async def test_pagination_keeps_the_search_filter(client):
    everything = await search_facilities(client, q="trung tam")
    paged = await get_all(client, "/v1/facilities", q="trung tam", limit=3)
    assert [f["id"] for f in paged] == [f["id"] for f in everything]
    assert len(paged) > 3


@pytest.mark.parametrize("limit", [0, -1, 101, 1000])
async def test_limit_out_of_range_is_422(client, limit):
    response = await client.get("/v1/facilities", params={"limit": limit})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_failed"
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "limit" in [e["field"] for e in body["errors"]]


async def test_limit_of_100_is_allowed(client):
    response = await client.get("/v1/facilities", params={"limit": 100})
    assert response.status_code == 200
    assert len(response.json()["items"]) == len(FACILITIES)


@pytest.mark.parametrize(
    "cursor",
    [
        "zzz",
        "!!!!",
        "bm90IGpzb24",  # "not json"
        cursor_of({"name": "a"}),
        cursor_of(["a"]),
        cursor_of(["a", "not-a-uuid"]),
        cursor_of([1, str(uuid.uuid4())]),
        cursor_of(["a", str(uuid.uuid4()), "extra"]),
    ],
)
@pytest.mark.parametrize("path", ["/v1/facilities", "/v1/doctors"])
async def test_malformed_cursor_is_invalid_cursor(client, path, cursor):
    response = await client.get(path, params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_cursor"


async def test_malformed_cursor_on_services_is_invalid_cursor(client, db):
    fid = await facility_id(db, "BVDK-DB")
    response = await client.get(f"/v1/facilities/{fid}/services", params={"cursor": "zzz"})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_cursor"


async def test_cursor_with_nul_character_is_a_client_error(client):
    response = await client.get("/v1/facilities", params={"cursor": cursor_of(["\x00", str(uuid.uuid4())])})
    assert 400 <= response.status_code < 500, response.text


# --- one facility and its services -----------------------------------------------------------


async def test_get_facility(client, db):
    row = await db.fetchrow("SELECT * FROM facilities WHERE code = 'TTYT-TUANGIAO'")
    response = await client.get(f"/v1/facilities/{row['id']}")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == FACILITY_KEYS
    assert body["id"] == str(row["id"])
    assert body["name"] == "Trung tâm Y tế huyện Tuần Giáo"
    assert body["kind"] == "district_medical_centre"
    assert body["district"] == "Tuần Giáo"
    assert body["is_demo"] is True
    assert body["opening_hours"][0] == {"weekday": 1, "opens": "07:00", "closes": "20:00"}
    assert len(body["opening_hours"]) == 7


async def test_unknown_facility_is_a_not_found_problem(client):
    response = await client.get(f"/v1/facilities/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "not_found"
    assert body["status"] == 404
    assert body["detail"] == "Không tìm thấy."


@pytest.mark.parametrize(
    "path",
    [
        "/v1/facilities/not-a-uuid",
        "/v1/facilities/123",
        "/v1/facilities/' OR 1=1 --",
        "/v1/facilities/%00",
        "/v1/facilities/not-a-uuid/services",
        "/v1/doctors/not-a-uuid",
        "/v1/doctors/..%2f..%2fetc%2fpasswd",
    ],
)
async def test_non_uuid_ids_are_client_errors(client, path):
    response = await client.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert response.status_code not in (401, 403)


async def test_services_list_active_services_with_prices(client, db):
    fid = await facility_id(db, "BVDK-DB")
    await db.execute(
        """INSERT INTO services (facility_id, code, name, duration_minutes, price_vnd, active)
           VALUES ($1, 'RETIRED-TEST', 'Dịch vụ đã ngừng', 15, 12345, false)
           ON CONFLICT (facility_id, code) DO UPDATE SET active = false""",
        fid,
    )
    items = await get_all(client, f"/v1/facilities/{fid}/services", limit=50)
    by_code = {s["code"]: s for s in items}
    assert "RETIRED-TEST" not in by_code
    assert {"KHAM-NOI", "KHAM-NHI", "TU-VAN-VIDEO", "SIEU-AM", "XN-MAU"} <= set(by_code)
    for service in items:
        assert set(service) == SERVICE_KEYS
        assert isinstance(service["price_vnd"], int) and not isinstance(service["price_vnd"], bool)
        assert service["active"] is True
        assert service["facility_id"] == str(fid)
    assert by_code["KHAM-NOI"]["price_vnd"] == 50_600
    assert by_code["KHAM-NOI"]["video_offered"] is False
    assert by_code["KHAM-NOI"]["prepayment_required"] is False
    video = by_code["TU-VAN-VIDEO"]
    assert (video["price_vnd"], video["video_offered"], video["prepayment_required"]) == (100_000, True, True)
    assert video["duration_minutes"] == 20
    active = await db.fetch("SELECT code FROM services WHERE facility_id = $1 AND active", fid)
    assert sorted(by_code) == sorted(r["code"] for r in active)


async def test_free_services_cost_zero(client, db):
    fid = await facility_id(db, "TYT-HIMLAM")
    items = (await client.get(f"/v1/facilities/{fid}/services")).json()["items"]
    assert {s["code"]: s["price_vnd"] for s in items}["TIEM-CHUNG"] == 0


async def test_services_paginate(client, db):
    fid = await facility_id(db, "BV-SANNHI-DB")
    everything = (await client.get(f"/v1/facilities/{fid}/services", params={"limit": 50})).json()
    assert everything["next_cursor"] is None
    paged = await get_all(client, f"/v1/facilities/{fid}/services", limit=2)
    assert [s["id"] for s in paged] == [s["id"] for s in everything["items"]]
    assert len(paged) == await db.fetchval(
        "SELECT count(*) FROM services WHERE facility_id = $1 AND active", fid
    )
    assert len(paged) >= 5


async def test_services_of_unknown_facility_is_404(client):
    response = await client.get(f"/v1/facilities/{uuid.uuid4()}/services")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


# --- doctors ---------------------------------------------------------------------------------


async def search_doctors(client, **params: Any) -> list[dict[str, Any]]:
    return await get_all(client, "/v1/doctors", limit=100, **params)


async def active_doctors(db) -> list[Any]:
    return await db.fetch("SELECT id, full_name, title, specialties FROM doctors WHERE active")


@pytest.mark.parametrize(
    ("q", "demo"),
    [
        ("giang a pao", {"Giàng A Páo"}),
        ("GIÀNG A PÁO", {"Giàng A Páo"}),
        ("pao", {"Giàng A Páo"}),
        ("duc", {"Phạm Minh Đức"}),
        ("Đức", {"Phạm Minh Đức"}),
        ("do thi nga", {"Đỗ Thị Nga"}),
        ("quang thi huong", {"Quàng Thị Hương"}),
        ("tim mach", {"Nguyễn Văn An", "Nguyễn Thanh Hải"}),
        ("%", set()),
        ("_", set()),
    ],
)
async def test_doctor_search_ignores_case_and_diacritics(client, db, q, demo):
    found = await search_doctors(client, q=q)
    assert demo <= {d["name"] for d in found}
    # Oracle: active doctors whose name, title or specialties fold to contain the folded query.
    expected = {
        str(r["id"])
        for r in await active_doctors(db)
        if fold(q) in fold(" ".join([r["full_name"], r["title"], *r["specialties"]]))
    }
    assert {d["id"] for d in found} == expected


async def test_doctors_filtered_by_facility(client, db):
    fid = await facility_id(db, "BVDK-DB")
    found = await search_doctors(client, facility_id=str(fid))
    assert {d["name"] for d in found} >= {"Nguyễn Văn An", "Quàng Thị Hương", "Lò Văn Thắng"}
    assert all(d["facility_id"] == str(fid) for d in found)
    assert all(d["facility_name"] == "Bệnh viện Đa khoa tỉnh Điện Biên" for d in found)
    expected = await db.fetchval("SELECT count(*) FROM doctors WHERE facility_id = $1 AND active", fid)
    assert len(found) == expected


async def test_doctors_of_unknown_facility_is_empty(client):
    assert await search_doctors(client, facility_id=str(uuid.uuid4())) == []


@pytest.mark.parametrize("specialty", ["nhi khoa", "Nhi khoa", "NHI KHOA", "nhi khóa"])
async def test_doctors_filtered_by_specialty(client, db, specialty):
    found = await search_doctors(client, specialty=specialty)
    assert {"Vàng Thị Mai", "Lê Thu Hà"} <= {d["name"] for d in found}
    assert all("nhi khoa" in [fold(s) for s in d["specialties"]] for d in found)
    expected = {
        str(r["id"]) for r in await active_doctors(db) if "nhi khoa" in [fold(s) for s in r["specialties"]]
    }
    assert {d["id"] for d in found} == expected


async def test_specialty_matches_whole_specialty(client):
    # "Nhi" alone is not a specialty: the filter compares whole specialties after folding.
    assert await search_doctors(client, specialty="nhi") == []
    assert "Phạm Minh Đức" in {d["name"] for d in await search_doctors(client, specialty="y hoc co truyen")}


@pytest.mark.parametrize("video", [True, False])
async def test_doctors_filtered_by_video(client, db, video):
    found = await search_doctors(client, video=str(video).lower())
    assert found
    assert all(d["video"] is video for d in found)
    expected = await db.fetch("SELECT id FROM doctors WHERE active AND video = $1", video)
    assert {d["id"] for d in found} == {str(r["id"]) for r in expected}


async def test_video_filter_names(client):
    names_with = {d["name"] for d in await search_doctors(client, video="true")}
    names_without = {d["name"] for d in await search_doctors(client, video="false")}
    assert {"Giàng A Páo", "Vàng Thị Mai"} <= names_with
    assert {"Lò Văn Thắng", "Phạm Minh Đức", "Sùng A Sinh", "Đỗ Thị Nga"} <= names_without
    assert not names_with & names_without


async def test_doctor_filters_combine(client, db):
    fid = await facility_id(db, "BVDK-DB")
    found = await search_doctors(client, facility_id=str(fid), video="false", q="thang")
    assert "Lò Văn Thắng" in [d["name"] for d in found]
    for doctor in found:
        assert (doctor["facility_id"], doctor["video"]) == (str(fid), False)
        assert "thang" in fold(" ".join([doctor["name"], doctor["title"], *doctor["specialties"]]))
    assert not await search_doctors(client, facility_id=str(fid), video="true", q="thang")


async def test_walking_all_doctor_pages(client, db):
    items = await get_all(client, "/v1/doctors", limit=3)
    ids = [d["id"] for d in items]
    assert len(ids) == len(set(ids))
    expected = await db.fetch("SELECT id FROM doctors WHERE active ORDER BY full_name, id")
    assert ids == [str(r["id"]) for r in expected]


async def test_inactive_doctors_are_not_listed(client, db):
    fid = await facility_id(db, "TYT-SINTHAU")
    retired = await db.fetchval(
        """INSERT INTO doctors (facility_id, code, full_name, specialties, active)
           VALUES ($1, 'RETIRED-DOC', 'Mùa A Xóa Nghỉ', '{Đa khoa}', false)
           ON CONFLICT (facility_id, code) DO UPDATE SET active = false RETURNING id""",
        fid,
    )
    assert await search_doctors(client, q="mua a xoa nghi") == []
    assert str(retired) not in {d["id"] for d in await search_doctors(client, facility_id=str(fid))}
    assert str(retired) not in {d["id"] for d in await get_all(client, "/v1/doctors", limit=100)}


async def test_doctors_never_expose_personal_ids(client, db):
    response = await client.get("/v1/doctors", params={"limit": 100})
    assert response.status_code == 200
    for doctor in response.json()["items"]:
        assert set(doctor) == DOCTOR_KEYS
    linked = await db.fetch("SELECT id, personal_id FROM doctors WHERE personal_id IS NOT NULL")
    assert {r["personal_id"] for r in linked} >= set(DEMO_DOCTOR_PERSONAL_IDS)
    for row in linked:
        assert row["personal_id"] not in response.text
        one = await client.get(f"/v1/doctors/{row['id']}")
        assert one.status_code == 200
        assert set(one.json()) == DOCTOR_KEYS
        assert row["personal_id"] not in one.text


async def test_get_doctor(client, db):
    row = await db.fetchrow("SELECT id, facility_id FROM doctors WHERE code = 'BS-PAO'")
    response = await client.get(f"/v1/doctors/{row['id']}")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Giàng A Páo"
    assert body["facility_id"] == str(row["facility_id"])
    assert body["facility_name"] == "Trung tâm Y tế huyện Tuần Giáo"
    assert body["specialties"] == ["Đa khoa"]
    assert body["languages"] == ["vi", "H'Mông"]
    assert body["video"] is True


async def test_unknown_doctor_is_404(client):
    response = await client.get(f"/v1/doctors/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "params",
    [
        {"facility_id": "not-a-uuid"},
        {"video": "maybe"},
        {"limit": "0"},
        {"limit": "101"},
        {"q": ""},
        {"q": "x" * 101},
        {"specialty": "\x00"},
    ],
)
async def test_bad_doctor_query_parameters_are_422(client, params):
    response = await client.get("/v1/doctors", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_failed"


# --- language of problem details -------------------------------------------------------------


async def test_problem_detail_is_vietnamese_by_default(client):
    response = await client.get(f"/v1/facilities/{uuid.uuid4()}")
    assert response.json()["detail"] == "Không tìm thấy."


@pytest.mark.parametrize("header", ["en", "en-US", "en-GB,en;q=0.9", "fr-FR, en;q=0.5"])
async def test_problem_detail_in_english_when_asked(client, header):
    response = await client.get(f"/v1/facilities/{uuid.uuid4()}", headers={"Accept-Language": header})
    assert response.status_code == 404
    assert response.json()["detail"] == "Not found."
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("header", ["vi", "vi-VN", "vi-VN,en;q=0.8", "fr", ""])
async def test_problem_detail_in_vietnamese_otherwise(client, header):
    response = await client.get(f"/v1/facilities/{uuid.uuid4()}", headers={"Accept-Language": header})
    assert response.json()["detail"] == "Không tìm thấy."


async def test_validation_problem_in_english(client):
    response = await client.get("/v1/facilities", params={"limit": 0}, headers={"Accept-Language": "en"})
    assert response.status_code == 422
    assert response.json()["detail"] == "The request is not valid."
    response = await client.get("/v1/facilities", params={"cursor": "zzz"}, headers={"Accept-Language": "en"})
    assert response.json()["detail"] == "The pagination cursor is not valid."
    response = await client.get("/v1/facilities", params={"cursor": "zzz"})
    assert response.json()["detail"] == "Con trỏ phân trang không hợp lệ."
