"""One template per kind of notification, in Vietnamese and English.

A push travels through Google's and Apple's servers and shows on a lock screen, so it carries
no health data: the title and body say only what kind of thing happened and when, and the data
payload carries ids the app uses to fetch the details with its own token. That rule is enforced
here: each kind declares exactly which params it takes, and params are only ids, times and
amounts.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Literal

import msgspec

from api.clinic_time import clinic_time

Category = Literal["appointments", "payments", "consultations", "health_book"]
CATEGORIES: tuple[Category, ...] = ("appointments", "payments", "consultations", "health_book")
Locale = Literal["vi", "en"]
ParamType = Literal["id", "time", "amount"]


class Template(msgspec.Struct, frozen=True):
    category: Category
    params: Mapping[str, ParamType]
    vi: tuple[str, str]
    en: tuple[str, str]
    # Goes out through quiet hours and a muted category: the visit is about to start.
    imminent: bool = False


APPOINTMENT: dict[str, ParamType] = {"appointment_id": "id", "start": "time"}

TEMPLATES: dict[str, Template] = {
    "appointment_booked": Template(
        "appointments",
        APPOINTMENT,
        vi=("Đã đặt lịch khám", "Lịch khám lúc {start_time} ngày {start_date} đã được xác nhận."),
        en=("Appointment booked", "Your appointment at {start_time} on {start_date} is confirmed."),
    ),
    "appointment_reminder_24h": Template(
        "appointments",
        APPOINTMENT,
        vi=("Nhắc lịch khám", "Bạn có lịch khám ngày mai lúc {start_time}."),
        en=("Appointment reminder", "You have an appointment tomorrow at {start_time}."),
    ),
    "appointment_reminder_15m": Template(
        "appointments",
        APPOINTMENT,
        vi=("Sắp đến giờ khám", "Lịch khám của bạn bắt đầu lúc {start_time}, khoảng 15 phút nữa."),
        en=("Appointment soon", "Your appointment starts at {start_time}, in about 15 minutes."),
        imminent=True,
    ),
    "appointment_cancelled": Template(
        "appointments",
        APPOINTMENT,
        vi=("Đã hủy lịch khám", "Lịch khám lúc {start_time} ngày {start_date} đã được hủy."),
        en=("Appointment cancelled", "Your appointment at {start_time} on {start_date} was cancelled."),
    ),
    "appointment_rescheduled": Template(
        "appointments",
        APPOINTMENT,
        vi=("Đã đổi lịch khám", "Lịch khám của bạn đã chuyển sang {start_time} ngày {start_date}."),
        en=("Appointment moved", "Your appointment is now at {start_time} on {start_date}."),
    ),
    "appointment_hold_expiring": Template(
        "appointments",
        {"appointment_id": "id", "expires_at": "time"},
        vi=("Sắp hết thời gian giữ chỗ", "Hãy thanh toán trước {expires_at_time} để giữ lịch khám."),
        en=("Your slot is held briefly", "Pay before {expires_at_time} to keep your appointment."),
    ),
    "waitlist_offer": Template(
        "appointments",
        {"waitlist_entry_id": "id", "appointment_id": "id", "start": "time", "expires_at": "time"},
        vi=(
            "Có lịch khám trống",
            "Lịch lúc {start_time} ngày {start_date} được giữ cho bạn đến {expires_at_time}.",
        ),
        en=(
            "A slot opened up",
            "A slot at {start_time} on {start_date} is held for you until {expires_at_time}.",
        ),
    ),
    "payment_received": Template(
        "payments",
        {"invoice_id": "id", "amount": "amount"},
        vi=("Đã nhận thanh toán", "Chúng tôi đã nhận {amount}. Cảm ơn bạn."),
        en=("Payment received", "We received {amount}. Thank you."),
    ),
    "payment_failed": Template(
        "payments",
        {"invoice_id": "id"},
        vi=("Thanh toán không thành công", "Giao dịch chưa hoàn tất. Bạn có thể thử lại trong ứng dụng."),
        en=("Payment not completed", "The payment did not go through. You can try again in the app."),
    ),
    "consultation_starting": Template(
        "consultations",
        {"consultation_id": "id", "appointment_id": "id"},
        vi=("Bác sĩ đang chờ bạn", "Bác sĩ đã mở phòng khám trực tuyến. Chạm để tham gia."),
        en=("Your doctor is ready", "The doctor has opened the video visit. Tap to join."),
        imminent=True,
    ),
    "consultation_ended": Template(
        "consultations",
        {"consultation_id": "id", "appointment_id": "id"},
        vi=("Buổi khám trực tuyến đã kết thúc", "Cảm ơn bạn đã sử dụng dịch vụ."),
        en=("Video visit ended", "Thank you for using the service."),
    ),
    "health_record_added": Template(
        "health_book",
        {"record_id": "id"},
        vi=("Sổ sức khỏe có thông tin mới", "Mở ứng dụng để xem."),
        en=("New entry in your health book", "Open the app to see it."),
    ),
}


class Rendered(msgspec.Struct, frozen=True):
    title: str
    body: str
    data: dict[str, str]
    """What the app needs to fetch the details: the kind and ids, all strings (FCM's rule)."""


def check_params(kind: str, params: Mapping[str, object]) -> dict[str, str | int]:
    """The params of `kind`, checked and made JSON-ready; ValueError names what is wrong.

    Exactly the declared params: an extra one is refused, so nobody can slip health data in.
    """
    template = TEMPLATES.get(kind)
    if template is None:
        raise ValueError(f"unknown notification kind {kind!r}")
    given, declared = set(params), set(template.params)
    if given != declared:
        raise ValueError(
            f"{kind}: params must be exactly {sorted(declared)}; "
            f"missing {sorted(declared - given)}, not allowed {sorted(given - declared)}"
        )
    checked: dict[str, str | int] = {}
    for name, param_type in template.params.items():
        value = params[name]
        if param_type == "id" and isinstance(value, uuid.UUID):
            checked[name] = str(value)
        elif param_type == "time" and isinstance(value, dt.datetime) and value.tzinfo is not None:
            checked[name] = value.isoformat()
        elif param_type == "amount" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            checked[name] = value
        else:
            raise ValueError(f"{kind}: {name} must be {_EXPECTED[param_type]}")
    return checked


_EXPECTED = {"id": "a UUID", "time": "an aware datetime", "amount": "a whole number of VND >= 0"}


def render(
    kind: str, params: Mapping[str, str | int], locale: Locale, notification_id: uuid.UUID
) -> Rendered:
    """Title, body and data payload of a stored notification, in `locale`."""
    template = TEMPLATES[kind]
    words: dict[str, str] = {}
    data = {"kind": kind, "notification_id": str(notification_id)}
    for name, param_type in template.params.items():
        value = params[name]
        if param_type == "id":
            data[name] = str(value)
        elif param_type == "time":
            moment = clinic_time(dt.datetime.fromisoformat(str(value)))
            words[f"{name}_time"] = moment.strftime("%H:%M")
            words[f"{name}_date"] = moment.strftime("%d/%m/%Y")
        else:
            words[name] = _money(int(value), locale)
    title, body = getattr(template, locale)
    return Rendered(title=title, body=body.format(**words), data=data)


def _money(amount: int, locale: Locale) -> str:
    grouped = f"{amount:,}"
    return f"{grouped.replace(',', '.')} ₫" if locale == "vi" else f"{grouped} VND"
