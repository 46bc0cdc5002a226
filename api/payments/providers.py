"""Calls to the providers' server APIs (create an order, ask for its state), over HTTPS with
timeouts. The base URLs are configurable, so tests point them at local servers that check
requests the way the providers do (tests/payment_providers.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import time
import uuid
from typing import Any, Literal

import httpx
import msgspec

from api.errors import ApiError
from api.payments import momo, vnpay, zalopay
from api.payments.accounts import Account

Outcome = Literal["paid", "failed", "pending"]


class ProviderAnswer(msgspec.Struct, frozen=True):
    """What a query API said about an order."""

    outcome: Outcome
    transaction_id: str | None
    amount_vnd: int | None
    payload: dict[str, Any]


async def _post(http: httpx.AsyncClient, url: str, **kwargs: Any) -> dict[str, Any]:
    """The provider's JSON answer; 503 `payment_provider_unavailable` when it has none to give
    (down, a 5xx, not JSON): an outage must never read as "not paid"."""
    try:
        response = await http.post(url, **kwargs)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        raise ApiError("payment_provider_unavailable") from None
    if response.status_code >= 500 or not isinstance(body, dict):
        raise ApiError("payment_provider_unavailable")
    return body


def _code(answer: dict[str, Any], name: str) -> int:
    code = answer.get(name)
    if isinstance(code, bool) or not isinstance(code, int):
        raise ApiError("payment_provider_unavailable")
    return code


async def post_json(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return await _post(http, url, json=body)


async def post_form(http: httpx.AsyncClient, url: str, form: dict[str, str]) -> dict[str, Any]:
    return await _post(http, url, data=form)


async def momo_create(
    http: httpx.AsyncClient,
    account: Account,
    *,
    order_id: str,
    amount: int,
    order_info: str,
    redirect_url: str,
    ipn_url: str,
) -> tuple[str | None, str | None]:
    """MoMo AIO v2 create: (payUrl, deeplink)."""
    body = momo.build_create_body(
        partner_code=account.config["partner_code"],
        access_key=account.config["access_key"],
        secret_key=account.secret("secret_key"),
        request_id=uuid.uuid4().hex,
        amount=amount,
        order_id=order_id,
        order_info=order_info,
        redirect_url=redirect_url,
        ipn_url=ipn_url,
    )
    answer = await _post(http, f"{account.config['endpoint'].rstrip('/')}/v2/gateway/api/create", json=body)
    if answer.get("resultCode") != 0:
        raise ApiError("payment_provider_unavailable")
    return answer.get("payUrl"), answer.get("deeplink")


async def momo_query(http: httpx.AsyncClient, account: Account, order_id: str) -> ProviderAnswer:
    request_id = uuid.uuid4().hex
    fields = {
        "accessKey": account.config["access_key"],
        "orderId": order_id,
        "partnerCode": account.config["partner_code"],
        "requestId": request_id,
    }
    signed = "&".join(f"{k}={v}" for k, v in fields.items())
    body = {
        "partnerCode": account.config["partner_code"],
        "requestId": request_id,
        "orderId": order_id,
        "lang": "vi",
        "signature": hmac.new(
            account.secret("secret_key").encode(), signed.encode(), hashlib.sha256
        ).hexdigest(),
    }
    answer = await _post(http, f"{account.config['endpoint'].rstrip('/')}/v2/gateway/api/query", json=body)
    code = _code(answer, "resultCode")
    if 0 < code < 1000:
        # 10-99 are MoMo's system and merchant errors (bad request, unknown order...), not
        # the fate of a payment: ask again later rather than call it failed.
        raise ApiError("payment_provider_unavailable")
    return ProviderAnswer(
        momo.result_kind(code),
        str(answer["transId"]) if answer.get("transId") else None,
        int(answer["amount"]) if answer.get("amount") is not None else None,
        answer,
    )


async def zalopay_create(
    http: httpx.AsyncClient,
    account: Account,
    *,
    app_trans_id: str,
    amount: int,
    description: str,
    callback_url: str,
    redirect_url: str,
) -> str | None:
    """ZaloPay v2 create: the order URL."""
    body = zalopay.build_create_body(
        app_id=int(account.config["app_id"]),
        app_user="telehealth",
        app_trans_id=app_trans_id,
        app_time=int(time.time() * 1000),
        amount=amount,
        description=description,
        callback_url=callback_url,
        key1=account.secret("key1"),
        embed_data=msgspec.json.encode({"redirecturl": redirect_url}).decode(),
    )
    answer = await _post(
        http, f"{account.config['endpoint'].rstrip('/')}/v2/create", data={k: str(v) for k, v in body.items()}
    )
    if answer.get("return_code") != 1:
        raise ApiError("payment_provider_unavailable")
    order_url: str | None = answer.get("order_url")
    return order_url


async def zalopay_query(http: httpx.AsyncClient, account: Account, app_trans_id: str) -> ProviderAnswer:
    app_id = str(account.config["app_id"])
    key1 = account.secret("key1")
    mac = hmac.new(key1.encode(), f"{app_id}|{app_trans_id}|{key1}".encode(), hashlib.sha256).hexdigest()
    answer = await _post(
        http,
        f"{account.config['endpoint'].rstrip('/')}/v2/query",
        data={"app_id": app_id, "app_trans_id": app_trans_id, "mac": mac},
    )
    code = _code(answer, "return_code")
    outcome: Outcome = "paid" if code == 1 else "failed" if code == 2 else "pending"
    return ProviderAnswer(
        outcome,
        str(answer["zp_trans_id"]) if answer.get("zp_trans_id") else None,
        int(answer["amount"]) if answer.get("amount") is not None else None,
        answer,
    )


async def vnpay_query(
    http: httpx.AsyncClient, account: Account, txn_ref: str, created_at: dt.datetime
) -> ProviderAnswer:
    """VNPay merchant web API `querydr` (2.1.0): checksum over the pipe-joined request fields."""
    now = dt.datetime.now(vnpay.GMT7)
    request = {
        "vnp_RequestId": uuid.uuid4().hex,
        "vnp_Version": "2.1.0",
        "vnp_Command": "querydr",
        "vnp_TmnCode": account.config["tmn_code"],
        "vnp_TxnRef": txn_ref,
        "vnp_TransactionDate": created_at.astimezone(vnpay.GMT7).strftime("%Y%m%d%H%M%S"),
        "vnp_CreateDate": now.strftime("%Y%m%d%H%M%S"),
        "vnp_IpAddr": "127.0.0.1",
        "vnp_OrderInfo": f"Truy van {txn_ref}",
    }
    request["vnp_SecureHash"] = _pipe_hash(
        account.secret("hash_secret"), [request[k] for k in VNPAY_QUERY_FIELDS]
    )
    answer = await _post(http, account.config["api_url"], json=request)
    if not _vnpay_answer_signed(account, answer, VNPAY_QUERY_ANSWER_FIELDS):
        raise ApiError("payment_provider_unavailable")
    if answer.get("vnp_ResponseCode") == "91":
        # VNPay never saw this order: the patient never opened the pay page.
        return ProviderAnswer("pending", None, None, answer)
    if answer.get("vnp_ResponseCode") != "00":
        raise ApiError("payment_provider_unavailable")
    status = answer.get("vnp_TransactionStatus")
    outcome: Outcome = "paid" if status == "00" else "pending" if status == "01" else "failed"
    amount = answer.get("vnp_Amount")
    return ProviderAnswer(
        outcome,
        str(answer["vnp_TransactionNo"]) if answer.get("vnp_TransactionNo") else None,
        int(amount) // 100 if isinstance(amount, (int, str)) and str(amount).isdigit() else None,
        answer,
    )


VNPAY_QUERY_FIELDS = (
    "vnp_RequestId",
    "vnp_Version",
    "vnp_Command",
    "vnp_TmnCode",
    "vnp_TxnRef",
    "vnp_TransactionDate",
    "vnp_CreateDate",
    "vnp_IpAddr",
    "vnp_OrderInfo",
)


def _pipe_hash(secret: str, values: list[str]) -> str:
    return hmac.new(secret.encode(), "|".join(values).encode(), hashlib.sha512).hexdigest()


VNPAY_REFUND_FIELDS = (
    "vnp_RequestId",
    "vnp_Version",
    "vnp_Command",
    "vnp_TmnCode",
    "vnp_TransactionType",
    "vnp_TxnRef",
    "vnp_Amount",
    "vnp_TransactionNo",
    "vnp_TransactionDate",
    "vnp_CreateBy",
    "vnp_CreateDate",
    "vnp_IpAddr",
    "vnp_OrderInfo",
)


async def vnpay_refund(http: httpx.AsyncClient, account: Account, refund: Any) -> str:
    """VNPay merchant web API `refund` (2.1.0): full (02) or partial (03) by the paid amount."""
    now = dt.datetime.now(vnpay.GMT7)
    request = {
        "vnp_RequestId": uuid.uuid4().hex,
        "vnp_Version": "2.1.0",
        "vnp_Command": "refund",
        "vnp_TmnCode": account.config["tmn_code"],
        "vnp_TransactionType": "02" if refund["amount_vnd"] == refund["attempt_amount_vnd"] else "03",
        "vnp_TxnRef": refund["order_ref"],
        "vnp_Amount": str(int(refund["amount_vnd"]) * 100),
        "vnp_TransactionNo": str(refund["provider_transaction_id"] or ""),
        "vnp_TransactionDate": refund["attempt_created_at"].astimezone(vnpay.GMT7).strftime("%Y%m%d%H%M%S"),
        "vnp_CreateBy": "telehealth",
        "vnp_CreateDate": now.strftime("%Y%m%d%H%M%S"),
        "vnp_IpAddr": "127.0.0.1",
        "vnp_OrderInfo": f"Hoan tien {refund['order_ref']}",
    }
    request["vnp_SecureHash"] = _pipe_hash(
        account.secret("hash_secret"), [request[k] for k in VNPAY_REFUND_FIELDS]
    )
    answer = await _post(http, account.config["api_url"], json=request)
    if answer.get("vnp_ResponseCode") != "00" or not _vnpay_answer_signed(
        account, answer, VNPAY_REFUND_ANSWER_FIELDS
    ):
        raise ApiError("payment_provider_unavailable")
    return str(answer.get("vnp_TransactionNo") or request["vnp_RequestId"])


_ANSWER_COMMON = (
    "vnp_ResponseId",
    "vnp_Command",
    "vnp_ResponseCode",
    "vnp_Message",
    "vnp_TmnCode",
    "vnp_TxnRef",
    "vnp_Amount",
    "vnp_BankCode",
    "vnp_PayDate",
    "vnp_TransactionNo",
    "vnp_TransactionType",
    "vnp_TransactionStatus",
    "vnp_OrderInfo",
)
VNPAY_QUERY_ANSWER_FIELDS = (*_ANSWER_COMMON, "vnp_PromotionCode", "vnp_PromotionAmount")
VNPAY_REFUND_ANSWER_FIELDS = _ANSWER_COMMON


def _vnpay_answer_signed(account: Account, answer: dict[str, Any], fields: tuple[str, ...]) -> bool:
    """VNPay signs its answers too: a forged answer must not mark anything paid."""
    received = str(answer.get("vnp_SecureHash", "")).lower()
    values = ["" if answer.get(k) is None else str(answer[k]) for k in fields]
    return any(
        hmac.compare_digest(_pipe_hash(secret, values), received) for secret in account.secrets["hash_secret"]
    )
