"""Devices, the inbox and preferences for the signed-in user; dead letters for facility staff."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from api.access import require_at
from api.errors import BEARER, ApiError, FieldError, error_responses
from api.identity.current_user import SignedInRequest
from api.notifications import queries
from api.notifications.models import (
    CategorySwitches,
    DeadLetterOut,
    DeadLetterPage,
    DeviceOut,
    DeviceRegistration,
    NotificationOut,
    NotificationPage,
    NotificationPreferences,
    QuietHours,
)
from api.pagination import Cursor, Limit, decode_cursor, next_cursor
from notifications import outbox
from notifications.templates import CATEGORIES, TEMPLATES, render


def device_out(row: asyncpg.Record) -> DeviceOut:
    return DeviceOut(
        id=row["id"],
        platform=row["platform"],
        locale=row["locale"],
        active=row["active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def notification_out(row: asyncpg.Record, locale: str) -> NotificationOut:
    rendered = render(
        row["kind"], msgspec.json.decode(row["params"]), "en" if locale == "en" else "vi", row["id"]
    )
    return NotificationOut(
        id=row["id"],
        kind=row["kind"],
        category=TEMPLATES[row["kind"]].category,
        title=rendered.title,
        body=rendered.body,
        data=rendered.data,
        created_at=row["not_before"],
        read_at=row["read_at"],
    )


def _page_after(cursor: str | None) -> tuple[dt.datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    moment, ident = decode_cursor(cursor, dt.datetime, uuid.UUID)
    return moment, ident


class DeviceController(Controller):
    path = "/v1/devices"
    security = [BEARER]
    tags = ["notifications"]

    @post(
        operation_id="registerDevice",
        summary="Register this app install for push, or refresh it",
        description="The same token registered by another user moves to the caller. 201 when new, 200 when refreshed.",
        responses={200: ResponseSpec(DeviceOut, description="Refreshed"), **error_responses("unauthorized")},
    )
    async def register_device(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        data: JSONBody[DeviceRegistration],
    ) -> Response[DeviceOut]:
        row, created = await queries.register_device(
            db, request.user.id, data.token, data.platform, data.locale
        )
        return Response(device_out(row), status_code=201 if created else 200)

    @delete(
        "/{device_id:uuid}",
        operation_id="deleteDevice",
        summary="Stop pushing to this device (sign-out on the phone)",
        responses=error_responses("unauthorized", "not_found"),
    )
    async def delete_device(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        device_id: FromPath[uuid.UUID],
    ) -> None:
        if not await queries.delete_device(db, request.user.id, device_id):
            raise ApiError("not_found")


class InboxController(Controller):
    path = "/v1/notifications"
    security = [BEARER]
    tags = ["notifications"]

    @get(
        operation_id="listNotifications",
        summary="The inbox, newest first",
        description="The source of truth: every notification is here, pushed or not. Rendered in the user's language.",
        responses=error_responses("unauthorized", "invalid_cursor"),
    )
    async def list_notifications(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        unread: Annotated[bool, QueryParameter(name="unread", description="Only unread ones.")] = False,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> NotificationPage:
        rows = await queries.list_inbox(
            db, request.user.id, unread_only=unread, after=_page_after(cursor), limit=limit + 1
        )
        return NotificationPage(
            items=[notification_out(r, request.user.locale) for r in rows[:limit]],
            next_cursor=next_cursor(rows, limit, "not_before", "id"),
        )

    @post(
        "/{notification_id:uuid}/read",
        operation_id="markNotificationRead",
        summary="Mark one notification read",
        status_code=200,
        responses=error_responses("unauthorized", "not_found"),
    )
    async def mark_read(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        notification_id: FromPath[uuid.UUID],
    ) -> NotificationOut:
        row = await queries.mark_read(db, request.user.id, notification_id)
        if row is None:
            raise ApiError("not_found")  # someone else's looks exactly like none at all
        return notification_out(row, request.user.locale)


class PreferencesController(Controller):
    path = "/v1/me/notification-preferences"
    security = [BEARER]
    tags = ["notifications"]

    @get(
        operation_id="getNotificationPreferences",
        summary="Quiet hours and which categories to push",
        responses=error_responses("unauthorized"),
    )
    async def get_preferences(
        self, request: SignedInRequest, db: NamedDependency[asyncpg.Connection]
    ) -> NotificationPreferences:
        row = await queries.get_preferences(db, request.user.id)
        return preferences_out(row)

    @put(
        operation_id="putNotificationPreferences",
        summary="Replace quiet hours and category switches",
        responses=error_responses("unauthorized"),
    )
    async def put_preferences(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        data: JSONBody[NotificationPreferences],
    ) -> NotificationPreferences:
        quiet = data.quiet_hours
        start, end = (_clock(quiet.start), _clock(quiet.end)) if quiet else (None, None)
        if quiet and start == end:
            raise ApiError(
                "validation_failed",
                errors=[FieldError(field="quiet_hours", message="start and end must differ")],
            )
        switches = msgspec.structs.asdict(data.categories)
        muted = [category for category in CATEGORIES if not switches[category]]
        await queries.put_preferences(db, request.user.id, start, end, muted)
        return data


def _clock(text: str) -> dt.time:
    return dt.time.fromisoformat(text)


def preferences_out(row: asyncpg.Record | None) -> NotificationPreferences:
    if row is None:
        return NotificationPreferences()
    quiet = (
        QuietHours(start=row["quiet_start"].strftime("%H:%M"), end=row["quiet_end"].strftime("%H:%M"))
        if row["quiet_start"] is not None
        else None
    )
    muted = set(row["muted_categories"])
    return NotificationPreferences(
        quiet_hours=quiet, categories=CategorySwitches(**{c: c not in muted for c in CATEGORIES})
    )


def dead_letter_out(row: asyncpg.Record) -> DeadLetterOut:
    return DeadLetterOut(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        state=row["push_state"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


class DeadLetterController(Controller):
    """Messages FCM would not take after every retry, about this facility; staff requeue them."""

    path = "/v1/admin/facilities/{facility_id:uuid}/notifications"
    security = [BEARER]
    tags = ["facility administration"]

    @get(
        "/dead-letters",
        operation_id="listDeadLetters",
        summary="Notifications that could not be pushed",
        responses=error_responses("unauthorized", "forbidden", "invalid_cursor"),
    )
    async def list_dead_letters(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> DeadLetterPage:
        require_at(request.user, facility_id, "facility_staff", "admin")
        rows = await outbox.list_dead(db, facility_id, _page_after(cursor), limit + 1)
        return DeadLetterPage(
            items=[dead_letter_out(r) for r in rows[:limit]],
            next_cursor=next_cursor(rows, limit, "finished_at", "id"),
        )

    @post(
        "/{notification_id:uuid}/requeue",
        operation_id="requeueDeadLetter",
        summary="Try a dead-lettered notification again, with a fresh set of attempts",
        status_code=200,
        responses=error_responses("unauthorized", "forbidden", "not_found"),
    )
    async def requeue(
        self,
        request: SignedInRequest,
        db: NamedDependency[asyncpg.Connection],
        facility_id: FromPath[uuid.UUID],
        notification_id: FromPath[uuid.UUID],
    ) -> DeadLetterOut:
        require_at(request.user, facility_id, "facility_staff", "admin")
        row = await outbox.requeue_dead(db, facility_id, notification_id)
        if row is None:
            raise ApiError("not_found")
        return dead_letter_out(row)
