"""The 12-digit personal identification number (số định danh cá nhân): `PPP G YY NNNNNN`.

`PPP` is the province where the birth was registered, `G = 2 × century_index + sex`
(0 male / 1 female for 1900–1999, 2/3 for 2000–2099, ...), `YY` the year within the
century. There is no check digit, so validation is structure, a known province code,
and agreement with the birth date and sex when they are known.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

Sex = Literal["male", "female"]

# The 63 provincial codes that issued numbers; they stay valid after the 2025 merger.
PROVINCE_CODES: frozenset[str] = frozenset(
    [
        "001",
        "002",
        "004",
        "006",
        "008",
        "010",
        "011",
        "012",
        "014",
        "015",
        "017",
        "019",
        "020",
        "022",
        "024",
        "025",
        "026",
        "027",
        "030",
        "031",
        "033",
        "034",
        "035",
        "036",
        "037",
        "038",
        "040",
        "042",
        "044",
        "045",
        "046",
        "048",
        "049",
        "051",
        "052",
        "054",
        "056",
        "058",
        "060",
        "062",
        "064",
        "066",
        "067",
        "068",
        "070",
        "072",
        "074",
        "075",
        "077",
        "079",
        "080",
        "082",
        "083",
        "084",
        "086",
        "087",
        "089",
        "091",
        "092",
        "093",
        "094",
        "095",
        "096",
    ]
)


def is_valid_personal_id(value: str, *, birthdate: dt.date | None = None, sex: Sex | None = None) -> bool:
    if len(value) != 12 or not value.isascii() or not value.isdigit():
        return False
    if value[:3] not in PROVINCE_CODES:
        return False
    century_sex = int(value[3])
    if birthdate is not None:
        if birth_year(value) != birthdate.year:
            return False
    elif century_sex > 5:
        return False  # 2200 and later cannot be a living person's number
    return sex is None or century_sex % 2 == (0 if sex == "male" else 1)


def birth_year(value: str) -> int:
    return 1900 + 100 * (int(value[3]) // 2) + int(value[4:6])


def sex_digit(birth_year: int, sex: Sex) -> int:
    return 2 * ((birth_year - 1900) // 100) + (0 if sex == "male" else 1)


def sex_from_personal_id(value: str, birthdate: dt.date) -> Sex | None:
    """The sex encoded in a valid personal ID (its century digit), or None when it is invalid."""
    if not is_valid_personal_id(value, birthdate=birthdate):
        return None
    return "male" if int(value[3]) % 2 == 0 else "female"


def mask_personal_id(value: str) -> str:
    """`011099012389` → `011*******89`: enough for a person to recognise, not to reuse."""
    return f"{value[:3]}{'*' * (len(value) - 5)}{value[-2:]}"
