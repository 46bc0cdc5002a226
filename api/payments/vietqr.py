"""VietQR (NAPAS 247, EMVCo merchant-presented QR): build and read transfer payloads.

A payload is a string of TLV objects (2-digit ID, 2-digit decimal length, value) closed by a
CRC-16/CCITT-FALSE. We generate payloads strictly, every length computed from the data; we
read them leniently, because real payloads carry extra templates (e.g. an ID 26 wallet) and
sometimes slightly wrong inner lengths. The CRC is always checked: a scanned code that fails
it is damaged or tampered with.

The memo (ID 62/08) is how an incoming transfer finds its invoice, so it is short, unique
and plain ASCII: banking apps pass ASCII through untouched.
"""

from __future__ import annotations

import uuid
from decimal import Decimal, InvalidOperation
from typing import TypedDict

NAPAS_GUID = "A000000727"
SERVICE_TO_ACCOUNT = "QRIBFTTA"
CURRENCY_VND = "704"
COUNTRY_VN = "VN"
MEMO_MAX = 25
ACCOUNT_MAX = 19
AMOUNT_MAX_DIGITS = 13

# Crockford's base32: no I, L, O or U, so a memo read aloud or retyped is not misread.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MEMO_PREFIX = "TH"
_MEMO_BITS = 50  # 10 base32 characters


class VietQR(TypedDict):
    """What a payload says, plus the top-level objects as read (`templates`, ID → value)."""

    dynamic: bool
    bank_bin: str
    account: str
    service: str
    amount_vnd: int | None
    memo: str | None
    currency: str
    country: str
    templates: dict[str, str]


def crc16_ccitt_false(data: str) -> str:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection) as 4 uppercase hex digits."""
    crc = 0xFFFF
    for byte in data.encode("utf-8"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return f"{crc:04X}"


def tlv(id: str, value: str) -> str:
    """One TLV object; the length is counted from the value."""
    if len(id) != 2 or not id.isdigit():
        raise ValueError(f"TLV id must be two digits: {id!r}")
    if len(value) > 99:
        raise ValueError(f"TLV {id} value is longer than 99 characters")
    return f"{id}{len(value):02d}{value}"


def _is_printable_ascii(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text)


def build_payload(
    *,
    bank_bin: str,
    account: str,
    amount_vnd: int | None,
    memo: str | None,
    dynamic: bool,
) -> str:
    """A VietQR transfer-to-account payload; raises `ValueError` on anything a bank app would reject."""
    if len(bank_bin) != 6 or not (bank_bin.isascii() and bank_bin.isdigit()):
        raise ValueError("bank_bin must be 6 digits")
    if not 1 <= len(account) <= ACCOUNT_MAX or not (account.isascii() and account.isalnum()):
        raise ValueError(f"account must be 1 to {ACCOUNT_MAX} ASCII letters or digits")
    if amount_vnd is not None and (
        isinstance(amount_vnd, bool)
        or not isinstance(amount_vnd, int)
        or amount_vnd <= 0
        or len(str(amount_vnd)) > AMOUNT_MAX_DIGITS
    ):
        raise ValueError(f"amount_vnd must be a positive integer of at most {AMOUNT_MAX_DIGITS} digits")
    if memo is not None and (not 1 <= len(memo) <= MEMO_MAX or not _is_printable_ascii(memo)):
        raise ValueError(f"memo must be 1 to {MEMO_MAX} printable ASCII characters")

    beneficiary = tlv("00", bank_bin) + tlv("01", account)
    merchant = tlv("00", NAPAS_GUID) + tlv("01", beneficiary) + tlv("02", SERVICE_TO_ACCOUNT)
    parts = [
        tlv("00", "01"),
        tlv("01", "12" if dynamic else "11"),
        tlv("38", merchant),
        tlv("53", CURRENCY_VND),
    ]
    if amount_vnd is not None:
        parts.append(tlv("54", str(amount_vnd)))
    parts.append(tlv("58", COUNTRY_VN))
    if memo is not None:
        parts.append(tlv("62", tlv("08", memo)))
    body = "".join(parts) + "6304"
    return body + crc16_ccitt_false(body)


def _read_strict(data: str) -> dict[str, str]:
    """Top-level objects: the CRC vouches for them, so any inconsistency is an error."""
    objects: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        head = data[pos : pos + 4]
        if len(head) < 4 or not head.isdigit():
            raise ValueError(f"malformed TLV at position {pos}")
        length = int(head[2:])
        value = data[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise ValueError(f"TLV {head[:2]} runs past the end of the payload")
        objects.setdefault(head[:2], value)
        pos += 4 + length
    return objects


def _read_lenient(data: str) -> dict[str, str]:
    """Nested objects: a length running past the end is clipped, and reading stops at garbage."""
    objects: dict[str, str] = {}
    pos = 0
    while pos + 4 <= len(data):
        head = data[pos : pos + 4]
        if not head.isdigit():
            break
        length = int(head[2:])
        objects.setdefault(head[:2], data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return objects


def _amount(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"amount is not a number: {text!r}") from None
    if value != value.to_integral_value() or value <= 0:
        raise ValueError(f"amount is not a positive whole number of VND: {text!r}")
    return int(value)


def parse(payload: str) -> VietQR:
    """Read a VietQR payload; raises `ValueError` on a bad CRC or when it names no NAPAS account."""
    payload = payload.strip()
    if len(payload) < 8 or payload[-8:-4] != "6304":
        raise ValueError("payload does not end with a CRC object")
    if crc16_ccitt_false(payload[:-4]) != payload[-4:].upper():
        raise ValueError("CRC mismatch")
    objects = _read_strict(payload)
    merchant = _read_lenient(objects.get("38", ""))
    if merchant.get("00") != NAPAS_GUID:
        raise ValueError("no NAPAS (ID 38) merchant account template")
    beneficiary = _read_lenient(merchant.get("01", ""))
    bank_bin, account = beneficiary.get("00", ""), beneficiary.get("01", "")
    if not bank_bin or not account:
        raise ValueError("NAPAS template lacks the bank BIN or the account")
    additional = _read_lenient(objects.get("62", ""))
    amount = objects.get("54")
    return VietQR(
        dynamic=objects.get("01") == "12",
        bank_bin=bank_bin,
        account=account,
        service=merchant.get("02", ""),
        amount_vnd=_amount(amount) if amount is not None else None,
        memo=additional.get("08"),
        currency=objects.get("53", ""),
        country=objects.get("58", ""),
        templates=objects,
    )


def memo_for(invoice_or_attempt_id: uuid.UUID) -> str:
    """`TH` + 10 Crockford base32 characters: 12 characters, upper case, letters and digits only.

    The 50 bits come from the end of the UUID, which is random in both v4 and v7 (the start of
    a v7 is a timestamp). 50 bits make a collision negligible among open payments; a unique
    constraint on the stored memo should still have the last word.
    """
    bits = invoice_or_attempt_id.int & ((1 << _MEMO_BITS) - 1)
    chars = [_CROCKFORD[(bits >> shift) & 0x1F] for shift in range(_MEMO_BITS - 5, -1, -5)]
    return MEMO_PREFIX + "".join(chars)
