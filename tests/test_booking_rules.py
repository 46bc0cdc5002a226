"""Booking rules as plain functions (no HTTP, no database): slots cut from a weekly template,
release of the booking horizon, clinic-time day edges, the appointment state machine, and the
chip ID card's QR code compared with a patient."""

from __future__ import annotations

import datetime as dt
import unicodedata
import uuid
from typing import Any

import pytest

from api.booking import states
from api.booking.slots import (
    Schedule,
    ScheduleException,
    Slot,
    WeeklyWindow,
    find_slot,
    is_open,
    last_open_day,
    slots,
)
from api.identity.cccd import CccdQr, matches, parse_cccd_qr
from tests.factories import personal_id

ICT = dt.timezone(dt.timedelta(hours=7))  # clinic time
MONDAY = dt.date(2025, 12, 1)
TUESDAY = MONDAY + dt.timedelta(days=1)


def at(day: dt.date, hhmm: str) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.fromisoformat(hhmm), tzinfo=ICT)


def window(weekday: int, start: str, end: str) -> WeeklyWindow:
    return WeeklyWindow(weekday, dt.time.fromisoformat(start), dt.time.fromisoformat(end))


def schedule(*windows: WeeklyWindow, **overrides: Any) -> Schedule:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "facility_id": uuid.uuid4(),
        "doctor_id": uuid.uuid4(),
        "service_id": uuid.uuid4(),
        "weekly": windows or (window(1, "07:30", "08:30"),),
        "duration_minutes": 15,
        "capacity": 1,
        "buffer_minutes": 0,
        "modes": frozenset({"in_person"}),
        "horizon_days": 30,
        "release_time": dt.time(7, 0),
        "valid_from": dt.date(2025, 1, 1),
        "valid_until": None,
    }
    values.update(overrides)
    return Schedule(**values)


def starts(
    s: Schedule,
    date_from: dt.date,
    date_to: dt.date | None = None,
    exceptions: list[ScheduleException] | None = None,
) -> list[str]:
    """The slots' starts as `YYYY-MM-DD HH:MM` in clinic time (each slot's end checked on the way)."""
    found = list(slots(s, exceptions or [], date_from, date_to or date_from))
    for slot in found:
        assert slot.end - slot.start == dt.timedelta(minutes=s.duration_minutes)
        assert slot.start.utcoffset() == dt.timedelta(hours=7)
    return [slot.start.strftime("%Y-%m-%d %H:%M") for slot in found]


# --- slots -------------------------------------------------------------------------------------


def test_a_window_is_cut_into_slots_of_the_service_length():
    assert starts(schedule(), MONDAY) == [
        "2025-12-01 07:30",
        "2025-12-01 07:45",
        "2025-12-01 08:00",
        "2025-12-01 08:15",
    ]


def test_a_slot_must_end_inside_its_window():
    s = schedule(window(1, "07:30", "08:20"))
    assert starts(s, MONDAY) == ["2025-12-01 07:30", "2025-12-01 07:45", "2025-12-01 08:00"]
    assert starts(schedule(window(1, "07:30", "07:40")), MONDAY) == []


def test_the_buffer_separates_slots():
    s = schedule(window(1, "07:30", "08:30"), buffer_minutes=5)
    found = list(slots(s, [], MONDAY, MONDAY))
    assert [x.start.strftime("%H:%M") for x in found] == ["07:30", "07:50", "08:10"]
    assert [x.end.strftime("%H:%M") for x in found] == ["07:45", "08:05", "08:25"]


def test_windows_of_several_days_come_out_in_order():
    s = schedule(
        window(2, "13:30", "14:00"),
        window(1, "13:30", "14:00"),
        window(1, "07:30", "08:00"),  # listed after the afternoon on purpose
    )
    assert starts(s, MONDAY, MONDAY + dt.timedelta(days=6)) == [
        "2025-12-01 07:30",
        "2025-12-01 07:45",
        "2025-12-01 13:30",
        "2025-12-01 13:45",
        "2025-12-02 13:30",
        "2025-12-02 13:45",
    ]
    # Weekdays without a window have no slots; a week later the pattern repeats.
    assert starts(s, MONDAY + dt.timedelta(days=2), MONDAY + dt.timedelta(days=6)) == []
    assert starts(s, MONDAY + dt.timedelta(days=7))[0] == "2025-12-08 07:30"


def test_a_whole_day_exception_removes_the_day_only():
    s = schedule(window(1, "07:30", "08:00"), window(2, "07:30", "08:00"))
    assert starts(s, MONDAY, TUESDAY, [ScheduleException(MONDAY)]) == ["2025-12-02 07:30", "2025-12-02 07:45"]


def test_a_part_of_day_exception_removes_the_slots_it_overlaps():
    s = schedule(window(1, "07:30", "09:00"))
    off = [ScheduleException(MONDAY, dt.time(8, 0), dt.time(8, 20))]
    # 07:45–08:00 ends as the exception begins and 08:30 starts after it ends: both kept.
    # 08:15–08:30 overlaps its last five minutes: removed.
    assert starts(s, MONDAY, exceptions=off) == [
        "2025-12-01 07:30",
        "2025-12-01 07:45",
        "2025-12-01 08:30",
        "2025-12-01 08:45",
    ]
    # The same hours on another day take nothing away.
    other_day = [ScheduleException(TUESDAY, dt.time(8, 0), dt.time(8, 20))]
    assert len(starts(s, MONDAY, exceptions=other_day)) == 6


def test_valid_from_and_valid_until_bound_the_days():
    every_day = tuple(window(d, "07:30", "07:45") for d in range(1, 8))
    s = schedule(*every_day, valid_from=TUESDAY, valid_until=MONDAY + dt.timedelta(days=3))
    assert starts(s, MONDAY - dt.timedelta(days=7), MONDAY + dt.timedelta(days=14)) == [
        "2025-12-02 07:30",
        "2025-12-03 07:30",
        "2025-12-04 07:30",
    ]
    open_ended = schedule(*every_day, valid_from=TUESDAY)
    assert len(starts(open_ended, MONDAY, MONDAY + dt.timedelta(days=9))) == 9


# --- release of the horizon --------------------------------------------------------------------


def test_last_open_day_moves_at_the_release_time_in_clinic_time():
    s = schedule()  # 30 days, released at 07:00
    assert last_open_day(s, at(MONDAY, "06:59")) == dt.date(2025, 12, 30)
    assert last_open_day(s, at(MONDAY, "07:00")) == dt.date(2025, 12, 31)
    # The same instants given in UTC: 23:59 UTC is already 06:59 of the next clinic day.
    assert last_open_day(s, dt.datetime(2025, 11, 30, 23, 59, tzinfo=dt.UTC)) == dt.date(2025, 12, 30)
    assert last_open_day(s, dt.datetime(2025, 12, 1, 0, 0, tzinfo=dt.UTC)) == dt.date(2025, 12, 31)
    # Mid-afternoon UTC on 30 November is late evening on 30 November in the clinic.
    assert last_open_day(s, dt.datetime(2025, 11, 30, 16, 0, tzinfo=dt.UTC)) == dt.date(2025, 12, 30)


def test_another_release_time_and_horizon():
    s = schedule(horizon_days=7, release_time=dt.time(0, 0))
    assert last_open_day(s, at(MONDAY, "00:00")) == MONDAY + dt.timedelta(days=7)
    s = schedule(horizon_days=7, release_time=dt.time(18, 30))
    assert last_open_day(s, at(MONDAY, "18:29")) == MONDAY + dt.timedelta(days=6)
    assert last_open_day(s, at(MONDAY, "18:30")) == MONDAY + dt.timedelta(days=7)


def test_is_open_needs_a_future_released_slot():
    s = schedule(*(window(d, "07:30", "11:30") for d in range(1, 8)))
    last_day_slot = Slot(at(dt.date(2025, 12, 31), "07:30"), at(dt.date(2025, 12, 31), "07:45"))
    assert not is_open(s, last_day_slot, at(MONDAY, "06:59"))
    assert is_open(s, last_day_slot, at(MONDAY, "07:00"))
    tomorrow = Slot(at(TUESDAY, "07:30"), at(TUESDAY, "07:45"))
    assert is_open(s, tomorrow, at(MONDAY, "06:00"))
    # Past, and starting right now: not bookable.
    assert not is_open(s, tomorrow, at(TUESDAY, "07:31"))
    assert not is_open(s, tomorrow, at(TUESDAY, "07:30"))
    assert is_open(s, tomorrow, at(TUESDAY, "07:29"))


# --- finding a slot, and clinic-time day edges ---------------------------------------------------


def test_find_slot_only_finds_a_slot_start():
    s = schedule()
    found = find_slot(s, [], at(MONDAY, "07:45"))
    assert found == Slot(at(MONDAY, "07:45"), at(MONDAY, "08:00"))
    assert find_slot(s, [], at(MONDAY, "07:50")) is None  # off the grid
    assert find_slot(s, [], at(MONDAY, "08:30")) is None  # the window's end is no start
    assert find_slot(s, [], at(TUESDAY, "07:45")) is None  # no window on Tuesday
    assert find_slot(s, [ScheduleException(MONDAY)], at(MONDAY, "07:45")) is None
    # The same instant in UTC is the same slot.
    assert find_slot(s, [], dt.datetime(2025, 12, 1, 0, 45, tzinfo=dt.UTC)) == found


def test_a_late_evening_slot_belongs_to_its_clinic_day():
    """23:30 in the clinic is 16:30 UTC the same day; 00:30 in the clinic is 17:30 UTC the day before."""
    s = schedule(window(1, "23:30", "23:50"), window(2, "00:30", "00:50"), duration_minutes=20)
    assert starts(s, MONDAY) == ["2025-12-01 23:30"]
    assert starts(s, TUESDAY) == ["2025-12-02 00:30"]

    late = dt.datetime(2025, 12, 1, 16, 30, tzinfo=dt.UTC)
    assert find_slot(s, [], late) == Slot(at(MONDAY, "23:30"), at(MONDAY, "23:50"))

    early = dt.datetime(2025, 12, 1, 17, 30, tzinfo=dt.UTC)  # UTC says Monday, the clinic says Tuesday
    assert early.date() == MONDAY
    assert find_slot(s, [], early) == Slot(at(TUESDAY, "00:30"), at(TUESDAY, "00:50"))
    # An exception on the clinic day (Tuesday) removes it; one on the UTC day (Monday) does not.
    assert find_slot(s, [ScheduleException(TUESDAY)], early) is None
    assert find_slot(s, [ScheduleException(MONDAY, dt.time(0, 0), dt.time(1, 0))], early) is not None


def test_release_counts_days_in_clinic_time_at_the_edges():
    every_day = tuple(window(d, "00:00", "00:30") for d in range(1, 8))
    s = schedule(*every_day, horizon_days=1)
    # 00:00 on Wednesday in the clinic is 17:00 UTC on Tuesday.
    wednesday_midnight = Slot(
        at(MONDAY + dt.timedelta(days=2), "00:00"), at(MONDAY + dt.timedelta(days=2), "00:15")
    )
    assert not is_open(s, wednesday_midnight, dt.datetime(2025, 12, 1, 23, 59, tzinfo=dt.UTC))  # 06:59 Tue
    assert is_open(s, wednesday_midnight, dt.datetime(2025, 12, 2, 0, 0, tzinfo=dt.UTC))  # 07:00 Tue


# --- the state machine ---------------------------------------------------------------------------

ALLOWED = [
    ("held", "booked"),
    ("held", "expired"),
    ("held", "cancelled"),
    ("booked", "checked_in"),
    ("booked", "cancelled"),
    ("booked", "no_show"),
    ("checked_in", "completed"),
]
ALL_STATES = ["held", "booked", "checked_in", "completed", "expired", "cancelled", "no_show"]


@pytest.mark.parametrize(("current", "target"), ALLOWED)
def test_allowed_transitions(current, target):
    assert states.can_move(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [(c, t) for c in ALL_STATES for t in ALL_STATES if (c, t) not in ALLOWED],
)
def test_every_other_transition_is_refused(current, target):
    assert not states.can_move(current, target)


def test_unknown_states_move_nowhere():
    assert not states.can_move("paid", "booked")
    assert not states.can_move("booked", "paid")
    assert states.sources("paid") == []


def test_sources_name_every_state_a_target_is_reached_from():
    assert states.sources("booked") == ["held"]
    assert states.sources("cancelled") == ["booked", "held"]
    assert states.sources("checked_in") == ["booked"]
    assert states.sources("completed") == ["checked_in"]
    assert states.sources("no_show") == ["booked"]
    assert states.sources("expired") == ["held"]
    assert states.sources("held") == []
    for target in ALL_STATES:
        assert states.sources(target) == sorted(c for c, t in ALLOWED if t == target)


def test_final_states_and_the_states_that_keep_a_slot():
    assert {s for s in ALL_STATES if not states.TRANSITIONS[s]} == {
        "completed",
        "expired",
        "cancelled",
        "no_show",
    }
    assert set(states.TRANSITIONS) == set(ALL_STATES)
    # The same list as the exclusion constraint in migrations/0003_booking.sql.
    assert set(states.HOLDS_SLOT) == {"held", "booked", "checked_in", "completed"}


# --- the chip ID card's QR code ------------------------------------------------------------------

PID = personal_id(born=1985, sex="male", province="011")


def qr(*fields: str) -> str:
    return "|".join(fields)


def test_parse_a_card():
    card = parse_cccd_qr(
        qr(PID, "040123456", "NGUYỄN VĂN ĐỨC", "14031985", "Nam", "Tổ 5, Mường Thanh", "15042021")
    )
    assert card == CccdQr(PID, "NGUYỄN VĂN ĐỨC", dt.date(1985, 3, 14), "male")


def test_the_old_id_may_be_empty_and_newer_cards_add_fields():
    card = parse_cccd_qr(qr(PID, "", "Lò Thị Na", "01062018", "Nữ", "Bản Noong Bua", "15042021", "X", "Y"))
    assert card == CccdQr(PID, "Lò Thị Na", dt.date(2018, 6, 1), "female")
    # Whitespace around the text or the fields does not matter; neither does the sex word's case.
    card = parse_cccd_qr(f"  {PID} | |  Lò Thị Na |01062018| NỮ |addr|15042021\n")
    assert card == CccdQr(PID, "Lò Thị Na", dt.date(2018, 6, 1), "female")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a card",
        qr(PID, "", "NGUYEN VAN DUC", "14031985"),  # too few fields
        qr(PID, "", "NGUYEN VAN DUC", "31021985", "Nam", "addr", "15042021"),  # 31 February
        qr(PID, "", "NGUYEN VAN DUC", "1985-03-14", "Nam", "addr", "15042021"),  # not ddMMyyyy
        qr(PID, "", "NGUYEN VAN DUC", "", "Nam", "addr", "15042021"),
        qr(PID[:-1], "", "NGUYEN VAN DUC", "14031985", "Nam", "addr", "15042021"),  # 11 digits
        qr("999085123456", "", "NGUYEN VAN DUC", "14031985", "Nam", "addr", "15042021"),  # no province 999
        qr(PID, "", "  ", "14031985", "Nam", "addr", "15042021"),  # no name
    ],
)
def test_what_is_not_a_card(text):
    assert parse_cccd_qr(text) is None


def test_a_wrong_sex_word_leaves_the_sex_unknown():
    """Sex is not compared at check-in, so a card with an unexpected word still reads."""
    card = parse_cccd_qr(qr(PID, "", "NGUYEN VAN DUC", "14031985", "Male", "addr", "15042021"))
    assert card is not None
    assert card.sex is None
    assert (card.personal_id, card.birthdate) == (PID, dt.date(1985, 3, 14))


def test_a_card_matches_ignoring_case_and_diacritics():
    card = parse_cccd_qr(qr(PID, "", "NGUYEN VAN DUC", "14031985", "Nam", "addr", "15042021"))
    assert card is not None
    born = dt.date(1985, 3, 14)
    assert matches(card, PID, "Nguyễn Văn Đức", born)
    assert matches(card, PID, "nguyễn  văn   đức ", born)
    # Decomposed (NFD) text, as some keyboards and scanners produce it.
    assert matches(card, PID, unicodedata.normalize("NFD", "Nguyễn Văn Đức"), born)
    accented = parse_cccd_qr(qr(PID, "", "NGUYỄN VĂN ĐỨC", "14031985", "Nam", "addr", "15042021"))
    assert accented is not None and matches(accented, PID, "Nguyen Van Duc", born)


def test_a_card_of_someone_else_does_not_match():
    card = parse_cccd_qr(qr(PID, "", "NGUYEN VAN DUC", "14031985", "Nam", "addr", "15042021"))
    assert card is not None
    born = dt.date(1985, 3, 14)
    assert not matches(card, personal_id(born=1985), "Nguyễn Văn Đức", born)
    assert not matches(card, PID, "Nguyễn Văn Dũng", born)
    assert not matches(card, PID, "Nguyễn Đức", born)
    assert not matches(card, PID, "Nguyễn Văn Đức", dt.date(1985, 3, 15))
