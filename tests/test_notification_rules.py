"""Notification rules without HTTP or a database: templates, quiet hours, muting, backoff."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from api.clinic_time import CLINIC_TZ
from notifications.policy import Preferences, push_decision, quiet_until, retry_delay
from notifications.templates import TEMPLATES, check_params, render

NIGHT = Preferences(quiet_start=dt.time(22, 0), quiet_end=dt.time(6, 30))


def clinic(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=CLINIC_TZ)


@pytest.mark.parametrize(
    ("now", "until"),
    [
        (clinic(1, 23), clinic(2, 6, 30)),  # before midnight: the end is tomorrow morning
        (clinic(2, 5), clinic(2, 6, 30)),  # after midnight: this morning
        (clinic(1, 22), clinic(2, 6, 30)),  # the start is quiet
        (clinic(2, 6, 30), None),  # the end is not
        (clinic(2, 12), None),
        (clinic(1, 21, 59), None),
    ],
)
def test_quiet_hours_that_wrap_midnight(now, until):
    assert quiet_until(now, dt.time(22, 0), dt.time(6, 30)) == until


def test_quiet_hours_within_a_day():
    assert quiet_until(clinic(1, 13), dt.time(12, 0), dt.time(14, 0)) == clinic(1, 14)
    assert quiet_until(clinic(1, 14), dt.time(12, 0), dt.time(14, 0)) is None


def test_quiet_hours_are_clinic_time_whatever_the_clock_zone():
    """23:30 UTC is 06:30 in Điện Biên: the quiet hours just ended."""
    utc = dt.datetime(2026, 12, 1, 23, 29, tzinfo=dt.UTC)
    assert quiet_until(utc, dt.time(22, 0), dt.time(6, 30)) == clinic(2, 6, 30)
    assert quiet_until(utc + dt.timedelta(minutes=1), dt.time(22, 0), dt.time(6, 30)) is None


def test_a_push_in_quiet_hours_is_deferred_to_their_end():
    assert push_decision(clinic(1, 23), NIGHT, TEMPLATES["appointment_reminder_24h"]) == clinic(2, 6, 30)
    assert push_decision(clinic(1, 9), NIGHT, TEMPLATES["appointment_reminder_24h"]) == "send"


def test_imminent_visits_go_out_through_quiet_hours_and_muting():
    muted = Preferences(dt.time(22, 0), dt.time(6, 30), frozenset({"appointments", "consultations"}))
    assert push_decision(clinic(1, 23), muted, TEMPLATES["appointment_reminder_15m"]) == "send"
    assert push_decision(clinic(1, 23), muted, TEMPLATES["consultation_starting"]) == "send"
    assert push_decision(clinic(1, 12), muted, TEMPLATES["appointment_booked"]) == "skip"
    assert push_decision(clinic(1, 12), muted, TEMPLATES["payment_received"]) == "send"


def test_retry_delays_grow_exponentially_with_jitter_up_to_a_cap():
    assert retry_delay(1, lambda: 1.0) == dt.timedelta(seconds=5)
    assert retry_delay(1, lambda: 0.0) == dt.timedelta(seconds=2.5)
    assert retry_delay(3, lambda: 1.0) == dt.timedelta(seconds=20)
    assert retry_delay(30, lambda: 1.0) == dt.timedelta(minutes=15)
    delays = {retry_delay(4) for _ in range(20)}
    assert len(delays) > 1, "jitter spreads workers that failed together"
    assert all(dt.timedelta(seconds=20) <= d <= dt.timedelta(seconds=40) for d in delays)


def test_every_kind_has_both_languages_and_renders():
    samples = {"id": uuid.uuid4(), "time": clinic(3, 8, 30), "amount": 150_000}
    for kind, template in TEMPLATES.items():
        params = check_params(kind, {name: samples[t] for name, t in template.params.items()})
        for locale in ("vi", "en"):
            rendered = render(kind, params, locale, uuid.uuid4())
            assert rendered.title and rendered.body and "{" not in rendered.body, (kind, locale)
            assert rendered.data["kind"] == kind
            assert all(isinstance(v, str) for v in rendered.data.values())


def test_times_are_shown_in_clinic_time_and_money_in_the_reader_s_format():
    start = dt.datetime(2026, 12, 3, 1, 30, tzinfo=dt.UTC)  # 08:30 in Điện Biên
    appointment_id = uuid.uuid4()
    params = check_params("appointment_reminder_24h", {"appointment_id": appointment_id, "start": start})
    en = render("appointment_reminder_24h", params, "en", uuid.uuid4())
    assert en.body == "You have an appointment tomorrow at 08:30."
    assert en.data["appointment_id"] == str(appointment_id)
    assert (
        render("appointment_reminder_24h", params, "vi", uuid.uuid4()).body
        == "Bạn có lịch khám ngày mai lúc 08:30."
    )
    paid = check_params("payment_received", {"invoice_id": uuid.uuid4(), "amount": 1_250_000})
    assert "1.250.000 ₫" in render("payment_received", paid, "vi", uuid.uuid4()).body
    assert "1,250,000 VND" in render("payment_received", paid, "en", uuid.uuid4()).body


@pytest.mark.parametrize(
    ("kind", "params", "complaint"),
    [
        ("no_such_kind", {}, "unknown notification kind"),
        ("payment_failed", {}, "missing ['invoice_id']"),
        ("payment_failed", {"invoice_id": uuid.uuid4(), "diagnosis": "J45"}, "not allowed ['diagnosis']"),
        ("payment_failed", {"invoice_id": "INV-1"}, "invoice_id must be a UUID"),
        ("appointment_booked", {"appointment_id": uuid.uuid4(), "start": dt.datetime(2026, 1, 1)}, "aware"),
        ("payment_received", {"invoice_id": uuid.uuid4(), "amount": -1}, "whole number"),
    ],
)
def test_params_are_only_the_declared_ids_times_and_amounts(kind, params, complaint):
    """Nothing else can ride along in a push: no free text, so no health data."""
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        check_params(kind, params)
