"""Vietnamese phone numbers, stored in the national form `0xxxxxxxxx`."""

from __future__ import annotations

import re

_PHONE = re.compile(r"^(?:\+?84|0)([35789]\d{8})$", re.ASCII)


def normalize_phone(value: str) -> str | None:
    match = _PHONE.fullmatch(re.sub(r"[\s.()-]", "", value))
    return f"0{match.group(1)}" if match else None
