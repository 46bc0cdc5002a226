"""Identity formats as plain functions: personal ID, health-insurance number, phone number.

The generators below build numbers from the rules in `reference/identity.md` on their own
(not with the module's helpers), so a wrong rule in the code cannot agree with itself here.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from api.identity.insurance import is_valid_insurance_number, normalize_insurance_number
from api.identity.personal_id import (
    PROVINCE_CODES,
    birth_year,
    is_valid_personal_id,
    mask_personal_id,
    sex_from_personal_id,
)
from api.identity.phone import normalize_phone

PROVINCES = sorted(PROVINCE_CODES)
UNKNOWN_PROVINCES = sorted(f"{n:03d}" for n in range(1000) if f"{n:03d}" not in PROVINCE_CODES)
# Digits that `str.isdigit()` accepts but that are not ASCII: Arabic-Indic, Devanagari, full-width, maths.
UNICODE_DIGITS = ["٠", "٣", "०", "५", "０", "９", "𝟎", "৪"]


def century_sex_digit(year: int, sex: str) -> int:
    """G = 2 × century index + (0 male, 1 female), century index 0 for 1900–1999."""
    return 2 * (year // 100 - 19) + (1 if sex == "female" else 0)


def build(province: str, year: int, sex: str, serial: int) -> str:
    return f"{province}{century_sex_digit(year, sex)}{year % 100:02d}{serial:06d}"


@st.composite
def people(draw: st.DrawFn) -> tuple[str, dt.date, str]:
    """A valid personal ID with the birth date and sex it encodes."""
    province = draw(st.sampled_from(PROVINCES))
    born = draw(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31)))
    sex = draw(st.sampled_from(["male", "female"]))
    serial = draw(st.integers(0, 999_999))
    return build(province, born.year, sex, serial), born, sex


def test_the_documented_example_is_valid():
    # `001099012345` is a man born in 1999 whose birth was registered in Hà Nội.
    assert is_valid_personal_id("001099012345", birthdate=dt.date(1999, 5, 1), sex="male")
    assert birth_year("001099012345") == 1999


def test_province_list_has_the_63_issuing_codes():
    assert len(PROVINCE_CODES) == 63
    assert {"001", "011", "079", "096"} <= PROVINCE_CODES  # Hà Nội, Điện Biên, TP HCM, Cà Mau
    assert not {"000", "003", "097", "100"} & PROVINCE_CODES


@given(people())
def test_valid_numbers_are_accepted_and_agree_with_birthdate_and_sex(person):
    value, born, sex = person
    assert is_valid_personal_id(value)
    assert is_valid_personal_id(value, birthdate=born)
    assert is_valid_personal_id(value, sex=sex)
    assert is_valid_personal_id(value, birthdate=born, sex=sex)
    assert birth_year(value) == born.year
    assert sex_from_personal_id(value, born) == sex


@given(people(), st.data())
def test_wrong_length_is_rejected(person, data):
    value, born, sex = person
    shorter = value[: data.draw(st.integers(0, 11))]
    longer = value + data.draw(st.text(alphabet="0123456789", min_size=1, max_size=6))
    for candidate in (shorter, longer):
        assert not is_valid_personal_id(candidate)
        assert not is_valid_personal_id(candidate, birthdate=born, sex=sex)
        assert sex_from_personal_id(candidate, born) is None


@given(
    people(),
    st.integers(0, 11),
    st.one_of(
        st.sampled_from(UNICODE_DIGITS),
        st.characters(exclude_categories=["Nd"]),  # letters, spaces, punctuation, controls
    ),
)
def test_any_non_ascii_digit_character_is_rejected(person, position, char):
    value, born, sex = person
    candidate = value[:position] + char + value[position + 1 :]
    assert len(candidate) == 12
    assert not is_valid_personal_id(candidate)
    assert not is_valid_personal_id(candidate, birthdate=born, sex=sex)
    assert sex_from_personal_id(candidate, born) is None


@pytest.mark.parametrize("digit", UNICODE_DIGITS)
def test_unicode_digits_in_an_otherwise_valid_number_are_rejected(digit):
    assert is_valid_personal_id("011099012389")
    assert not is_valid_personal_id(digit + "11099012389")
    assert not is_valid_personal_id("011099012" + digit + "89")


@given(people(), st.sampled_from(UNKNOWN_PROVINCES))
def test_unknown_province_code_is_rejected(person, province):
    value, born, sex = person
    candidate = province + value[3:]
    assert not is_valid_personal_id(candidate)
    assert not is_valid_personal_id(candidate, birthdate=born, sex=sex)


@given(people())
def test_sex_digit_of_the_other_sex_is_rejected(person):
    value, born, sex = person
    other = "female" if sex == "male" else "male"
    assert not is_valid_personal_id(value, sex=other)
    assert not is_valid_personal_id(value, birthdate=born, sex=other)
    # The same person's number with the other sex's digit does not match them either.
    flipped = value[:3] + str(century_sex_digit(born.year, other)) + value[4:]
    assert not is_valid_personal_id(flipped, birthdate=born, sex=sex)
    assert sex_from_personal_id(flipped, born) == other


@given(people(), st.integers(0, 9))
def test_century_digit_inconsistent_with_birthdate_is_rejected(person, digit):
    value, born, sex = person
    assume(digit // 2 != born.year // 100 - 19)  # a digit that names another century
    candidate = value[:3] + str(digit) + value[4:]
    assert not is_valid_personal_id(candidate, birthdate=born)
    assert not is_valid_personal_id(candidate, birthdate=born, sex=sex)
    assert sex_from_personal_id(candidate, born) is None


@given(people(), st.integers(0, 99))
def test_year_digits_inconsistent_with_birthdate_are_rejected(person, yy):
    value, born, sex = person
    assume(yy != born.year % 100)
    candidate = value[:4] + f"{yy:02d}" + value[6:]
    assert is_valid_personal_id(candidate)  # structurally fine on its own...
    assert not is_valid_personal_id(candidate, birthdate=born)  # ...but not this person's
    assert not is_valid_personal_id(candidate, birthdate=born, sex=sex)
    assert sex_from_personal_id(candidate, born) is None


@given(people(), st.integers(6, 9))
def test_century_digit_beyond_2199_is_rejected_without_a_birthdate(person, digit):
    value, _, _ = person
    assert not is_valid_personal_id(value[:3] + str(digit) + value[4:])


def test_examples_of_each_century_and_sex():
    assert sex_from_personal_id("011099012389", dt.date(1999, 1, 2)) == "male"
    assert sex_from_personal_id("011199012389", dt.date(1999, 1, 2)) == "female"
    assert sex_from_personal_id("011218012389", dt.date(2018, 6, 1)) == "male"
    assert sex_from_personal_id("011318012389", dt.date(2018, 6, 1)) == "female"
    # Right digits, wrong person: born in 1918, not 2018.
    assert sex_from_personal_id("011318012389", dt.date(1918, 6, 1)) is None
    assert sex_from_personal_id("999099012389", dt.date(1999, 1, 2)) is None


def test_mask_personal_id():
    assert mask_personal_id("011099012389") == "011*******89"


@given(people())
def test_mask_hides_the_birth_year_and_serial(person):
    value, _, _ = person
    masked = mask_personal_id(value)
    assert len(masked) == 12
    assert masked[:3] == value[:3] and masked[-2:] == value[-2:]
    assert masked[3:10] == "*******"


# Health-insurance (BHYT) numbers.


@given(st.from_regex(r"[0-9]{10}", fullmatch=True))
def test_ten_digit_social_insurance_number_is_accepted(number):
    assert is_valid_insurance_number(number)


@given(st.from_regex(r"[A-Z]{2}[1-5][0-9]{2}[0-9]{10}", fullmatch=True))
def test_legacy_fifteen_character_card_code_is_accepted(code):
    assert is_valid_insurance_number(code)


@given(people())
def test_personal_id_is_accepted_as_insurance_number(person):
    value, _, _ = person
    assert is_valid_insurance_number(value)


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("DN4011234567890", "DN4011234567890"),
        ("dn4011234567890", "DN4011234567890"),
        ("TE1 01 1234567890", "TE1011234567890"),
        ("HS-4-11-1234567890", "HS4111234567890"),
        ("0123 456 789", "0123456789"),
        ("011099012389", "011099012389"),
    ],
)
def test_typed_insurance_numbers_are_normalized_then_accepted(typed, stored):
    assert normalize_insurance_number(typed) == stored
    assert is_valid_insurance_number(normalize_insurance_number(typed))


@pytest.mark.parametrize(
    "number",
    [
        "",
        "012345678",  # 9 digits
        "01234567890",  # 11 digits
        "0123456789012",  # 13 digits
        "DN0011234567890",  # benefit level 0
        "DN6011234567890",  # benefit level 6
        "D14011234567890",  # group must be two letters
        "DN401123456789",  # 14 characters
        "DN40112345678901",  # 16 characters
        "DN4A11234567890",  # province must be digits
        "dn4011234567890",  # not normalized
        "ĐN4011234567890",  # not an ASCII letter
        "999099012345",  # 12 digits but an unknown province: not a personal ID
        "٠١٢٣٤٥٦٧٨٩",  # ten Arabic-Indic digits
        "DN4٠١1234567890",  # legacy code with Arabic-Indic digits
        "０１２３４５６７８９",  # ten full-width digits
    ],
)
def test_invalid_insurance_numbers_are_rejected(number):
    assert not is_valid_insurance_number(number)


# Phone numbers.


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("+84 912 345 678", "0912345678"),
        ("0912345678", "0912345678"),
        ("84912345678", "0912345678"),
        ("+84912345678", "0912345678"),
        ("0912.345.678", "0912345678"),
        ("(091) 234-5678", "0912345678"),
        ("0387 654 321", "0387654321"),
        ("0567654321", "0567654321"),
        ("0767654321", "0767654321"),
        ("0867654321", "0867654321"),
    ],
)
def test_phone_numbers_are_normalized_to_national_form(typed, stored):
    assert normalize_phone(typed) == stored


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "abc",
        "091234567",  # 9 digits
        "09123456789",  # 11 digits
        "0112345678",  # no mobile network starts with 01 any more
        "0212345678",  # 02 is a landline area code, not a mobile number
        "0412345678",
        "0612345678",
        "+1 912 345 678",
        "+85 912 345 678",
        "091٢345678",  # an Arabic-Indic digit
        "０９１２３４５６７８",  # full-width digits
    ],
)
def test_invalid_phone_numbers_are_rejected(typed):
    assert normalize_phone(typed) is None


@given(
    st.sampled_from("35789"), st.from_regex(r"[0-9]{8}", fullmatch=True), st.sampled_from(["0", "84", "+84"])
)
def test_every_mobile_number_has_one_stored_form(network, rest, prefix):
    assert normalize_phone(f"{prefix}{network}{rest}") == f"0{network}{rest}"
