"""Health-insurance (BHYT) numbers: the three forms a card or ID may show."""

from __future__ import annotations

import re

from api.identity.personal_id import is_valid_personal_id

_SOCIAL_INSURANCE = re.compile(r"^\d{10}$", re.ASCII)
# Legacy card code: beneficiary group, benefit level 1–5, province, social-insurance number.
_LEGACY_CARD = re.compile(r"^[A-Z]{2}[1-5]\d{2}\d{10}$", re.ASCII)


def normalize_insurance_number(value: str) -> str:
    return re.sub(r"[\s-]", "", value).upper()


def is_valid_insurance_number(value: str) -> bool:
    """A 10-digit social-insurance number, a 15-character legacy card code, or a personal ID."""
    return bool(
        _SOCIAL_INSURANCE.fullmatch(value) or _LEGACY_CARD.fullmatch(value) or is_valid_personal_id(value)
    )
