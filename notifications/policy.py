"""When a message may be pushed: quiet hours, muted categories, and retry backoff.

Plain functions of the clock and the user's preferences, so the worker and the tests share them.
The inbox is not affected by any of this: a deferred or muted push is still in the inbox.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from typing import Literal

import msgspec

from api.clinic_time import CLINIC_TZ, clinic_time
from notifications.templates import Template

RETRY_BASE = dt.timedelta(seconds=5)
RETRY_CAP = dt.timedelta(minutes=15)


class Preferences(msgspec.Struct, frozen=True):
    quiet_start: dt.time | None = None
    quiet_end: dt.time | None = None
    muted_categories: frozenset[str] = frozenset()


def quiet_until(now: dt.datetime, start: dt.time, end: dt.time) -> dt.datetime | None:
    """The end of the quiet hours `now` falls in (clinic time), or None when it is not quiet.

    Quiet hours may wrap midnight: 22:00 to 06:30 is quiet at 23:00 and at 05:00.
    """
    local = clinic_time(now)
    time_of_day = local.time().replace(tzinfo=None)
    if start < end:
        quiet = start <= time_of_day < end
        end_day = local.date()
    else:
        quiet = time_of_day >= start or time_of_day < end
        end_day = local.date() if time_of_day < end else local.date() + dt.timedelta(days=1)
    return dt.datetime.combine(end_day, end, tzinfo=CLINIC_TZ) if quiet else None


def push_decision(
    now: dt.datetime, preferences: Preferences, template: Template
) -> Literal["send", "skip"] | dt.datetime:
    """Send now, skip the push (the category is muted), or defer it to the returned time.

    A reminder 15 minutes before a visit and the doctor opening the video room are imminent:
    they go out whatever the preferences say, since holding them back means missing the visit.
    """
    if template.imminent:
        return "send"
    if template.category in preferences.muted_categories:
        return "skip"
    if preferences.quiet_start is not None and preferences.quiet_end is not None:
        until = quiet_until(now, preferences.quiet_start, preferences.quiet_end)
        if until is not None:
            return until
    return "send"


def retry_delay(attempt: int, rng: Callable[[], float] = random.random) -> dt.timedelta:
    """Wait before attempt `attempt + 1`: exponential from 5 s, capped at 15 min, with jitter.

    The jitter (between half and all of the step) keeps workers that failed together during an
    FCM outage from all coming back in the same second.
    """
    step: dt.timedelta = min(RETRY_CAP, RETRY_BASE * 2 ** max(0, attempt - 1))
    return step * (0.5 + rng() / 2)
