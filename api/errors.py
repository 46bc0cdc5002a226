"""RFC 9457 problem details with a stable `code` and a message in the caller's language.

Every error leaves through `ApiError`, which extends Litestar's `ProblemDetailsException`;
the `ProblemDetailsPlugin` maps Litestar's own exceptions (404, 405, 413, validation) and
anything unexpected into it, so clients see one shape and never a stack trace.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
import msgspec
from litestar import Request
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.response import Response

log = logging.getLogger("telehealth.errors")

# code -> (status, Vietnamese, English)
MESSAGES: dict[str, tuple[int, str, str]] = {
    "validation_failed": (422, "Dữ liệu gửi lên không hợp lệ.", "The request is not valid."),
    "not_found": (404, "Không tìm thấy.", "Not found."),
    "method_not_allowed": (405, "Phương thức không được hỗ trợ.", "Method not allowed."),
    "body_too_large": (413, "Nội dung yêu cầu quá lớn.", "The request body is too large."),
    "unauthorized": (401, "Cần đăng nhập.", "Authentication is required."),
    "invalid_token": (
        401,
        "Mã truy cập không hợp lệ hoặc đã hết hạn.",
        "The access token is invalid or expired.",
    ),
    "invalid_id_token": (401, "Mã định danh VNeID không hợp lệ.", "The VNeID ID token is invalid."),
    "invalid_refresh_token": (401, "Mã làm mới không hợp lệ.", "The refresh token is invalid."),
    "refresh_token_reused": (
        401,
        "Mã làm mới đã được dùng; phiên đăng nhập đã bị thu hồi.",
        "The refresh token was already used; the session has been revoked.",
    ),
    "forbidden": (403, "Bạn không có quyền thực hiện thao tác này.", "You are not allowed to do this."),
    "rate_limited": (429, "Quá nhiều yêu cầu, vui lòng thử lại sau.", "Too many requests; try again later."),
    "invalid_personal_id": (
        422,
        "Số định danh cá nhân không hợp lệ.",
        "The personal ID number is not valid.",
    ),
    "invalid_insurance_number": (
        422,
        "Số thẻ BHYT không hợp lệ.",
        "The health-insurance number is not valid.",
    ),
    "invalid_phone": (422, "Số điện thoại không hợp lệ.", "The phone number is not valid."),
    "invalid_cursor": (422, "Con trỏ phân trang không hợp lệ.", "The pagination cursor is not valid."),
    "unknown_facility": (404, "Không tìm thấy cơ sở y tế.", "The facility was not found."),
    "last_admin": (
        409,
        "Không thể xoá quản trị viên cuối cùng của cơ sở.",
        "The facility's last administrator cannot be removed.",
    ),
    "conflict": (409, "Dữ liệu bị trùng.", "The resource already exists."),
    "slot_taken": (409, "Khung giờ này vừa có người đặt.", "This slot has just been taken."),
    "not_a_slot": (
        422,
        "Thời điểm này không phải là một khung giờ khám của lịch.",
        "This time is not a slot of the doctor's schedule.",
    ),
    "slot_not_open": (
        422,
        "Khung giờ này đã qua hoặc chưa mở đặt lịch.",
        "This slot is in the past or not open for booking yet.",
    ),
    "overlapping_appointment": (
        409,
        "Người bệnh đã có lịch khám khác vào thời gian này.",
        "The patient already has an appointment at this time.",
    ),
    "too_many_appointments": (
        409,
        "Người bệnh đã có đủ số lịch khám sắp tới tại cơ sở này.",
        "The patient already has the most upcoming appointments allowed at this facility.",
    ),
    "too_late_to_cancel": (
        409,
        "Đã quá thời hạn hủy hoặc đổi lịch khám.",
        "It is too late to cancel or move this appointment.",
    ),
    "invalid_transition": (
        409,
        "Không thể thực hiện thao tác này với lịch khám ở trạng thái hiện tại.",
        "This cannot be done to the appointment in its current state.",
    ),
    "not_check_in_time": (
        409,
        "Chỉ làm thủ tục được từ 1 giờ trước giờ khám đến hết giờ khám.",
        "Check-in opens an hour before the visit and closes when it ends.",
    ),
    "hold_expired": (409, "Thời gian giữ chỗ đã hết.", "The hold on this slot has expired."),
    "identity_mismatch": (
        422,
        "Thông tin trên căn cước công dân không khớp với người bệnh.",
        "The ID card does not match the patient.",
    ),
    "invalid_date_range": (
        422,
        "Khoảng ngày không hợp lệ (tối đa 31 ngày).",
        "The date range is not valid (at most 31 days).",
    ),
    "invoice_not_payable": (
        409,
        "Hóa đơn này không còn chờ thanh toán.",
        "This invoice is not waiting for payment.",
    ),
    "payment_method_unavailable": (
        409,
        "Cơ sở y tế này chưa nhận phương thức thanh toán này.",
        "This facility does not take this payment method.",
    ),
    "payment_provider_unavailable": (
        503,
        "Cổng thanh toán tạm thời không phản hồi, vui lòng thử lại.",
        "The payment provider is not answering; please try again.",
    ),
    "refund_too_large": (
        409,
        "Số tiền hoàn lớn hơn số tiền còn lại của hóa đơn.",
        "The refund is larger than what is left on the invoice.",
    ),
    "invoice_not_refundable": (
        409,
        "Hóa đơn này chưa được thanh toán nên không thể hoàn tiền.",
        "This invoice has no payment to refund.",
    ),
    "refund_not_manual": (
        409,
        "Khoản hoàn tiền này không chờ thủ quỹ xác nhận.",
        "This refund is not waiting for the cashier.",
    ),
    "invalid_signature": (401, "Chữ ký không hợp lệ.", "The signature is not valid."),
    "idempotency_key_required": (
        400,
        "Thiếu tiêu đề Idempotency-Key.",
        "The Idempotency-Key header is required.",
    ),
    "idempotency_key_reused": (
        422,
        "Idempotency-Key này đã được dùng cho một yêu cầu khác.",
        "This Idempotency-Key was already used for a different request.",
    ),
    "service_unavailable": (
        503,
        "Dịch vụ tạm thời không khả dụng.",
        "The service is temporarily unavailable.",
    ),
    "internal_error": (500, "Đã xảy ra lỗi, vui lòng thử lại.", "Something went wrong; please try again."),
}

_BY_STATUS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    429: "rate_limited",
    503: "service_unavailable",
}


class FieldError(msgspec.Struct):
    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """The body of every error response."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str | None = None
    errors: list[FieldError] | None = None


def language(request: Request[Any, Any, Any]) -> str:
    """`en` when the caller prefers English, else Vietnamese (the default)."""
    header = request.headers.get("accept-language", "")
    for part in header.split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("vi"):
            return "vi"
        if tag.startswith("en"):
            return "en"
    return "vi"


class ApiError(ProblemDetailsException):
    """An error a client can act on, identified by a stable `code`."""

    def __init__(
        self,
        code: str,
        *,
        status_code: int | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        status = status_code or MESSAGES[code][0]
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        super().__init__(detail=code, status_code=status, headers=headers)
        self.code = code
        self.errors = errors

    def to_response(self, request: Request[Any, Any, Any]) -> Response[Any]:
        _, vi, en = MESSAGES[self.code]
        problem = Problem(
            type=f"https://telehealth.dienbien.gov.vn/problems/{self.code}",
            title=self.code.replace("_", " "),
            status=self.status_code,
            code=self.code,
            detail=en if language(request) == "en" else vi,
            request_id=request.scope.get("state", {}).get("request_id"),
            errors=self.errors,
        )
        return Response(
            problem,
            status_code=self.status_code,
            headers=self.headers,
            media_type="application/problem+json",
        )


def _from_http_exception(exc: HTTPException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationException):
        return _from_validation(exc)
    code = _BY_STATUS.get(
        exc.status_code, "internal_error" if exc.status_code >= 500 else "validation_failed"
    )
    return ApiError(code, status_code=exc.status_code, headers=exc.headers)


# msgspec names a missing or unknown key only in its message; Litestar then reports the enclosing object.
_NAMED_KEY = re.compile(r"(?:missing required field|unknown field) `([^`]+)`")


def _from_validation(exc: ValidationException) -> ApiError:
    errors = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            key = str(item.get("key") or item.get("source") or "body")
            message = str(item.get("message", "invalid"))
            if item.get("source") == "body" and (named := _NAMED_KEY.search(message)):
                key = named.group(1) if key == "data" else f"{key}.{named.group(1)}"
            errors.append(FieldError(field=key, message=message))
    if not errors:
        errors.append(FieldError(field="body", message=str(exc.detail)))
    return ApiError("validation_failed", errors=errors)


# The database went away under a request (a backend killed, a failover, a restart, the pool unable to
# reconnect): the transaction rolled back, so the client may safely retry, with the same
# Idempotency-Key where the route takes one.
_DATABASE_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
)


def _database_lost(exc: BaseException | None) -> bool:
    # What reaches the handler is often a consequence (the transaction's exit on a closed
    # connection, Litestar's group of dependency clean-up errors); the cause is further down.
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, _DATABASE_LOST):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _from_unexpected(exc: Exception) -> ApiError:
    if _database_lost(exc):
        log.warning("database unavailable: %s", type(exc).__name__)
        return ApiError("service_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, asyncpg.DataError) and str(exc).startswith("invalid input for query argument"):
        # A value PostgreSQL cannot take (a date in year 1, an integer past bigint), refused by
        # asyncpg before it was sent. Such values come from the request.
        return ApiError(
            "validation_failed",
            errors=[FieldError(field="request", message="A value is outside the range the service accepts")],
        )
    if isinstance(exc, asyncpg.CharacterNotInRepertoireError):
        # Text PostgreSQL cannot store (a NUL character) came from the client: its error, not ours.
        return ApiError(
            "validation_failed",
            errors=[FieldError(field="request", message="Text must not contain NUL characters")],
        )
    log.error("unhandled error", exc_info=exc)
    return ApiError("internal_error")


def problem_details_plugin() -> ProblemDetailsPlugin:
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                HTTPException: _from_http_exception,
                Exception: _from_unexpected,
            }
        )
    )


BEARER: dict[str, list[str]] = {"bearer": []}
"""OpenAPI security requirement of the routes that need a signed-in caller."""


def error_responses(*codes: str) -> dict[int, Any]:
    """OpenAPI `responses=` entries: the errors a route names, plus those any route can return."""
    from litestar.openapi.datastructures import ResponseSpec

    always = {400: "malformed request", 422: "validation_failed", 500: "internal_error"}
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(MESSAGES[code][0], []).append(code)
    for status, code in always.items():
        by_status.setdefault(status, []).append(code)
    return {
        status: ResponseSpec(
            data_container=Problem,
            description="Problem details; code: " + ", ".join(dict.fromkeys(names)),
            media_type="application/problem+json",
            # Generated examples are random text, and differ each time a document is built in one process.
            generate_examples=False,
        )
        for status, names in sorted(by_status.items())
    }
