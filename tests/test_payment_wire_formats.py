"""Provider wire formats against the published test vectors in `payments.md`, and property tests.

Pure functions only: no database, no network. Each expected signature is either a published
vector or computed inline here from the documented field order, never through the module
under test, so a wrong order in the module cannot agree with itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import string
import uuid
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.payments import bank_transfer, momo, redact, vietqr, vnpay, zalopay

UTC = dt.UTC


def _hmac256(key: str, message: str | bytes) -> str:
    data = message.encode() if isinstance(message, str) else message
    return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()


def _flip(text: str, index: int) -> str:
    """`text` with the character at `index` changed to a different one."""
    replacement = "0" if text[index] != "0" else "1"
    return text[:index] + replacement + text[index + 1 :]


# --- VNPay -------------------------------------------------------------------------------

VNP_SECRET = "test_secret"
VNP_SIGNED = (
    "vnp_Amount=1000000&vnp_BankCode=NCB&vnp_BankTranNo=VNP14422574&vnp_CardType=ATM"
    "&vnp_OrderInfo=Thanh+toan+don+hang+2024-05-21T02%3A17%3A31.249Z&vnp_PayDate=20240521091806"
    "&vnp_ResponseCode=00&vnp_TmnCode=TEST_TMN_CODE&vnp_TransactionNo=14422574"
    "&vnp_TransactionStatus=00&vnp_TxnRef=1716257871703"
)
VNP_HASH = (
    "649982421beb422556a1374713c74e58e716ecbd05007c0c0e1f7effdfaf361d"
    "bf146889ca446139afe11b9954c4d5c486e99e3b86fcfab6957f29eb0be72895"
)


def _vnp_ipn_params() -> dict[str, str]:
    """The vector's parameters as an IPN handler sees them (decoded), in a shuffled order."""
    params: dict[str, str] = {}
    for pair in reversed(VNP_SIGNED.split("&")):
        key, value = pair.split("=", 1)
        params[unquote_plus(key)] = unquote_plus(value)
    params["vnp_SecureHash"] = VNP_HASH
    return params


def test_vnpay_published_vector() -> None:
    params = _vnp_ipn_params()
    assert vnpay.signing_string(params) == VNP_SIGNED
    assert vnpay.sign(params, VNP_SECRET) == VNP_HASH
    assert vnpay.verify(params, [VNP_SECRET])


def test_vnpay_signing_string_leaves_out_hash_empty_and_foreign_parameters() -> None:
    params = _vnp_ipn_params()
    params |= {"vnp_SecureHashType": "HmacSHA512", "vnp_BankCode": "NCB", "vnp_Extra": "", "utm_source": "x"}
    assert vnpay.signing_string(params) == VNP_SIGNED
    assert vnpay.verify(params, [VNP_SECRET])


def test_vnpay_hash_case_rotation_and_missing_hash() -> None:
    params = _vnp_ipn_params()
    assert vnpay.verify({**params, "vnp_SecureHash": VNP_HASH.upper()}, [VNP_SECRET])
    assert vnpay.verify(params, ["new_secret_after_rotation", VNP_SECRET])
    assert vnpay.verify(params, [VNP_SECRET, "new_secret_after_rotation"])
    assert not vnpay.verify(params, ["new_secret_after_rotation"])
    assert not vnpay.verify(params, [])
    assert not vnpay.verify({k: v for k, v in params.items() if k != "vnp_SecureHash"}, [VNP_SECRET])
    assert not vnpay.verify({**params, "vnp_SecureHash": ""}, [VNP_SECRET])
    assert not vnpay.verify({**params, "vnp_SecureHash": "ä" * 128}, [VNP_SECRET])


def test_vnpay_one_changed_byte_anywhere_fails() -> None:
    params = _vnp_ipn_params()
    for key, value in params.items():
        for index in range(len(value)):
            assert not vnpay.verify({**params, key: _flip(value, index)}, [VNP_SECRET]), (key, index)
    # A signed parameter added or removed also breaks it.
    assert not vnpay.verify({**params, "vnp_BankCode": ""}, [VNP_SECRET])
    assert not vnpay.verify({**params, "vnp_Locale": "vn"}, [VNP_SECRET])


def test_vnpay_response_codes_table() -> None:
    assert set(vnpay.RESPONSE_CODES) == {"00", "01", "02", "04", "97", "99"}
    assert all(vnpay.RESPONSE_CODES.values())


def _pay_params(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = {
        "tmn_code": "TESTTMN1",
        "amount_vnd": 150_000,
        "txn_ref": "TH0123456789",
        "order_info": "Khám bệnh: BS. Đặng Thị Hồng #42/2024 — phí tư vấn",
        "return_url": "https://app.example.vn/v1/payments/return/vnpay?a=1&b=2",
        "ip_addr": "203.0.113.7",
        "created_at": dt.datetime(2024, 5, 21, 2, 17, 31, tzinfo=UTC),
        "expires_at": dt.datetime(2024, 5, 21, 2, 32, 31, tzinfo=UTC),
        "locale": "vn",
    }
    args.update(overrides)
    return vnpay.build_pay_params(**args)  # type: ignore[arg-type]


def test_vnpay_pay_params() -> None:
    params = _pay_params()
    assert params == {
        "vnp_Version": "2.1.0",
        "vnp_Command": "pay",
        "vnp_TmnCode": "TESTTMN1",
        "vnp_Amount": "15000000",
        "vnp_CreateDate": "20240521091731",
        "vnp_ExpireDate": "20240521093231",
        "vnp_CurrCode": "VND",
        "vnp_IpAddr": "203.0.113.7",
        "vnp_Locale": "vn",
        "vnp_OrderInfo": "Kham benh BS Dang Thi Hong 42 2024 phi tu van",
        "vnp_OrderType": "other",
        "vnp_ReturnUrl": "https://app.example.vn/v1/payments/return/vnpay?a=1&b=2",
        "vnp_TxnRef": "TH0123456789",
    }
    assert _pay_params(bank_code="VNBANK")["vnp_BankCode"] == "VNBANK"
    # The same instant given in another zone gives the same GMT+7 wall clock.
    hanoi = dt.timezone(dt.timedelta(hours=7))
    assert _pay_params(created_at=dt.datetime(2024, 5, 21, 9, 17, 31, tzinfo=hanoi)) == params


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount_vnd": 0},
        {"amount_vnd": -5},
        {"amount_vnd": True},
        {"locale": "vi"},
        {"order_info": "—:/!"},
        {"created_at": dt.datetime(2024, 5, 21, 2, 17, 31)},
        {"expires_at": dt.datetime(2024, 5, 21, 2, 0, 0, tzinfo=UTC)},
    ],
)
def test_vnpay_pay_params_refuse_bad_input(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _pay_params(**overrides)


def test_vnpay_pay_url_has_every_parameter_and_verifies() -> None:
    params = _pay_params()
    url = vnpay.pay_url("https://sandbox.vnpayment.vn/paymentv2/vpcpay.html", params, VNP_SECRET)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "sandbox.vnpayment.vn",
        "/paymentv2/vpcpay.html",
    )
    received = dict(parse_qsl(parts.query, strict_parsing=True))
    required = {
        "vnp_Version",
        "vnp_Command",
        "vnp_TmnCode",
        "vnp_Amount",
        "vnp_CreateDate",
        "vnp_CurrCode",
        "vnp_IpAddr",
        "vnp_Locale",
        "vnp_OrderInfo",
        "vnp_OrderType",
        "vnp_ReturnUrl",
        "vnp_TxnRef",
        "vnp_SecureHash",
    }
    assert required <= received.keys()
    assert "vnp_SecureHashType" not in received
    assert {k: v for k, v in received.items() if k != "vnp_SecureHash"} == params
    assert vnpay.verify(received, [VNP_SECRET])
    assert parts.query == vnpay.signing_string(params) + "&vnp_SecureHash=" + vnpay.sign(params, VNP_SECRET)
    with pytest.raises(ValueError):
        vnpay.pay_url("https://sandbox.vnpayment.vn/pay?x=1", params, VNP_SECRET)


_NO_SURROGATES = st.characters(exclude_categories=["Cs"])  # lone surrogates cannot be encoded at all
_VNP_KEYS = st.from_regex(r"vnp_[A-Za-z]{1,12}", fullmatch=True).filter(
    lambda key: key not in {"vnp_SecureHash", "vnp_SecureHashType"}
)
# Any text but lone surrogates (which are not encodable): spaces, `:`, `/`, `&`, `=`, `+`, Vietnamese…
_VALUES = st.one_of(
    st.text(alphabet=_NO_SURROGATES, min_size=1, max_size=40),
    st.sampled_from(
        ["Thanh toán đơn hàng 2024-05-21T02:17:31.249Z", "https://x.vn/a b?c=d&e=f", "Đặng Thị Hồng"]
    ),
)
_SECRETS = st.text(alphabet=_NO_SURROGATES, min_size=1, max_size=64)


@settings(max_examples=200)
@given(params=st.dictionaries(_VNP_KEYS, _VALUES, min_size=1, max_size=8), secret=_SECRETS)
def test_vnpay_sign_verify_round_trip(params: dict[str, str], secret: str) -> None:
    signed = {**params, "vnp_SecureHash": vnpay.sign(params, secret)}
    assert vnpay.verify(signed, [secret])
    # Through a real URL and back, as the browser and the IPN call carry it.
    url = vnpay.pay_url("https://sandbox.vnpayment.vn/paymentv2/vpcpay.html", params, secret)
    received = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True, strict_parsing=True))
    assert received == signed
    assert vnpay.verify(received, [secret])
    key = sorted(params)[0]
    assert not vnpay.verify({**signed, key: params[key] + "x"}, [secret])


# --- MoMo --------------------------------------------------------------------------------

MOMO_PARTNER = "MOMO"
MOMO_ACCESS = "F8BBA842ECF85"
MOMO_SECRET = "K951B6PE1waDMi640xX08PD3vg6EkVlz"


def test_momo_field_orders_are_the_documented_ones() -> None:
    create = "accessKey=..&amount=..&extraData=..&ipnUrl=..&orderId=..&orderInfo=..&partnerCode=..&redirectUrl=..&requestId=..&requestType=.."
    ipn = "accessKey=..&amount=..&extraData=..&message=..&orderId=..&orderInfo=..&orderType=..&partnerCode=..&payType=..&requestId=..&responseTime=..&resultCode=..&transId=.."
    assert tuple(pair.split("=")[0] for pair in create.split("&")) == momo.CREATE_FIELDS
    assert tuple(pair.split("=")[0] for pair in ipn.split("&")) == momo.IPN_FIELDS


def test_momo_create_body_and_signature() -> None:
    body = momo.build_create_body(
        partner_code=MOMO_PARTNER,
        access_key=MOMO_ACCESS,
        secret_key=MOMO_SECRET,
        request_id="REQ-7f3a",
        amount=150_000,
        order_id="TH0123456789",
        order_info="Thanh toán khám bệnh",
        redirect_url="https://app.example.vn/return/momo",
        ipn_url="https://api.example.vn/v1/payments/callbacks/momo",
    )
    expected = _hmac256(
        MOMO_SECRET,
        "accessKey=F8BBA842ECF85&amount=150000&extraData=&ipnUrl=https://api.example.vn/v1/payments/callbacks/momo"
        "&orderId=TH0123456789&orderInfo=Thanh toán khám bệnh&partnerCode=MOMO"
        "&redirectUrl=https://app.example.vn/return/momo&requestId=REQ-7f3a&requestType=captureWallet",
    )
    assert body == {
        "partnerCode": "MOMO",
        "requestId": "REQ-7f3a",
        "amount": 150_000,
        "orderId": "TH0123456789",
        "orderInfo": "Thanh toán khám bệnh",
        "redirectUrl": "https://app.example.vn/return/momo",
        "ipnUrl": "https://api.example.vn/v1/payments/callbacks/momo",
        "requestType": "captureWallet",
        "extraData": "",
        "lang": "vi",
        "signature": expected,
    }
    assert "accessKey" not in body
    fields = {k: v for k, v in body.items() if k not in {"signature", "lang"}}
    assert momo.create_signature(fields, MOMO_ACCESS, MOMO_SECRET) == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount": 999},
        {"amount": 50_000_001},
        {"amount": True},
        {"request_type": "payWithCC"},
        {"lang": "fr"},
    ],
)
def test_momo_create_body_refuses_bad_input(overrides: dict[str, object]) -> None:
    args: dict[str, object] = {
        "partner_code": MOMO_PARTNER,
        "access_key": MOMO_ACCESS,
        "secret_key": MOMO_SECRET,
        "request_id": "r",
        "amount": 10_000,
        "order_id": "o",
        "order_info": "i",
        "redirect_url": "https://a",
        "ipn_url": "https://b",
    } | overrides
    with pytest.raises(ValueError):
        momo.build_create_body(**args)  # type: ignore[arg-type]


def _momo_ipn() -> dict[str, object]:
    body: dict[str, object] = {
        "partnerCode": "MOMO",
        "orderId": "TH0123456789",
        "requestId": "REQ-7f3a",
        "amount": 150000,
        "orderInfo": "Thanh toán khám bệnh",
        "orderType": "momo_wallet",
        "transId": 4088878653,
        "resultCode": 0,
        "message": "Thành công.",
        "payType": "qr",
        "responseTime": 1721720663942,
        "extraData": "",
    }
    body["signature"] = _hmac256(
        MOMO_SECRET,
        "accessKey=F8BBA842ECF85&amount=150000&extraData=&message=Thành công.&orderId=TH0123456789"
        "&orderInfo=Thanh toán khám bệnh&orderType=momo_wallet&partnerCode=MOMO&payType=qr"
        "&requestId=REQ-7f3a&responseTime=1721720663942&resultCode=0&transId=4088878653",
    )
    return body


def test_momo_ipn_signature_and_verify() -> None:
    body = _momo_ipn()
    fields = {k: v for k, v in body.items() if k != "signature"}
    assert momo.ipn_signature(fields, MOMO_ACCESS, MOMO_SECRET) == body["signature"]  # type: ignore[arg-type]
    assert momo.verify_ipn(body, MOMO_ACCESS, [MOMO_SECRET])
    # As decoded from the wire: the same JSON text gives the same answer.
    assert momo.verify_ipn(json.loads(json.dumps(body, ensure_ascii=False)), MOMO_ACCESS, [MOMO_SECRET])
    assert momo.verify_ipn({**body, "signature": str(body["signature"]).upper()}, MOMO_ACCESS, [MOMO_SECRET])
    assert momo.verify_ipn(body, MOMO_ACCESS, ["rotated-new-secret", MOMO_SECRET])
    assert not momo.verify_ipn(body, MOMO_ACCESS, ["rotated-new-secret"])
    assert not momo.verify_ipn(body, MOMO_ACCESS, [])
    assert not momo.verify_ipn(body, "WRONGACCESS", [MOMO_SECRET])


def test_momo_ipn_one_changed_byte_or_missing_field_fails() -> None:
    body = _momo_ipn()
    for key, value in body.items():
        text = str(value)
        for index in range(len(text)):
            changed: object = _flip(text, index)
            if isinstance(value, int):
                changed = int(str(changed))
            assert not momo.verify_ipn({**body, key: changed}, MOMO_ACCESS, [MOMO_SECRET]), (key, index)
        assert not momo.verify_ipn({k: v for k, v in body.items() if k != key}, MOMO_ACCESS, [MOMO_SECRET])
    # Values MoMo never signs in those shapes do not verify either.
    assert not momo.verify_ipn({**body, "amount": 150000.0}, MOMO_ACCESS, [MOMO_SECRET])
    assert not momo.verify_ipn({**body, "extraData": None}, MOMO_ACCESS, [MOMO_SECRET])
    assert not momo.verify_ipn({**body, "signature": None}, MOMO_ACCESS, [MOMO_SECRET])


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (0, "paid"),
        (9000, "paid"),
        (1000, "pending"),
        (7000, "pending"),
        (7002, "pending"),
        (8000, "pending"),
        (1001, "failed"),
        (1003, "failed"),
        (1005, "failed"),
        (1006, "failed"),
        (1017, "failed"),
        (4001, "failed"),
        (10, "failed"),
        (41, "failed"),
        (99, "failed"),
        (-1, "failed"),
    ],
)
def test_momo_result_kind(code: int, kind: str) -> None:
    assert momo.result_kind(code) == kind


# --- ZaloPay -----------------------------------------------------------------------------

ZP_KEY2 = "kLtgPl8HHhfvMuDHPwKfgfsY4Ydm9eIz"


def test_zalopay_published_mac_vector() -> None:
    mac = zalopay.create_mac(
        553, "200904_000234", "user123", 10000, 1599202366026, "{}", "[]", "9phuAOYhan4urywHTh0ndEXiV3pKHr5Q"
    )
    assert mac == "7e95836a9feace32458f23416feea423172ef0a098f27a668a1e10788b5a6838"


def test_zalopay_create_body() -> None:
    key1 = "PcY4iZIKFCIdgZvA6ueMcMHHUbRLYjPL"
    embed = '{"redirecturl":"https://app.example.vn/return/zalopay"}'
    body = zalopay.build_create_body(
        app_id=2553,
        app_user="patient-42",
        app_trans_id="250101_TH0123456789",
        app_time=1735689600000,
        amount=150_000,
        description="Thanh toán khám bệnh",
        callback_url="https://api.example.vn/v1/payments/callbacks/zalopay",
        key1=key1,
        embed_data=embed,
    )
    assert body["mac"] == _hmac256(
        key1, f"2553|250101_TH0123456789|patient-42|150000|1735689600000|{embed}|[]"
    )
    assert body["item"] == "[]"
    assert body["embed_data"] == embed
    assert body["amount"] == 150_000
    with pytest.raises(ValueError):
        zalopay.build_create_body(
            app_id=2553,
            app_user="patient-42",
            app_trans_id="250101_TH0123456789",
            app_time=1735689600000,
            amount=0,
            description="d",
            callback_url="https://a",
            key1=key1,
        )


def test_zalopay_callback_mac_over_raw_data() -> None:
    data = (
        '{"app_id":2553,"app_trans_id":"250101_TH0123456789","app_time":1735689600000,'
        '"app_user":"patient-42","amount":150000,"embed_data":"{}","item":"[]",'
        '"zp_trans_id":250101000000123,"server_time":1735689660000,"channel":38,'
        '"merchant_user_id":"abc","user_fee_amount":0,"discount_amount":0}'
    )
    mac = _hmac256(ZP_KEY2, data)
    assert zalopay.verify_callback(data, mac, [ZP_KEY2])
    assert zalopay.verify_callback(data, mac.upper(), [ZP_KEY2])
    assert zalopay.verify_callback(data, mac, ["rotated-new-key2", ZP_KEY2])
    assert not zalopay.verify_callback(data, mac, ["rotated-new-key2"])
    assert not zalopay.verify_callback(data, mac, [])
    assert not zalopay.verify_callback(data, "", [ZP_KEY2])
    # Re-serializing the parsed data changes the bytes, so it must not be what is checked.
    assert not zalopay.verify_callback(json.dumps(json.loads(data)), mac, [ZP_KEY2])
    for index in range(len(data)):
        assert not zalopay.verify_callback(_flip(data, index), mac, [ZP_KEY2]), index
    for index in range(len(mac)):
        assert not zalopay.verify_callback(data, _flip(mac, index), [ZP_KEY2]), index


def test_zalopay_app_trans_id_uses_the_gmt7_date() -> None:
    assert zalopay.app_trans_id(dt.datetime(2024, 12, 31, 16, 59, tzinfo=UTC), "TH001") == "241231_TH001"
    assert zalopay.app_trans_id(dt.datetime(2024, 12, 31, 17, 0, tzinfo=UTC), "TH001") == "250101_TH001"
    with pytest.raises(ValueError):
        zalopay.app_trans_id(dt.datetime(2025, 1, 1), "TH001")
    with pytest.raises(ValueError):
        zalopay.app_trans_id(dt.datetime(2025, 1, 1, tzinfo=UTC), "")
    with pytest.raises(ValueError):
        zalopay.app_trans_id(dt.datetime(2025, 1, 1, tzinfo=UTC), "x" * 40)


# --- VietQR ------------------------------------------------------------------------------

TPBANK_STATIC = "00020101021138540010A00000072701240006970423011000999999990208QRIBFTTA53037045802VN6304CBB4"


def _with_crc(body_without_crc: str) -> str:
    body = body_without_crc + "6304"
    return body + vietqr.crc16_ccitt_false(body)


def test_vietqr_crc_vector() -> None:
    assert vietqr.crc16_ccitt_false("123456789") == "29B1"
    assert vietqr.crc16_ccitt_false(TPBANK_STATIC[:-4]) == "CBB4"


def test_vietqr_tlv() -> None:
    assert vietqr.tlv("58", "VN") == "5802VN"
    assert vietqr.tlv("62", "x" * 99) == "6299" + "x" * 99
    with pytest.raises(ValueError):
        vietqr.tlv("62", "x" * 100)
    with pytest.raises(ValueError):
        vietqr.tlv("6", "x")


def test_vietqr_tpbank_example_round_trip() -> None:
    built = vietqr.build_payload(
        bank_bin="970423", account="0099999999", amount_vnd=None, memo=None, dynamic=False
    )
    assert built == TPBANK_STATIC
    parsed = vietqr.parse(TPBANK_STATIC)
    assert parsed["dynamic"] is False
    assert parsed["bank_bin"] == "970423"
    assert parsed["account"] == "0099999999"
    assert parsed["service"] == "QRIBFTTA"
    assert parsed["amount_vnd"] is None
    assert parsed["memo"] is None
    assert (parsed["currency"], parsed["country"]) == ("704", "VN")
    assert parsed["templates"]["63"] == "CBB4"


def test_vietqr_dynamic_payload_with_amount_and_memo() -> None:
    memo = vietqr.memo_for(uuid.UUID("6f1c2b0e-8d3a-4c55-9e21-0b7a4f3d9c11"))
    payload = vietqr.build_payload(
        bank_bin="970436", account="1012345678", amount_vnd=150_000, memo=memo, dynamic=True
    )
    assert payload.startswith("000201010212")
    assert "5406150000" in payload
    assert f"62{len(memo) + 4:02d}08{len(memo):02d}{memo}" in payload
    assert vietqr.crc16_ccitt_false(payload[:-4]) == payload[-4:]
    parsed = vietqr.parse(payload)
    assert (parsed["dynamic"], parsed["bank_bin"], parsed["account"]) == (True, "970436", "1012345678")
    assert (parsed["amount_vnd"], parsed["memo"]) == (150_000, memo)


def test_vietqr_parse_checks_the_crc() -> None:
    with pytest.raises(ValueError, match="CRC"):
        vietqr.parse(TPBANK_STATIC[:-4] + "0000")
    for index in range(len(TPBANK_STATIC) - 8):
        with pytest.raises(ValueError):
            vietqr.parse(_flip(TPBANK_STATIC, index))
    with pytest.raises(ValueError):
        vietqr.parse(TPBANK_STATIC[:-8])
    # A lower-case CRC from a sloppy generator is still the same CRC.
    assert vietqr.parse(TPBANK_STATIC[:-4] + "cbb4")["account"] == "0099999999"


def test_vietqr_parse_tolerates_extra_templates_and_loose_inner_lengths() -> None:
    wallet = vietqr.tlv("26", vietqr.tlv("00", "A000000775") + vietqr.tlv("01", "0123456789"))
    merchant = TPBANK_STATIC[:12] + wallet + TPBANK_STATIC[12:-8]
    parsed = vietqr.parse(_with_crc(merchant + "5204599962070803***"))
    assert (parsed["bank_bin"], parsed["account"]) == ("970423", "0099999999")
    assert "26" in parsed["templates"]
    # An inner account length one too long (a real-world generator bug) is clipped to the template.
    loose = "38540010A0000007270124" + "0006970423" + "0111" + "0099999999" + "0208QRIBFTTA"
    loose_payload = _with_crc("000201010211" + loose + "53037045802VN")
    assert vietqr.parse(loose_payload)["account"] == "0099999999"


def test_vietqr_parse_refuses_payloads_without_a_napas_account() -> None:
    with pytest.raises(ValueError):
        vietqr.parse(_with_crc("000201010211" + "5303704" + "5802VN"))
    with pytest.raises(ValueError):
        vietqr.parse(_with_crc("000201010211" + vietqr.tlv("38", vietqr.tlv("00", "A000000727")) + "5802VN"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"bank_bin": "97042"},
        {"bank_bin": "97042x"},
        {"account": ""},
        {"account": "0" * 20},
        {"account": "0099-9999"},
        {"amount_vnd": 0},
        {"amount_vnd": 10**13},
        {"memo": ""},
        {"memo": "x" * 26},
        {"memo": "Thanh toán"},
        {"memo": "line\nbreak"},
    ],
)
def test_vietqr_build_refuses_bad_input(overrides: dict[str, object]) -> None:
    args: dict[str, object] = {
        "bank_bin": "970423",
        "account": "0099999999",
        "amount_vnd": 1000,
        "memo": "TH1",
        "dynamic": True,
    } | overrides
    with pytest.raises(ValueError):
        vietqr.build_payload(**args)  # type: ignore[arg-type]


def test_vietqr_memo_is_short_unique_unambiguous_ascii() -> None:
    memos = {vietqr.memo_for(uuid.uuid4()) for _ in range(10_000)}
    assert len(memos) == 10_000
    for memo in memos:
        assert memo.isascii() and len(memo) <= vietqr.MEMO_MAX
        assert memo.startswith("TH") and len(memo) == 12
        assert set(memo[2:]) <= set(string.digits + string.ascii_uppercase) - set("ILOU")
    fixed = uuid.UUID("6f1c2b0e-8d3a-4c55-9e21-0b7a4f3d9c11")
    assert vietqr.memo_for(fixed) == vietqr.memo_for(uuid.UUID(str(fixed)))
    # Time-ordered ids (UUIDv7) share their first 48 bits; their memos still differ.
    same_millisecond = {
        vietqr.memo_for(uuid.UUID(int=(0x0190F1E2D3C4 << 80) | n * 0x9E3779B97F4A7C15)) for n in range(1000)
    }
    assert len(same_millisecond) == 1000


_MEMOS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=25)


@settings(max_examples=300)
@given(
    bank_bin=st.from_regex(r"[0-9]{6}", fullmatch=True),
    account=st.from_regex(r"[0-9A-Za-z]{1,19}", fullmatch=True),
    amount=st.none() | st.integers(min_value=1, max_value=10**13 - 1),
    memo=st.none() | _MEMOS,
    dynamic=st.booleans(),
)
def test_vietqr_build_parse_round_trip(
    bank_bin: str, account: str, amount: int | None, memo: str | None, dynamic: bool
) -> None:
    payload = vietqr.build_payload(
        bank_bin=bank_bin, account=account, amount_vnd=amount, memo=memo, dynamic=dynamic
    )
    assert payload.isascii()
    parsed = vietqr.parse(payload)
    assert parsed["bank_bin"] == bank_bin
    assert parsed["account"] == account
    assert parsed["amount_vnd"] == amount
    assert parsed["memo"] == memo
    assert parsed["dynamic"] is dynamic
    assert parsed["service"] == "QRIBFTTA"


# --- Bank-transfer notices -----------------------------------------------------------------


def test_bank_transfer_signature() -> None:
    raw = b'{"reference":"FT24142ABC","account":"1012345678","amount":150000,"memo":"MBVCB.123.TH0123456789.CT","received_at":"2024-05-21T09:18:06+07:00"}'
    header = _hmac256("bank-secret", raw)
    assert bank_transfer.verify_signature(raw, header, ["bank-secret"])
    assert bank_transfer.verify_signature(raw, header.upper(), ["bank-secret"])
    assert bank_transfer.verify_signature(raw, header, ["rotated", "bank-secret"])
    assert not bank_transfer.verify_signature(raw, header, ["rotated"])
    assert not bank_transfer.verify_signature(raw, None, ["bank-secret"])
    assert not bank_transfer.verify_signature(raw, "", ["bank-secret"])
    assert not bank_transfer.verify_signature(raw, header, [])
    for index in range(len(raw)):
        changed = raw[:index] + bytes([raw[index] ^ 0x01]) + raw[index + 1 :]
        assert not bank_transfer.verify_signature(changed, header, ["bank-secret"]), index
    for index in range(len(header)):
        assert not bank_transfer.verify_signature(raw, _flip(header, index), ["bank-secret"]), index


def test_bank_transfer_notice_shape() -> None:
    raw = b'{"reference":"FT24142ABC","account":"1012345678","amount":150000,"memo":"TH0123456789","received_at":"2024-05-21T09:18:06+07:00","bank_extra":{"channel":"NAPAS"}}'
    notice = msgspec.json.decode(raw, type=bank_transfer.BankTransferNotice)
    assert notice.amount == 150_000
    assert notice.received_at == dt.datetime(2024, 5, 21, 2, 18, 6, tzinfo=UTC)
    for bad in (
        b'{"reference":"r","account":"a","amount":0,"memo":"m","received_at":"2024-05-21T09:18:06+07:00"}',
        b'{"reference":"","account":"a","amount":1,"memo":"m","received_at":"2024-05-21T09:18:06+07:00"}',
        b'{"reference":"r","account":"a","amount":1,"memo":"m","received_at":"2024-05-21T09:18:06"}',
        b'{"reference":"r","account":"a","amount":"1","memo":"m","received_at":"2024-05-21T09:18:06Z"}',
        b'{"reference":"r","account":"a","memo":"m","received_at":"2024-05-21T09:18:06Z"}',
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(bad, type=bank_transfer.BankTransferNotice)


# --- Redaction -----------------------------------------------------------------------------


def test_redact_callbacks() -> None:
    r = redact.REDACTED
    vnp = {
        "vnp_TxnRef": "TH1",
        "vnp_Amount": "1000000",
        "vnp_SecureHash": VNP_HASH,
        "vnp_SecureHashType": "SHA512",
    }
    assert redact.redact_callback("vnpay", vnp) == {**vnp, "vnp_SecureHash": r, "vnp_SecureHashType": r}
    body = _momo_ipn()
    assert redact.redact_callback("momo", body) == {**body, "signature": r}
    assert body["signature"] != r  # the input is not touched
    zp = {"data": '{"app_id":2553}', "mac": "abc", "type": 1}
    assert redact.redact_callback("zalopay", zp) == {**zp, "mac": r}
    odd = {
        "accessKey": "F8BBA842ECF85",
        "secretKey": "s",
        "key1": "k",
        "api_key": "k",
        "X-Signature": "s",
        "zp_trans_token": "t",
        "nested": [{"hmac": "h", "amount": 1}, {"SECRETKEY": "s"}],
        "monkey": "kept",
        "machine": "kept",
        "orderInfo": "kept",
    }
    assert redact.redact_callback("someone-new", odd) == {
        "accessKey": r,
        "secretKey": r,
        "key1": r,
        "api_key": r,
        "X-Signature": r,
        "zp_trans_token": r,
        "nested": [{"hmac": r, "amount": 1}, {"SECRETKEY": r}],
        "monkey": "kept",
        "machine": "kept",
        "orderInfo": "kept",
    }
