"""Function-level authorization: one table maps every route to the roles allowed. Deny by default.

A route missing from the table answers 403 to everyone, and `tests/test_access_table.py`
fails until it is added. Object-level checks (whose appointment, which facility) are made
by the domain code after this gate.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final, Literal

from litestar.types import Scope

from api.errors import ApiError

if TYPE_CHECKING:
    from api.identity.current_user import CurrentUser, SessionToken

PUBLIC: Final = "public"
Rule = frozenset[str] | Literal["public"]

CITIZEN = frozenset({"citizen"})  # every signed-in person is a citizen
STAFF = frozenset({"doctor", "facility_staff", "admin"})
ADMIN = frozenset({"admin"})
FRONT_DESK = frozenset({"facility_staff", "admin"})

ROUTE_ROLES: dict[tuple[str, str], Rule] = {
    # operations
    ("GET", "/health/live"): PUBLIC,
    ("GET", "/health/ready"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/dev/vneid/jwks.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/openapi.json"): PUBLIC,
    ("GET", "/docs/scalar"): PUBLIC,
    ("GET", "/docs/{path}"): PUBLIC,
    # identity
    ("POST", "/v1/auth/vneid"): PUBLIC,
    ("POST", "/v1/auth/refresh"): PUBLIC,
    ("POST", "/v1/auth/logout"): CITIZEN,
    ("GET", "/v1/me"): CITIZEN,
    ("PATCH", "/v1/me"): CITIZEN,
    ("GET", "/v1/me/dependents"): CITIZEN,
    # booking
    ("GET", "/v1/availability"): PUBLIC,
    ("POST", "/v1/appointments"): CITIZEN,
    ("GET", "/v1/appointments"): CITIZEN,
    ("GET", "/v1/appointments/{appointment_id}"): CITIZEN,
    ("POST", "/v1/appointments/{appointment_id}/cancel"): CITIZEN,
    ("POST", "/v1/appointments/{appointment_id}/reschedule"): CITIZEN,
    ("POST", "/v1/appointments/{appointment_id}/check-in"): CITIZEN,
    ("POST", "/v1/waitlist"): CITIZEN,
    ("GET", "/v1/waitlist"): CITIZEN,
    ("POST", "/v1/waitlist/{entry_id}/accept"): CITIZEN,
    ("DELETE", "/v1/waitlist/{entry_id}"): CITIZEN,
    ("GET", "/v1/staff/schedules"): STAFF,
    ("POST", "/v1/staff/schedules"): FRONT_DESK,
    ("POST", "/v1/staff/schedules/{schedule_id}/exceptions"): FRONT_DESK,
    ("GET", "/v1/staff/appointments"): STAFF,
    ("POST", "/v1/staff/appointments/{appointment_id}/no-show"): FRONT_DESK,
    ("POST", "/v1/staff/appointments/{appointment_id}/complete"): STAFF,
    # payments
    ("GET", "/v1/invoices"): CITIZEN,
    ("GET", "/v1/invoices/{invoice_id}"): CITIZEN,
    ("POST", "/v1/invoices/{invoice_id}/payments"): CITIZEN,
    # provider callbacks: authenticated by their signatures, not by a user
    ("GET", "/v1/payments/callbacks/vnpay"): PUBLIC,
    ("POST", "/v1/payments/callbacks/momo"): PUBLIC,
    ("POST", "/v1/payments/callbacks/zalopay"): PUBLIC,
    ("POST", "/v1/payments/callbacks/bank-transfer"): PUBLIC,
    ("GET", "/v1/payments/return"): PUBLIC,
    ("POST", "/v1/staff/invoices/{invoice_id}/refunds"): FRONT_DESK,
    ("GET", "/v1/staff/refunds"): FRONT_DESK,
    ("POST", "/v1/staff/refunds/{refund_id}/confirm"): FRONT_DESK,
    # notifications
    ("POST", "/v1/devices"): CITIZEN,
    ("DELETE", "/v1/devices/{device_id}"): CITIZEN,
    ("GET", "/v1/notifications"): CITIZEN,
    ("POST", "/v1/notifications/{notification_id}/read"): CITIZEN,
    ("GET", "/v1/me/notification-preferences"): CITIZEN,
    ("PUT", "/v1/me/notification-preferences"): CITIZEN,
    # directory
    ("GET", "/v1/facilities"): PUBLIC,
    ("GET", "/v1/facilities/{facility_id}"): PUBLIC,
    ("GET", "/v1/facilities/{facility_id}/services"): PUBLIC,
    ("GET", "/v1/doctors"): PUBLIC,
    ("GET", "/v1/doctors/{doctor_id}"): PUBLIC,
    # facility administration (the facility itself is checked against the admin's memberships)
    ("POST", "/v1/admin/facilities/{facility_id}/services"): ADMIN,
    ("PATCH", "/v1/admin/facilities/{facility_id}/services/{service_id}"): ADMIN,
    ("POST", "/v1/admin/facilities/{facility_id}/doctors"): ADMIN,
    ("PATCH", "/v1/admin/facilities/{facility_id}/doctors/{doctor_id}"): ADMIN,
    ("GET", "/v1/admin/facilities/{facility_id}/staff"): ADMIN,
    ("POST", "/v1/admin/facilities/{facility_id}/staff"): ADMIN,
    ("DELETE", "/v1/admin/facilities/{facility_id}/staff/{staff_id}"): ADMIN,
    ("POST", "/v1/admin/facilities/{facility_id}/guardianships"): FRONT_DESK,
    ("GET", "/v1/admin/facilities/{facility_id}/notifications/dead-letters"): FRONT_DESK,
    ("POST", "/v1/admin/facilities/{facility_id}/notifications/{notification_id}/requeue"): FRONT_DESK,
}


def rule_for(method: str, path_template: str) -> Rule | None:
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, path_template))


def authorize(scope: Scope, user: CurrentUser | SessionToken | None) -> None:
    """Look the route up in the table and compare with the caller's roles.

    Called by the bearer-authentication middleware (api/identity/current_user.py) as soon as it
    knows the caller, for every HTTP and WebSocket route (OPTIONS pre-flights are not
    authenticated, so not checked either). Not a Litestar guard on purpose: Litestar copies the
    route handler for every guard call, which cost about 5 % of a worker's CPU under load
    (bench/README.md).
    """
    rule = rule_for(str(scope.get("method") or "WEBSOCKET"), scope.get("path_template", ""))
    if rule is None:
        raise ApiError("forbidden")
    if rule == PUBLIC:
        return
    if user is None:
        raise ApiError("unauthorized")
    if not rule & user.roles:
        raise ApiError("forbidden")


def require_at(user: CurrentUser, facility_id: uuid.UUID, *roles: str) -> None:
    """Object-level check for facility routes: one of `roles` at this very facility, not just somewhere."""
    if not user.is_at(facility_id, *roles):
        raise ApiError("forbidden")
