"""The QR code on the chip ID card (CCCD), and matching it against a person on record.

`personal_id|old 9-digit ID (may be empty)|full name|birth date ddMMyyyy|Nam or Nữ|address|issue date ddMMyyyy`
Newer cards may add fields at the end; the old ID may be empty (../shared/reference/identity.md).
"""

from __future__ import annotations

import datetime as dt
import unicodedata

import msgspec

from api.identity.personal_id import is_valid_personal_id


class CccdQr(msgspec.Struct, frozen=True):
    personal_id: str
    full_name: str
    birthdate: dt.date
    sex: str | None


def parse_cccd_qr(text: str) -> CccdQr | None:
    """The card's fields, or None when the text is not a CCCD QR."""
    fields = text.strip().split("|")
    if len(fields) < 5:
        return None
    personal_id, _old_id, name, born, sex = (f.strip() for f in fields[:5])
    if not is_valid_personal_id(personal_id) or not name:
        return None
    try:
        birthdate = dt.datetime.strptime(born, "%d%m%Y").date()
    except ValueError:
        return None
    return CccdQr(personal_id, name, birthdate, {"nam": "male", "nữ": "female"}.get(sex.lower()))


def fold_name(name: str) -> str:
    """`Nguyễn  Văn Đức` and `NGUYEN VAN DUC` fold to the same text: cards print either form."""
    decomposed = unicodedata.normalize("NFD", name.replace("đ", "d").replace("Đ", "D"))
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(letters.upper().split())


def matches(card: CccdQr, personal_id: str, full_name: str, birthdate: dt.date) -> bool:
    """The card is this person: same personal ID, name (ignoring case and diacritics) and birth date."""
    return (
        card.personal_id == personal_id
        and fold_name(card.full_name) == fold_name(full_name)
        and card.birthdate == birthdate
    )
