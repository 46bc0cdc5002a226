"""The provider sandboxes (tests/payment_providers.py) enforce the providers' rules over real HTTP.

Requests are made with our pure builders where they exist (`momo.build_create_body`,
`zalopay.build_create_body`, `vnpay.pay_url`); where they do not (query, refund), the signed
strings are written out here by hand from the documented field orders, so the sandbox and these
tests do not share a signer. What the sandboxes sign (IPNs, callbacks) is checked with our verifiers
and against strings built by hand, and must fail after a one-byte change.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import msgspec
import pytest

from api.payments import bank_transfer, momo, vietqr, vnpay, zalopay
from tests.payment_providers import (
    GMT7,
    BankNotifier,
    MomoSandbox,
    SandboxError,
    VnpaySandbox,
    ZaloPaySandbox,
)

MOMO_CREATE = "/v2/gateway/api/create"
MOMO_QUERY = "/v2/gateway/api/query"
MOMO_REFUND = "/v2/gateway/api/refund"
MOMO_IPN_FIELDS = {
    "partnerCode",
    "orderId",
    "requestId",
    "amount",
    "orderInfo",
    "orderType",
    "transId",
    "resultCode",
    "message",
    "payType",
    "responseTime",
    "extraData",
    "signature",
}
ZP_CALLBACK_DATA_FIELDS = [
    "app_id",
    "app_trans_id",
    "app_time",
    "app_user",
    "amount",
    "embed_data",
    "item",
    "zp_trans_id",
    "server_time",
    "channel",
    "merchant_user_id",
    "user_fee_amount",
    "discount_amount",
]
VNP_IPN_FIELDS = {
    "vnp_Amount",
    "vnp_BankCode",
    "vnp_BankTranNo",
    "vnp_CardType",
    "vnp_OrderInfo",
    "vnp_PayDate",
    "vnp_ResponseCode",
    "vnp_TmnCode",
    "vnp_TransactionNo",
    "vnp_TransactionStatus",
    "vnp_TxnRef",
    "vnp_SecureHash",
}


def _hmac(key: str, message: str | bytes, digest: Any = hashlib.sha256) -> str:
    data = message.encode() if isinstance(message, str) else message
    return hmac.new(key.encode(), data, digest).hexdigest()


def _flip(text: str, index: int) -> str:
    """`text` with the character at `index` changed to a different one."""
    replacement = "0" if text[index] != "0" else "1"
    return text[:index] + replacement + text[index + 1 :]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture(scope="module")
def momo_box() -> Iterator[MomoSandbox]:
    with MomoSandbox() as box:
        yield box


@pytest.fixture(scope="module")
def zp_box() -> Iterator[ZaloPaySandbox]:
    with ZaloPaySandbox() as box:
        yield box


@pytest.fixture(scope="module")
def vnp_box() -> Iterator[VnpaySandbox]:
    with VnpaySandbox() as box:
        yield box


# --- MoMo ------------------------------------------------------------------------------------


def _momo_body(box: MomoSandbox, amount: int = 150_000, extra_data: str = "") -> dict[str, Any]:
    return dict(
        momo.build_create_body(
            partner_code=box.partner_code,
            access_key=box.access_key,
            secret_key=box.secret_key,
            request_id=uuid.uuid4().hex,
            amount=amount,
            order_id=f"TH{uuid.uuid4().hex[:20]}",
            order_info="Thanh toan kham benh",
            redirect_url="https://app.example.vn/return/momo",
            ipn_url="https://api.example.vn/v1/payments/callbacks/momo",
            extra_data=extra_data,
        )
    )


def _momo_create(box: MomoSandbox, http: httpx.Client, **kwargs: Any) -> dict[str, Any]:
    body = _momo_body(box, **kwargs)
    answer = http.post(box.url + MOMO_CREATE, json=body)
    assert answer.status_code == 200, answer.text
    return body


def _momo_query(
    box: MomoSandbox, http: httpx.Client, order_id: str, secret: str | None = None
) -> httpx.Response:
    request_id = uuid.uuid4().hex
    # Signed by hand: accessKey&orderId&partnerCode&requestId.
    signed = (
        f"accessKey={box.access_key}&orderId={order_id}&partnerCode={box.partner_code}&requestId={request_id}"
    )
    body = {
        "partnerCode": box.partner_code,
        "requestId": request_id,
        "orderId": order_id,
        "lang": "en",
        "signature": _hmac(secret or box.secret_key, signed),
    }
    return http.post(box.url + MOMO_QUERY, json=body)


def _momo_refund_body(box: MomoSandbox, trans_id: int, amount: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "partnerCode": box.partner_code,
        "orderId": f"RF{uuid.uuid4().hex[:20]}",
        "requestId": uuid.uuid4().hex,
        "amount": amount,
        "transId": trans_id,
        "lang": "en",
        "description": "Hoan tien lich kham",
        **overrides,
    }
    # Signed by hand: accessKey&amount&description&orderId&partnerCode&requestId&transId.
    signed = (
        f"accessKey={box.access_key}&amount={body['amount']}&description={body['description']}"
        f"&orderId={body['orderId']}&partnerCode={body['partnerCode']}&requestId={body['requestId']}"
        f"&transId={body['transId']}"
    )
    body["signature"] = _hmac(box.secret_key, signed)
    return body


def test_momo_create_succeeds_and_answers_like_momo(momo_box: MomoSandbox, http: httpx.Client) -> None:
    extra = base64.b64encode(json.dumps({"invoice": "INV-1"}).encode()).decode()
    body = _momo_body(momo_box, extra_data=extra)
    # The signature as payments.md spells it, by hand: our builder agrees and the sandbox accepts it.
    signed = (
        f"accessKey={momo_box.access_key}&amount=150000&extraData={extra}&ipnUrl={body['ipnUrl']}"
        f"&orderId={body['orderId']}&orderInfo={body['orderInfo']}&partnerCode=MOMO"
        f"&redirectUrl={body['redirectUrl']}&requestId={body['requestId']}&requestType=captureWallet"
    )
    assert body["signature"] == _hmac(momo_box.secret_key, signed)

    answer = http.post(momo_box.url + MOMO_CREATE, json=body)
    assert answer.status_code == 200
    data = answer.json()
    assert data["resultCode"] == 0
    assert {k: data[k] for k in ("partnerCode", "requestId", "orderId", "amount")} == {
        k: body[k] for k in ("partnerCode", "requestId", "orderId", "amount")
    }
    assert isinstance(data["responseTime"], int) and data["message"]
    assert data["payUrl"] == f"{momo_box.url}/pay/{body['orderId']}"
    assert data["deeplink"].startswith("momo://app?action=payWithApp&isScanQR=false")
    assert data["qrCodeUrl"].startswith("momo://app?action=payWithApp&isScanQR=true")
    order = momo_box.orders[body["orderId"]]
    assert (order.status, order.result_code, order.amount, order.extra_data) == (
        "pending",
        1000,
        150_000,
        extra,
    )
    assert http.get(data["payUrl"]).status_code == 200
    assert http.get(f"{momo_box.url}/pay/unknown").status_code == 404
    assert momo_box.received(MOMO_CREATE)[-1].body == body


@pytest.mark.parametrize(
    "change",
    [
        {"signature": "flip"},
        {"amount": 151_000},
        {"orderInfo": "Thanh toan kham benh."},
        {"ipnUrl": "https://evil.example/ipn"},
        {"extraData": base64.b64encode(b"{}").decode()},
        {"partnerCode": "MOMOX"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_momo_create_refuses_a_bad_signature_or_changed_field(
    momo_box: MomoSandbox, http: httpx.Client, change: dict[str, Any]
) -> None:
    body = _momo_body(momo_box)
    if change.get("signature") == "flip":
        change = {"signature": _flip(body["signature"], 10)}
    answer = http.post(momo_box.url + MOMO_CREATE, json={**body, **change})
    assert answer.status_code == 400
    assert answer.json()["resultCode"] == 13  # MoMo: merchant authentication failed (signature)
    assert body["orderId"] not in momo_box.orders


def test_momo_create_refuses_other_credentials_and_bad_format(
    momo_box: MomoSandbox, http: httpx.Client
) -> None:
    with MomoSandbox(secret_key="another-secret") as other:
        assert http.post(other.url + MOMO_CREATE, json=_momo_body(momo_box)).json()["resultCode"] == 13
    body = _momo_body(momo_box)
    for bad in (
        {k: v for k, v in body.items() if k != "ipnUrl"},
        {**body, "amount": "150000"},
        {**body, "requestType": "payWithCC"},
        {**body, "orderId": "TH 1"},
        {**body, "extraData": "not base64!"},
    ):
        answer = http.post(momo_box.url + MOMO_CREATE, json=bad)
        assert (answer.status_code, answer.json()["resultCode"]) == (400, 20)
    answer = http.post(
        momo_box.url + MOMO_CREATE, content=b"[1]", headers={"content-type": "application/json"}
    )
    assert answer.json()["resultCode"] == 20


def test_momo_create_amount_limits_and_duplicates(momo_box: MomoSandbox, http: httpx.Client) -> None:
    def signed_with_amount(amount: int) -> dict[str, Any]:
        body = {**_momo_body(momo_box), "amount": amount}
        body["signature"] = momo.create_signature(body, momo_box.access_key, momo_box.secret_key)
        return body

    for amount, code in ((999, 22), (1_000, 0), (50_000_000, 0), (50_000_001, 22)):
        assert (
            http.post(momo_box.url + MOMO_CREATE, json=signed_with_amount(amount)).json()["resultCode"]
            == code
        )

    body = _momo_create(momo_box, http)
    first = momo_box.received(MOMO_CREATE)[-1].answer
    # The same requestId and body again: MoMo's idempotency gives the same answer.
    again = http.post(momo_box.url + MOMO_CREATE, json=body)
    assert (again.status_code, again.json()) == (200, first)
    # The same requestId for another request: 40.
    other = {**_momo_body(momo_box), "requestId": body["requestId"]}
    other["signature"] = momo.create_signature(other, momo_box.access_key, momo_box.secret_key)
    assert http.post(momo_box.url + MOMO_CREATE, json=other).json()["resultCode"] == 40
    # The same orderId with a new requestId: 41.
    dup = {**_momo_body(momo_box), "orderId": body["orderId"]}
    dup["signature"] = momo.create_signature(dup, momo_box.access_key, momo_box.secret_key)
    answer = http.post(momo_box.url + MOMO_CREATE, json=dup)
    assert (answer.status_code, answer.json()["resultCode"]) == (400, 41)


def test_momo_query_reflects_pay(momo_box: MomoSandbox, http: httpx.Client) -> None:
    body = _momo_create(momo_box, http)
    pending = _momo_query(momo_box, http, body["orderId"])
    assert pending.status_code == 200
    assert {k: pending.json()[k] for k in ("resultCode", "transId", "amount", "payType", "refundTrans")} == {
        "resultCode": 1000,
        "transId": 0,
        "amount": 150_000,
        "payType": "",
        "refundTrans": [],
    }
    ipn = momo_box.pay(body["orderId"])
    paid = _momo_query(momo_box, http, body["orderId"]).json()
    assert (paid["resultCode"], paid["transId"], paid["payType"]) == (0, ipn["transId"], "qr")
    assert paid["transId"] > 0

    failed = _momo_create(momo_box, http)
    momo_box.pay(failed["orderId"], result_code=1006)
    assert _momo_query(momo_box, http, failed["orderId"]).json()["resultCode"] == 1006
    assert momo_box.orders[failed["orderId"]].status == "failed"

    bad = _momo_query(momo_box, http, body["orderId"], secret="wrong-secret")
    assert (bad.status_code, bad.json()["resultCode"]) == (400, 13)
    unknown = _momo_query(momo_box, http, "TH-unknown")
    assert (unknown.status_code, unknown.json()["resultCode"]) == (400, 42)


def test_momo_refund_limits(momo_box: MomoSandbox, http: httpx.Client) -> None:
    body = _momo_create(momo_box, http)
    trans_id = momo_box.pay(body["orderId"])["transId"]

    first = _momo_refund_body(momo_box, trans_id, 100_000)
    answer = http.post(momo_box.url + MOMO_REFUND, json=first)
    assert answer.status_code == 200
    refund = answer.json()
    assert refund["resultCode"] == 0 and refund["transId"] not in (0, trans_id)
    assert {k: refund[k] for k in ("orderId", "requestId", "amount")} == {
        k: first[k] for k in ("orderId", "requestId", "amount")
    }
    # Replaying the identical request changes nothing and answers the same.
    assert http.post(momo_box.url + MOMO_REFUND, json=first).json() == refund

    over = http.post(momo_box.url + MOMO_REFUND, json=_momo_refund_body(momo_box, trans_id, 50_001))
    assert (over.status_code, over.json()["resultCode"]) == (400, 1081)
    rest = _momo_refund_body(momo_box, trans_id, 50_000)
    assert http.post(momo_box.url + MOMO_REFUND, json=rest).json()["resultCode"] == 0
    nothing_left = _momo_refund_body(momo_box, trans_id, 1_000)
    assert http.post(momo_box.url + MOMO_REFUND, json=nothing_left).json()["resultCode"] == 1081

    refunds = [r for r in momo_box.refunds if r.payment_trans_id == trans_id]
    assert [r.amount for r in refunds] == [100_000, 50_000]
    assert momo_box.orders[body["orderId"]].refunded == 150_000
    listed = _momo_query(momo_box, http, body["orderId"]).json()["refundTrans"]
    assert [(r["orderId"], r["amount"]) for r in listed] == [
        (first["orderId"], 100_000),
        (rest["orderId"], 50_000),
    ]

    other = _momo_create(momo_box, http)
    other_trans = momo_box.pay(other["orderId"])["transId"]
    cases = [
        ({**_momo_refund_body(momo_box, other_trans, 10_000), "signature": "0" * 64}, 13),
        ({**_momo_refund_body(momo_box, other_trans, 10_000), "amount": 20_000}, 13),  # changed after signing
        (
            _momo_refund_body(momo_box, other_trans, 10_000, orderId=other["orderId"]),
            41,
        ),  # reuses the payment's
        (_momo_refund_body(momo_box, 123, 10_000), 42),
        (_momo_refund_body(momo_box, other_trans, 999), 22),
    ]
    for request, code in cases:
        assert http.post(momo_box.url + MOMO_REFUND, json=request).json()["resultCode"] == code, request
    unpaid = _momo_create(momo_box, http)
    request = _momo_refund_body(momo_box, momo_box.orders[unpaid["orderId"]].trans_id, 10_000)
    assert http.post(momo_box.url + MOMO_REFUND, json=request).json()["resultCode"] == 42


def test_momo_ipn_verifies_and_fails_after_one_changed_byte(
    momo_box: MomoSandbox, http: httpx.Client
) -> None:
    body = _momo_create(momo_box, http)
    ipn = momo_box.pay(body["orderId"])
    assert set(ipn) == MOMO_IPN_FIELDS
    assert (ipn["orderId"], ipn["requestId"], ipn["amount"], ipn["resultCode"]) == (
        body["orderId"],
        body["requestId"],
        150_000,
        0,
    )
    assert all(isinstance(ipn[k], int) for k in ("amount", "transId", "resultCode", "responseTime"))
    # The payments.md IPN string, by hand.
    order = "accessKey amount extraData message orderId orderInfo orderType partnerCode payType requestId"
    order += " responseTime resultCode transId"
    values = {**ipn, "accessKey": momo_box.access_key}
    signed = "&".join(f"{k}={values[k]}" for k in order.split())
    assert ipn["signature"] == _hmac(momo_box.secret_key, signed)
    assert momo.verify_ipn(ipn, momo_box.access_key, [momo_box.secret_key])
    assert momo.verify_ipn(json.loads(json.dumps(ipn)), momo_box.access_key, [momo_box.secret_key])
    for key, value in ipn.items():
        text = str(value)
        for index in range(len(text)):
            changed: Any = _flip(text, index)
            if isinstance(value, int):
                changed = int(changed)
            assert not momo.verify_ipn({**ipn, key: changed}, momo_box.access_key, [momo_box.secret_key]), key

    # The same IPN again for a settled order; a late failure keeps the order paid.
    assert momo_box.pay(body["orderId"]) == ipn
    late = momo_box.pay(body["orderId"], result_code=1006)
    assert late["resultCode"] == 1006 and late["transId"] == ipn["transId"]
    assert momo.verify_ipn(late, momo_box.access_key, [momo_box.secret_key])
    assert momo_box.orders[body["orderId"]].status == "paid"
    # Overrides are signed, unless sign=False (changed in transit).
    assert momo.verify_ipn(
        momo_box.ipn_for(body["orderId"], amount=1_000), momo_box.access_key, [momo_box.secret_key]
    )
    tampered = momo_box.ipn_for(body["orderId"], sign=False, amount=1_000)
    assert tampered["amount"] == 1_000
    assert not momo.verify_ipn(tampered, momo_box.access_key, [momo_box.secret_key])


def test_momo_deliver_posts_the_json_body(momo_box: MomoSandbox, http: httpx.Client) -> None:
    body = _momo_create(momo_box, http)
    ipn = momo_box.pay(body["orderId"])
    answer = momo_box.deliver(f"{momo_box.url}/ipn-sink", ipn)  # no such route here: it is only recorded
    assert answer.status_code == 404
    assert momo_box.received("/ipn-sink")[-1].body == ipn


def test_outage_latency_records_and_routes() -> None:
    with MomoSandbox(keep_records=False) as box, httpx.Client(timeout=5) as client:
        box.outage(503)
        assert client.post(box.url + MOMO_CREATE, json=_momo_body(box)).status_code == 503
        box.outage(None)
        box.latency = 0.05
        started = time.monotonic()
        assert client.post(box.url + MOMO_CREATE, json=_momo_body(box)).json()["resultCode"] == 0
        assert time.monotonic() - started >= 0.05
        assert client.get(box.url + MOMO_CREATE).status_code == 405
        assert client.post(box.url + "/nowhere").status_code == 404
        assert box.requests == []
        box.reset()
        assert (box.orders, box.latency) == ({}, 0.0)
    with pytest.raises(RuntimeError):
        _ = MomoSandbox().url


# --- ZaloPay ---------------------------------------------------------------------------------


def _zp_body(box: ZaloPaySandbox, *, amount: int = 150_000, **overrides: Any) -> dict[str, Any]:
    body = zalopay.build_create_body(
        app_id=box.app_id,
        app_user="patient-42",
        app_trans_id=overrides.pop("app_trans_id", None)
        or zalopay.app_trans_id(dt.datetime.now(dt.UTC), f"TH{uuid.uuid4().hex[:12]}"),
        app_time=overrides.pop("app_time", None) or _now_ms(),
        amount=amount,
        description="Thanh toán khám bệnh",
        callback_url="https://api.example.vn/v1/payments/callbacks/zalopay",
        key1=overrides.pop("key1", box.key1),
        embed_data=overrides.pop("embed_data", '{"redirecturl":"https://app.example.vn/return/zalopay"}'),
        item=overrides.pop("item", "[]"),
    )
    return {**body, **overrides}


def _zp_create(box: ZaloPaySandbox, http: httpx.Client, **kwargs: Any) -> dict[str, Any]:
    body = _zp_body(box, **kwargs)
    assert http.post(box.url + "/v2/create", json=body).json()["return_code"] == 1
    return body


def _zp_query(
    box: ZaloPaySandbox, http: httpx.Client, app_trans_id: str, key: str | None = None
) -> dict[str, Any]:
    mac = _hmac(key or box.key1, f"{box.app_id}|{app_trans_id}|{box.key1}")  # by hand
    answer: dict[str, Any] = http.post(
        box.url + "/v2/query", data={"app_id": str(box.app_id), "app_trans_id": app_trans_id, "mac": mac}
    ).json()
    return answer


def _zp_refund_body(box: ZaloPaySandbox, zp_trans_id: int, amount: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "app_id": box.app_id,
        "m_refund_id": f"{dt.datetime.now(GMT7):%y%m%d}_{box.app_id}_{uuid.uuid4().hex[:10]}",
        "zp_trans_id": str(zp_trans_id),
        "amount": amount,
        "timestamp": _now_ms(),
        "description": "Hoan tien lich kham",
        **overrides,
    }
    signed = (
        f"{body['app_id']}|{body['zp_trans_id']}|{body['amount']}|{body['description']}|{body['timestamp']}"
    )
    body["mac"] = _hmac(box.key1, signed)  # by hand
    return body


def test_zalopay_create_form_or_json(zp_box: ZaloPaySandbox, http: httpx.Client) -> None:
    form = _zp_body(zp_box)
    answer = http.post(zp_box.url + "/v2/create", data={k: str(v) for k, v in form.items()})
    assert answer.status_code == 200
    data = answer.json()
    assert (data["return_code"], data["sub_return_code"]) == (1, 1)
    assert data["return_message"] and data["sub_return_message"]
    assert data["order_url"] == f"{zp_box.url}/openinapp?order={data['zp_trans_token']}"
    assert data["order_token"] == data["zp_trans_token"]
    assert vietqr.parse(data["qr_code"])["amount_vnd"] == 150_000
    assert http.get(data["order_url"]).status_code == 200
    order = zp_box.orders[form["app_trans_id"]]
    assert (order.status, order.amount, order.callback_url) == ("pending", 150_000, form["callback_url"])

    body = _zp_body(zp_box)
    assert http.post(zp_box.url + "/v2/create", json=body).json()["return_code"] == 1


def test_zalopay_create_refusals(zp_box: ZaloPaySandbox, http: httpx.Client) -> None:
    def create(body: dict[str, Any]) -> tuple[int, int]:
        data = http.post(zp_box.url + "/v2/create", json=body).json()
        return data["return_code"], data["sub_return_code"]

    body = _zp_body(zp_box)
    yesterday = zalopay.app_trans_id(dt.datetime.now(dt.UTC) - dt.timedelta(days=1), "TH1")
    cases = [
        ({**body, "mac": _flip(body["mac"], 3)}, -402),
        ({**body, "amount": 151_000}, -402),  # changed after signing
        ({**body, "embed_data": "{}"}, -402),
        (_zp_body(zp_box, key1=zp_box.key2), -402),
        ({**_zp_body(zp_box), "app_id": 553}, -402),
        (_zp_body(zp_box, app_trans_id=yesterday), -401),
        (_zp_body(zp_box, app_trans_id="TH1"), -401),
        (_zp_body(zp_box, app_time=_now_ms() // 1000), -401),  # seconds, not milliseconds
        (_zp_body(zp_box, item="not json"), -401),
        ({k: v for k, v in body.items() if k != "app_user"}, -401),
    ]
    for request, sub_code in cases:
        assert create(request) == (2, sub_code), request
    assert body["app_trans_id"] not in zp_box.orders
    assert create(body) == (1, 1)
    assert create(body) == (2, -68)


def test_zalopay_query_reflects_pay_and_fail(zp_box: ZaloPaySandbox, http: httpx.Client) -> None:
    body = _zp_create(zp_box, http)
    pending = _zp_query(zp_box, http, body["app_trans_id"])
    assert (pending["return_code"], pending["zp_trans_id"], pending["is_processing"]) == (3, 0, False)
    callback = zp_box.pay(body["app_trans_id"])
    paid = _zp_query(zp_box, http, body["app_trans_id"])
    data = json.loads(callback["data"])
    assert (paid["return_code"], paid["amount"], paid["zp_trans_id"]) == (1, 150_000, data["zp_trans_id"])
    assert str(paid["zp_trans_id"]).startswith(f"{dt.datetime.now(GMT7):%y%m%d}")

    failed = _zp_create(zp_box, http)
    zp_box.fail(failed["app_trans_id"], sub_return_code=-63)
    assert [
        _zp_query(zp_box, http, failed["app_trans_id"])[k] for k in ("return_code", "sub_return_code")
    ] == [2, -63]
    with pytest.raises(SandboxError):
        zp_box.pay(failed["app_trans_id"])

    unknown = _zp_query(zp_box, http, "250101_unknown")
    assert (unknown["return_code"], unknown["sub_return_code"]) == (2, -54)
    bad = _zp_query(zp_box, http, body["app_trans_id"], key=zp_box.key2)
    assert (bad["return_code"], bad["sub_return_code"]) == (2, -402)


def test_zalopay_refund_limits(zp_box: ZaloPaySandbox, http: httpx.Client) -> None:
    def refund(body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = http.post(zp_box.url + "/v2/refund", json=body).json()
        return answer

    body = _zp_create(zp_box, http)
    zp_trans_id = json.loads(zp_box.pay(body["app_trans_id"])["data"])["zp_trans_id"]
    first = _zp_refund_body(zp_box, zp_trans_id, 100_000)
    done = refund(first)
    assert (done["return_code"], done["sub_return_code"]) == (1, 1) and done["refund_id"] > 0
    assert refund(first) == done  # the identical request again
    reused = refund(_zp_refund_body(zp_box, zp_trans_id, 1_000, m_refund_id=first["m_refund_id"]))
    assert (reused["return_code"], reused["sub_return_code"]) == (2, -68)
    over = refund(_zp_refund_body(zp_box, zp_trans_id, 50_001))
    assert (over["return_code"], over["sub_return_code"]) == (2, -102)
    form = _zp_refund_body(zp_box, zp_trans_id, 50_000)
    assert (
        http.post(zp_box.url + "/v2/refund", data={k: str(v) for k, v in form.items()}).json()["return_code"]
        == 1
    )
    assert zp_box.orders[body["app_trans_id"]].refunded == 150_000

    other = _zp_create(zp_box, http)
    other_trans = json.loads(zp_box.pay(other["app_trans_id"])["data"])["zp_trans_id"]
    signed = _zp_refund_body(zp_box, other_trans, 10_000)
    cases = [
        ({**signed, "mac": _flip(signed["mac"], 0)}, -402),
        ({**signed, "amount": 20_000}, -402),
        (_zp_refund_body(zp_box, other_trans, 10_000, m_refund_id=f"250101_{zp_box.app_id}_x"), -401),
        (
            _zp_refund_body(zp_box, other_trans, 10_000, m_refund_id=f"{dt.datetime.now(GMT7):%y%m%d}_553_x"),
            -401,
        ),
        (_zp_refund_body(zp_box, other_trans, 10_000, timestamp=_now_ms() // 1000), -401),
        (_zp_refund_body(zp_box, 1234, 10_000), -101),
    ]
    for request, sub_code in cases:
        answer = refund(request)
        assert (answer["return_code"], answer["sub_return_code"]) == (2, sub_code), request

    # Asynchronous refunds: processing until settled, as query_refund tells.
    zp_box.refund_processing = True
    try:
        slow = _zp_refund_body(zp_box, other_trans, 10_000)
        assert refund(slow)["return_code"] == 3
        timestamp = _now_ms()
        query = {
            "app_id": zp_box.app_id,
            "m_refund_id": slow["m_refund_id"],
            "timestamp": timestamp,
            "mac": _hmac(zp_box.key1, f"{zp_box.app_id}|{slow['m_refund_id']}|{timestamp}"),  # by hand
        }
        assert http.post(zp_box.url + "/v2/query_refund", json=query).json()["return_code"] == 3
        zp_box.settle_refunds()
        assert http.post(zp_box.url + "/v2/query_refund", json=query).json()["return_code"] == 1
        unknown = {**query, "m_refund_id": "x", "mac": zp_box.query_refund_mac("x", timestamp)}
        assert http.post(zp_box.url + "/v2/query_refund", json=unknown).json()["return_code"] == 2
    finally:
        zp_box.refund_processing = False


def test_zalopay_callback_verifies_and_fails_after_one_changed_byte(
    zp_box: ZaloPaySandbox, http: httpx.Client
) -> None:
    body = _zp_create(zp_box, http)
    callback = zp_box.pay(body["app_trans_id"])
    assert set(callback) == {"data", "mac", "type"} and callback["type"] == 1
    data = json.loads(callback["data"])
    assert list(data) == ZP_CALLBACK_DATA_FIELDS
    assert (data["app_id"], data["app_trans_id"], data["amount"], data["app_time"]) == (
        zp_box.app_id,
        body["app_trans_id"],
        150_000,
        body["app_time"],
    )
    assert (data["embed_data"], data["item"]) == (body["embed_data"], body["item"])
    assert callback["mac"] == _hmac(zp_box.key2, callback["data"])
    assert zalopay.verify_callback(callback["data"], callback["mac"], [zp_box.key2])
    assert not zalopay.verify_callback(callback["data"], callback["mac"], [zp_box.key1])
    for index in range(len(callback["data"])):
        assert not zalopay.verify_callback(_flip(callback["data"], index), callback["mac"], [zp_box.key2])
    for index in range(len(callback["mac"])):
        assert not zalopay.verify_callback(callback["data"], _flip(callback["mac"], index), [zp_box.key2])

    assert zp_box.pay(body["app_trans_id"]) == callback  # a retried callback is the same
    changed = zp_box.callback_for(body["app_trans_id"], amount=1)
    assert zalopay.verify_callback(changed["data"], changed["mac"], [zp_box.key2])
    tampered = zp_box.callback_for(body["app_trans_id"], sign=False, amount=1)
    assert json.loads(tampered["data"])["amount"] == 1
    assert not zalopay.verify_callback(tampered["data"], tampered["mac"], [zp_box.key2])


# --- VNPay -----------------------------------------------------------------------------------

QUERYDR_SIGNED = "vnp_RequestId|vnp_Version|vnp_Command|vnp_TmnCode|vnp_TxnRef|vnp_TransactionDate|vnp_CreateDate|vnp_IpAddr|vnp_OrderInfo"
REFUND_SIGNED = (
    "vnp_RequestId|vnp_Version|vnp_Command|vnp_TmnCode|vnp_TransactionType|vnp_TxnRef|vnp_Amount"
    "|vnp_TransactionNo|vnp_TransactionDate|vnp_CreateBy|vnp_CreateDate|vnp_IpAddr|vnp_OrderInfo"
)
ANSWER_SIGNED = (
    "vnp_ResponseId|vnp_Command|vnp_ResponseCode|vnp_Message|vnp_TmnCode|vnp_TxnRef|vnp_Amount|vnp_BankCode"
    "|vnp_PayDate|vnp_TransactionNo|vnp_TransactionType|vnp_TransactionStatus|vnp_OrderInfo"
)


def _pipe_hash(secret: str, names: str, values: dict[str, Any]) -> str:
    return _hmac(secret, "|".join(str(values.get(name, "")) for name in names.split("|")), hashlib.sha512)


def _vnp_pay_url(box: VnpaySandbox, amount: int = 150_000) -> str:
    now = dt.datetime.now(dt.UTC)
    params = vnpay.build_pay_params(
        tmn_code=box.tmn_code,
        amount_vnd=amount,
        txn_ref=f"TH{uuid.uuid4().hex[:16]}",
        order_info="Thanh toán khám bệnh: bác sĩ Đào",
        return_url="https://app.example.vn/return/vnpay",
        ip_addr="203.0.113.5",
        created_at=now,
        expires_at=now + dt.timedelta(minutes=15),
        locale="vn",
    )
    return vnpay.pay_url(box.pay_base_url, params, box.hash_secret)


def _vnp_params(pay_url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(pay_url).query))


def _vnp_request(box: VnpaySandbox, command: str, pay_url: str, **overrides: Any) -> dict[str, Any]:
    params = _vnp_params(pay_url)
    body: dict[str, Any] = {
        "vnp_RequestId": uuid.uuid4().hex[:32],
        "vnp_Version": "2.1.0",
        "vnp_Command": command,
        "vnp_TmnCode": box.tmn_code,
        "vnp_TxnRef": params["vnp_TxnRef"],
        "vnp_OrderInfo": f"{command} {params['vnp_TxnRef']}",
        "vnp_TransactionDate": params["vnp_CreateDate"],
        "vnp_CreateDate": f"{dt.datetime.now(GMT7):%Y%m%d%H%M%S}",
        "vnp_IpAddr": "203.0.113.9",
    }
    if command == "refund":
        body.update(vnp_TransactionType="03", vnp_Amount=params["vnp_Amount"], vnp_CreateBy="staff-7")
    body.update(overrides)
    names = REFUND_SIGNED if command == "refund" else QUERYDR_SIGNED
    body["vnp_SecureHash"] = _pipe_hash(box.hash_secret, names, body)
    return body


def _vnp_call(box: VnpaySandbox, http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    answer = http.post(box.api_url, json=body)
    assert answer.status_code == 200
    data: dict[str, Any] = answer.json()
    names = (
        ANSWER_SIGNED
        if data["vnp_Command"] == "refund"
        else ANSWER_SIGNED + "|vnp_PromotionCode|vnp_PromotionAmount"
    )
    assert set(data) == {*names.split("|"), "vnp_SecureHash"}
    assert data["vnp_SecureHash"] == _pipe_hash(box.hash_secret, names, data)  # every answer is signed
    return data


def test_vnpay_ipn_params_verify_and_fail_after_one_changed_byte(vnp_box: VnpaySandbox) -> None:
    pay_url = _vnp_pay_url(vnp_box)
    sent = _vnp_params(pay_url)
    ipn = vnp_box.ipn_params(pay_url)
    assert set(ipn) == VNP_IPN_FIELDS
    assert {k: ipn[k] for k in ("vnp_Amount", "vnp_TxnRef", "vnp_OrderInfo", "vnp_TmnCode")} == {
        k: sent[k] for k in ("vnp_Amount", "vnp_TxnRef", "vnp_OrderInfo", "vnp_TmnCode")
    }
    assert (ipn["vnp_ResponseCode"], ipn["vnp_TransactionStatus"]) == ("00", "00")
    assert vnpay.verify(ipn, [vnp_box.hash_secret])
    for key, value in ipn.items():
        for index in range(len(value)):
            assert not vnpay.verify({**ipn, key: _flip(value, index)}, [vnp_box.hash_secret]), key
    assert vnp_box.orders[sent["vnp_TxnRef"]].status == "paid"
    assert vnp_box.ipn_params(pay_url) == ipn  # a repeated IPN
    late = vnp_box.ipn_params(pay_url, response_code="24")
    assert (late["vnp_TransactionStatus"], late["vnp_TransactionNo"]) == ("02", ipn["vnp_TransactionNo"])
    assert vnp_box.orders[sent["vnp_TxnRef"]].status == "paid"
    assert not vnpay.verify(vnp_box.ipn_params(pay_url, sign=False, vnp_Amount="100"), [vnp_box.hash_secret])
    assert vnpay.verify(vnp_box.ipn_params(pay_url, vnp_Amount="100"), [vnp_box.hash_secret])

    other = vnp_box.ipn_params(_vnp_pay_url(vnp_box), response_code="24")
    assert other["vnp_TransactionNo"] != ipn["vnp_TransactionNo"]
    assert vnp_box.orders[other["vnp_TxnRef"]].status == "failed"


def test_vnpay_checks_the_pay_url(vnp_box: VnpaySandbox, http: httpx.Client) -> None:
    pay_url = _vnp_pay_url(vnp_box)
    assert http.get(pay_url).status_code == 200
    tampered = pay_url.replace("vnp_Amount=15000000", "vnp_Amount=100")
    assert tampered != pay_url
    with pytest.raises(SandboxError, match="signature"):
        vnp_box.ipn_params(tampered)
    page = http.get(tampered)
    assert page.status_code == 400 and "signature" in page.text
    with VnpaySandbox(tmn_code="OTHERTMN") as other, pytest.raises(SandboxError, match="TmnCode"):
        other.visit(pay_url)
    with pytest.raises(SandboxError, match="SecureHashType"):
        vnp_box.visit(pay_url + "&vnp_SecureHashType=HmacSHA512")
    params = _vnp_params(_vnp_pay_url(vnp_box))
    params["vnp_Version"] = "2.0.1"
    with pytest.raises(SandboxError, match=r"2\.1\.0"):
        vnp_box.visit(vnpay.pay_url(vnp_box.pay_base_url, params, vnp_box.hash_secret))


def test_vnpay_querydr(vnp_box: VnpaySandbox, http: httpx.Client) -> None:
    pay_url = _vnp_pay_url(vnp_box)
    vnp_box.visit(pay_url)
    pending = _vnp_call(vnp_box, http, _vnp_request(vnp_box, "querydr", pay_url))
    assert (pending["vnp_ResponseCode"], pending["vnp_TransactionStatus"], pending["vnp_TransactionNo"]) == (
        "00",
        "01",
        "",
    )
    ipn = vnp_box.ipn_params(pay_url)
    paid = _vnp_call(vnp_box, http, _vnp_request(vnp_box, "querydr", pay_url))
    assert {k: paid[k] for k in ("vnp_ResponseCode", "vnp_TransactionStatus", "vnp_TransactionType")} == {
        "vnp_ResponseCode": "00",
        "vnp_TransactionStatus": "00",
        "vnp_TransactionType": "01",
    }
    assert {k: paid[k] for k in ("vnp_TransactionNo", "vnp_Amount", "vnp_PayDate", "vnp_TxnRef")} == {
        k: ipn[k] for k in ("vnp_TransactionNo", "vnp_Amount", "vnp_PayDate", "vnp_TxnRef")
    }
    with_no = _vnp_request(vnp_box, "querydr", pay_url, vnp_TransactionNo=ipn["vnp_TransactionNo"])
    assert _vnp_call(vnp_box, http, with_no)["vnp_ResponseCode"] == "00"

    failed_url = _vnp_pay_url(vnp_box)
    vnp_box.ipn_params(failed_url, response_code="24")
    assert (
        _vnp_call(vnp_box, http, _vnp_request(vnp_box, "querydr", failed_url))["vnp_TransactionStatus"]
        == "02"
    )

    request = _vnp_request(vnp_box, "querydr", pay_url)
    cases = [
        ({**request, "vnp_SecureHash": _flip(request["vnp_SecureHash"], 5)}, "97"),
        ({**request, "vnp_IpAddr": "198.51.100.1"}, "97"),  # changed after signing
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_TmnCode="OTHERTMN"), "02"),
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_TxnRef="unknown"), "91"),
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_TransactionDate="20200101000000"), "91"),
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_TransactionNo="1"), "91"),
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_CreateDate="2024-01-01"), "03"),
        (_vnp_request(vnp_box, "querydr", pay_url, vnp_Version="2.0.1"), "03"),
        ({k: v for k, v in request.items() if k != "vnp_IpAddr"}, "03"),
        (_vnp_request(vnp_box, "pay", pay_url), "03"),
        (request, "00"),
        (request, "94"),  # the same vnp_RequestId again
    ]
    for body, code in cases:
        assert _vnp_call(vnp_box, http, body)["vnp_ResponseCode"] == code, body


def test_vnpay_refund_limits(vnp_box: VnpaySandbox, http: httpx.Client) -> None:
    def refund(pay_url: str, amount_vnd: int, kind: str = "03", **overrides: Any) -> dict[str, Any]:
        body = _vnp_request(
            vnp_box,
            "refund",
            pay_url,
            vnp_Amount=str(amount_vnd * 100),
            vnp_TransactionType=kind,
            **overrides,
        )
        return _vnp_call(vnp_box, http, body)

    pay_url = _vnp_pay_url(vnp_box)
    ipn = vnp_box.ipn_params(pay_url)
    partial = refund(pay_url, 50_000, vnp_TransactionNo=ipn["vnp_TransactionNo"])
    assert {k: partial[k] for k in ("vnp_ResponseCode", "vnp_Amount", "vnp_TransactionType")} == {
        "vnp_ResponseCode": "00",
        "vnp_Amount": "5000000",
        "vnp_TransactionType": "03",
    }
    assert partial["vnp_TransactionNo"] not in ("", ipn["vnp_TransactionNo"])
    assert refund(pay_url, 150_000, "02")["vnp_ResponseCode"] == "04"  # full after partial
    assert refund(pay_url, 100_001)["vnp_ResponseCode"] == "93"
    assert refund(pay_url, 100_000)["vnp_ResponseCode"] == "00"
    assert refund(pay_url, 1)["vnp_ResponseCode"] == "93"
    assert vnp_box.orders[ipn["vnp_TxnRef"]].refunded == 150_000
    assert [r.amount for r in vnp_box.refunds if r.txn_ref == ipn["vnp_TxnRef"]] == [50_000, 100_000]

    full_url = _vnp_pay_url(vnp_box, amount=200_000)
    vnp_box.ipn_params(full_url)
    assert refund(full_url, 100_000, "02")["vnp_ResponseCode"] == "93"  # a full refund is of everything
    assert refund(full_url, 200_000, "02")["vnp_ResponseCode"] == "00"

    unpaid_url = _vnp_pay_url(vnp_box)
    vnp_box.visit(unpaid_url)
    assert refund(unpaid_url, 1_000)["vnp_ResponseCode"] == "95"
    failed_url = _vnp_pay_url(vnp_box)
    vnp_box.ipn_params(failed_url, response_code="51")
    assert refund(failed_url, 1_000)["vnp_ResponseCode"] == "95"

    other_url = _vnp_pay_url(vnp_box)
    vnp_box.ipn_params(other_url)
    request = _vnp_request(vnp_box, "refund", other_url, vnp_Amount="1000000")
    assert _vnp_call(vnp_box, http, {**request, "vnp_Amount": "2000000"})["vnp_ResponseCode"] == "97"
    assert _vnp_call(vnp_box, http, {**request, "vnp_CreateBy": "someone"})["vnp_ResponseCode"] == "97"
    assert refund(other_url, 1_000, "04")["vnp_ResponseCode"] == "03"
    odd = _vnp_request(vnp_box, "refund", other_url, vnp_Amount="1000050")
    assert _vnp_call(vnp_box, http, odd)["vnp_ResponseCode"] == "03"
    assert _vnp_call(vnp_box, http, request)["vnp_ResponseCode"] == "00"


# --- Bank-transfer notices -------------------------------------------------------------------


def test_bank_notice_verifies_and_fails_after_one_changed_byte() -> None:
    notifier = BankNotifier("bank-secret")
    received_at = dt.datetime(2024, 5, 21, 9, 18, 6, tzinfo=GMT7)
    body, headers = notifier.notice(
        "FT24142ABC",
        "1012345678",
        150_000,
        "MBVCB.123.TH0123456789.CT",
        received_at,
        bank_extra={"channel": "NAPAS"},
    )
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Signature"] == _hmac("bank-secret", body)
    assert bank_transfer.verify_signature(body, headers[bank_transfer.SIGNATURE_HEADER], ["bank-secret"])
    notice = msgspec.json.decode(body, type=bank_transfer.BankTransferNotice)
    assert (notice.reference, notice.amount, notice.received_at) == ("FT24142ABC", 150_000, received_at)
    for index in range(len(body)):
        changed = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        assert not bank_transfer.verify_signature(changed, headers["X-Signature"], ["bank-secret"]), index
    assert not bank_transfer.verify_signature(body, headers["X-Signature"], ["other-secret"])
    with pytest.raises(ValueError, match="timezone"):
        notifier.notice("FT1", "1012345678", 1, "m", dt.datetime(2024, 5, 21, 9, 18, 6))
