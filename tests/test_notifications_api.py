"""Devices, the inbox, preferences and dead letters through HTTP, with rows checked in the database."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

import notifications
from tests.factories import Citizen, grant_staff, notify, sign_in

DEAD_LETTER_FACILITY = "TTYT-NAMPO"


async def user_id_of(session) -> uuid.UUID:
    return uuid.UUID(session.user["id"])


# ---------------------------------------------------------------- devices


async def test_register_refresh_and_delete_a_device(client, db, issuer):
    session = await sign_in(client, issuer)
    token = f"device-{uuid.uuid4().hex}"
    created = await client.post(
        "/v1/devices", json={"token": token, "platform": "android", "locale": "en"}, headers=session.headers
    )
    assert created.status_code == 201, created.text
    device = created.json()
    assert device["active"] and device["locale"] == "en" and "token" not in device

    again = await client.post(
        "/v1/devices", json={"token": token, "platform": "android", "locale": "vi"}, headers=session.headers
    )
    assert again.status_code == 200
    assert again.json()["id"] == device["id"] and again.json()["locale"] == "vi"
    assert await db.fetchval("SELECT count(*) FROM devices WHERE token = $1", token) == 1

    deleted = await client.delete(f"/v1/devices/{device['id']}", headers=session.headers)
    assert deleted.status_code == 204
    assert await db.fetchval("SELECT count(*) FROM devices WHERE token = $1", token) == 0
    assert (await client.delete(f"/v1/devices/{device['id']}", headers=session.headers)).status_code == 404


async def test_a_token_signed_in_as_someone_else_moves_to_them(client, db, issuer):
    """A phone handed to a family member stops showing the first owner's notifications."""
    first, second = await sign_in(client, issuer), await sign_in(client, issuer)
    token = f"device-{uuid.uuid4().hex}"
    body = {"token": token, "platform": "ios"}
    device_id = (await client.post("/v1/devices", json=body, headers=first.headers)).json()["id"]
    moved = await client.post("/v1/devices", json=body, headers=second.headers)
    assert moved.status_code == 200 and moved.json()["id"] == device_id
    owners = await db.fetch("SELECT user_id FROM devices WHERE token = $1", token)
    assert [r["user_id"] for r in owners] == [await user_id_of(second)]
    # The first user no longer owns it.
    assert (await client.delete(f"/v1/devices/{device_id}", headers=first.headers)).status_code == 404


async def test_registering_again_reactivates_a_rejected_token(client, db, issuer):
    session = await sign_in(client, issuer)
    token = f"device-{uuid.uuid4().hex}"
    await client.post("/v1/devices", json={"token": token, "platform": "web"}, headers=session.headers)
    await db.execute(
        "UPDATE devices SET active = false, deactivated_reason = 'UNREGISTERED' WHERE token = $1", token
    )
    again = await client.post(
        "/v1/devices", json={"token": token, "platform": "web"}, headers=session.headers
    )
    assert again.json()["active"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"token": "", "platform": "android"},
        {"token": "x", "platform": "symbian"},
        {"token": "x", "platform": "android", "locale": "fr"},
        {"token": "x", "platform": "android", "user_id": str(uuid.uuid4())},
        {"platform": "android"},
    ],
)
async def test_bad_device_registrations_are_422(client, issuer, body):
    session = await sign_in(client, issuer)
    response = await client.post("/v1/devices", json=body, headers=session.headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_failed"


async def test_devices_need_a_signed_in_user(client):
    response = await client.post("/v1/devices", json={"token": "abc", "platform": "android"})
    assert response.status_code == 401


# ---------------------------------------------------------------- inbox


async def test_the_inbox_lists_newest_first_in_the_user_s_language(client, db, issuer):
    session = await sign_in(client, issuer)
    await client.patch("/v1/me", json={"locale": "en"}, headers=session.headers)
    user_id = await user_id_of(session)
    invoice_id = uuid.uuid4()
    first = await notify(db, user_id, "payment_failed", params={"invoice_id": invoice_id})
    second = await notify(
        db, user_id, "payment_received", params={"invoice_id": invoice_id, "amount": 200_000}
    )
    response = await client.get("/v1/notifications", headers=session.headers)
    assert response.status_code == 200
    items = response.json()["items"]
    assert [i["id"] for i in items] == [str(second), str(first)]
    assert items[0]["title"] == "Payment received" and "200,000 VND" in items[0]["body"]
    assert items[0]["category"] == "payments" and items[0]["read_at"] is None
    assert items[0]["data"] == {
        "kind": "payment_received",
        "notification_id": str(second),
        "invoice_id": str(invoice_id),
    }


async def test_the_inbox_pages_with_a_cursor(client, db, issuer):
    session = await sign_in(client, issuer)
    user_id = await user_id_of(session)
    made = [await notify(db, user_id) for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/notifications", params=params, headers=session.headers)).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [str(i) for i in reversed(made)]
    bad = await client.get("/v1/notifications", params={"cursor": "not-a-cursor"}, headers=session.headers)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


async def test_mark_read_and_filter_unread(client, db, issuer):
    session = await sign_in(client, issuer)
    user_id = await user_id_of(session)
    read, unread = await notify(db, user_id), await notify(db, user_id)
    marked = await client.post(f"/v1/notifications/{read}/read", headers=session.headers)
    assert marked.status_code == 200 and marked.json()["read_at"] is not None
    first_read_at = await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", read)
    await client.post(f"/v1/notifications/{read}/read", headers=session.headers)
    assert await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", read) == first_read_at
    page = (await client.get("/v1/notifications", params={"unread": "true"}, headers=session.headers)).json()
    assert [i["id"] for i in page["items"]] == [str(unread)]


async def test_nobody_reads_or_marks_another_user_s_notifications(client, db, issuer):
    owner, stranger = await sign_in(client, issuer), await sign_in(client, issuer)
    notification_id = await notify(db, await user_id_of(owner))
    listed = (await client.get("/v1/notifications", headers=stranger.headers)).json()["items"]
    assert str(notification_id) not in [i["id"] for i in listed]
    response = await client.post(f"/v1/notifications/{notification_id}/read", headers=stranger.headers)
    assert response.status_code == 404
    assert await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", notification_id) is None


async def test_scheduled_and_cancelled_notifications_stay_out_of_the_inbox(client, db, issuer):
    session = await sign_in(client, issuer)
    user_id = await user_id_of(session)
    appointment_id = uuid.uuid4()
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    params = {"appointment_id": appointment_id, "start": start}
    subject = f"appointment:{appointment_id}"
    tomorrow = await notify(db, user_id, "appointment_reminder_24h", params=params, subject=subject)
    # Scheduled, as book_appointment writes a hold's warning.
    await db.execute(
        "UPDATE notifications SET not_before = $2, next_attempt_at = $2 WHERE id = $1",
        tomorrow,
        start - dt.timedelta(days=1),
    )
    booked = await notify(db, user_id, "appointment_booked", params=params, subject=subject)
    ids = [i["id"] for i in (await client.get("/v1/notifications", headers=session.headers)).json()["items"]]
    assert ids == [str(booked)], "a reminder for tomorrow is not in today's inbox"
    assert (
        await client.post(f"/v1/notifications/{tomorrow}/read", headers=session.headers)
    ).status_code == 404

    # Once due it shows; cancelled, it is gone.
    await db.execute("UPDATE notifications SET not_before = now() WHERE id = $1", tomorrow)
    ids = [i["id"] for i in (await client.get("/v1/notifications", headers=session.headers)).json()["items"]]
    assert str(tomorrow) in ids
    async with db.transaction():
        assert await notifications.cancel_pending(db, subject, ["appointment_reminder_24h"]) == 1
    ids = [i["id"] for i in (await client.get("/v1/notifications", headers=session.headers)).json()["items"]]
    assert ids == [str(booked)]


# ---------------------------------------------------------------- preferences


async def test_preferences_default_to_everything_on_and_no_quiet_hours(client, issuer):
    session = await sign_in(client, issuer)
    response = await client.get("/v1/me/notification-preferences", headers=session.headers)
    assert response.status_code == 200
    assert response.json() == {
        "quiet_hours": None,
        "categories": {"appointments": True, "payments": True, "consultations": True, "health_book": True},
    }


async def test_preferences_are_replaced_and_stored(client, db, issuer):
    session = await sign_in(client, issuer)
    body = {"quiet_hours": {"start": "22:00", "end": "06:30"}, "categories": {"payments": False}}
    response = await client.put("/v1/me/notification-preferences", json=body, headers=session.headers)
    assert response.status_code == 200, response.text
    expected = {
        "quiet_hours": {"start": "22:00", "end": "06:30"},
        "categories": {"appointments": True, "payments": False, "consultations": True, "health_book": True},
    }
    assert response.json() == expected
    assert (await client.get("/v1/me/notification-preferences", headers=session.headers)).json() == expected
    row = await db.fetchrow(
        "SELECT quiet_start, quiet_end, muted_categories FROM notification_preferences WHERE user_id = $1",
        await user_id_of(session),
    )
    assert (row["quiet_start"], row["quiet_end"], row["muted_categories"]) == (
        dt.time(22, 0),
        dt.time(6, 30),
        ["payments"],
    )
    cleared = await client.put("/v1/me/notification-preferences", json={}, headers=session.headers)
    assert cleared.json()["quiet_hours"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"quiet_hours": {"start": "22:00", "end": "22:00"}},
        {"quiet_hours": {"start": "24:00", "end": "06:00"}},
        {"quiet_hours": {"start": "10pm", "end": "06:00"}},
        {"quiet_hours": {"start": "22:00"}},
        {"categories": {"marketing": False}},
        {"do_not_disturb": True},
    ],
)
async def test_bad_preferences_are_422_and_change_nothing(client, db, issuer, body):
    session = await sign_in(client, issuer)
    response = await client.put("/v1/me/notification-preferences", json=body, headers=session.headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_failed"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM notification_preferences WHERE user_id = $1", await user_id_of(session)
        )
        == 0
    )


# ---------------------------------------------------------------- dead letters


async def dead_letter(db, user_id, facility_id) -> uuid.UUID | None:
    notification_id = await notify(db, user_id, facility_id=facility_id)
    await db.execute(
        """UPDATE notifications SET push_state = 'dead', attempts = 10, last_error = 'UNAVAILABLE',
                  finished_at = now() WHERE id = $1""",
        notification_id,
    )
    return notification_id


async def test_facility_staff_list_and_requeue_their_dead_letters(client, db, issuer):
    clerk = Citizen(name="Lò Thị Mai")
    facility_id = await grant_staff(db, clerk, DEAD_LETTER_FACILITY, "facility_staff")
    session = await sign_in(client, issuer, clerk)
    patient = await sign_in(client, issuer)
    ours = await dead_letter(db, await user_id_of(patient), facility_id)
    elsewhere_id = await db.fetchval("SELECT id FROM facilities WHERE code = 'TYT-HIMLAM'")
    theirs = await dead_letter(db, await user_id_of(patient), elsewhere_id)
    base = f"/v1/admin/facilities/{facility_id}/notifications"

    listed = await client.get(f"{base}/dead-letters", headers=session.headers)
    assert listed.status_code == 200
    ids = [i["id"] for i in listed.json()["items"]]
    assert str(ours) in ids and str(theirs) not in ids
    assert listed.json()["items"][ids.index(str(ours))]["last_error"] == "UNAVAILABLE"

    requeued = await client.post(f"{base}/{ours}/requeue", headers=session.headers)
    assert requeued.status_code == 200 and requeued.json()["state"] == "pending"
    row = await db.fetchrow(
        "SELECT push_state, attempts, next_attempt_at <= now() AS due FROM notifications WHERE id = $1", ours
    )
    assert (row["push_state"], row["attempts"], row["due"]) == ("pending", 0, True)
    # Not dead any more, and another facility's letter is not ours to requeue.
    assert (await client.post(f"{base}/{ours}/requeue", headers=session.headers)).status_code == 404
    assert (await client.post(f"{base}/{theirs}/requeue", headers=session.headers)).status_code == 404
    assert await db.fetchval("SELECT push_state FROM notifications WHERE id = $1", theirs) == "dead"


async def test_dead_letters_are_for_that_facility_s_staff_only(client, db, issuer):
    facility_id = await db.fetchval("SELECT id FROM facilities WHERE code = $1", DEAD_LETTER_FACILITY)
    doctor = Citizen(name="Quàng Văn Sơn")
    await grant_staff(db, doctor, DEAD_LETTER_FACILITY, "doctor")
    elsewhere = Citizen(name="Vì Thị Hoa")
    await grant_staff(db, elsewhere, "TYT-HIMLAM", "facility_staff")
    base = f"/v1/admin/facilities/{facility_id}/notifications/dead-letters"
    for citizen in (Citizen(), doctor, elsewhere):
        session = await sign_in(client, issuer, citizen)
        assert (await client.get(base, headers=session.headers)).status_code == 403
