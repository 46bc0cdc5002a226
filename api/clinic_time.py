"""Clinic time: every facility in the province keeps Vietnam's time (+07:00, no daylight saving).

Times are stored as `timestamptz` and shown to people in clinic time.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

CLINIC_TZ = ZoneInfo("Asia/Ho_Chi_Minh")


def clinic_time(moment: dt.datetime) -> dt.datetime:
    """The same instant on the clinic's wall clock."""
    return moment.astimezone(CLINIC_TZ)
