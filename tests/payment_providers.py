"""Local servers that play MoMo, ZaloPay and VNPay for the tests and the benchmark, and a bank notifier.

Each sandbox is a plain ASGI app on uvicorn in a daemon thread, like `notifications.fcm_emulator`:
`start()` returns the sandbox once it listens on a free port (`url`), `stop()` ends it, and it is a
context manager. Controls (`pay`, `fail`, `outage`, `latency`, `reset`, ...) may be called from any
thread; every request is recorded in `requests` as an `Exchange` (unless `keep_records=False`).

    with MomoSandbox() as momo_box:
        answer = httpx.post(f"{momo_box.url}/v2/gateway/api/create", json=body).json()
        ipn = momo_box.pay(body["orderId"])           # the IPN MoMo would POST; not sent
        momo_box.deliver(body["ipnUrl"], ipn)          # optional: POST it for real

Where the sandbox checks a signature that our code makes, it uses the string written out below from
`payments.md` and the providers' docs, not `api.payments.*`, so a wrong field order in our signer
cannot agree with itself: MoMo create/query/refund, ZaloPay query/refund/query_refund, VNPay
querydr/refund. Two exceptions reuse our pure functions because published test vectors already pin
them to the provider (tests/test_payment_wire_formats.py): the ZaloPay create mac
(`zalopay.create_mac`) and the VNPay pay-URL hash (`vnpay.verify`). What the sandbox signs for us to
verify (MoMo IPN: `momo.ipn_signature`; VNPay IPN: `vnpay.sign`) also reuses them; the tests check
those signatures against strings built by hand.

Every time below is Unix milliseconds unless said otherwise; "GMT+7" dates are `yyyyMMddHHmmss`.
Amounts are integer VND except VNPay's `vnp_Amount`, which is VND × 100 as decimal text.

MoMo (`MomoSandbox`, JSON in and out; HTTP 200 when processed, 400 when refused; read `resultCode`)
---------------------------------------------------------------------------------------------------
`POST /v2/gateway/api/create`
  in:  partnerCode, requestId (1..50 chars), amount (JSON integer), orderId (`^[0-9a-zA-Z]([-_.]*[0-9a-zA-Z]+)*$`,
       ≤ 200), orderInfo, redirectUrl, ipnUrl (non-empty), requestType (captureWallet | payWithMethod |
       payWithATM), extraData ("" or base64 of a JSON object), lang (optional: vi | en), signature;
       other fields are ignored.
  signature = hex HMAC-SHA256(secretKey, "accessKey=..&amount=..&extraData=..&ipnUrl=..&orderId=..&orderInfo=..
       &partnerCode=..&redirectUrl=..&requestId=..&requestType=..") (raw values, no encoding).
  out: partnerCode, requestId, orderId, amount, responseTime, message, resultCode, and on 0 also
       payUrl (`{url}/pay/{orderId}`, a GET page), deeplink (`momo://app?action=payWithApp&isScanQR=false
       &serviceType=app&sid=..&v=3.0`), qrCodeUrl (the same with isScanQR=true&serviceType=qr).
       Not signed: MoMo documents no signature on this answer.
  resultCode: 0 created; 20 bad format; 13 unknown partnerCode or bad signature (MoMo: "merchant
       authentication failed ... including the signature"); 40 requestId already used for a different
       request; 22 amount outside 1,000..50,000,000; 41 orderId already used.
  A requestId that passed the signature check is consumed: repeating the identical request answers
  the stored answer again (MoMo's idempotency), anything else with it answers 40.
`POST /v2/gateway/api/query`
  in:  partnerCode, requestId, orderId, lang (optional), signature over "accessKey=..&orderId=..&partnerCode=..&requestId=..".
  out: partnerCode, requestId, orderId, extraData, amount, transId (0 until paid), payType ("" until paid),
       resultCode, message, refundTrans ([{orderId, amount, resultCode, transId, createdTime}]),
       responseTime, lastUpdated. Not signed (as MoMo). resultCode: the order's state: 1000 until
       `pay()`, then what `pay()` set (0 paid, or a failure code); 20 / 13 refused; 42 unknown orderId.
`POST /v2/gateway/api/refund`
  in:  partnerCode, orderId (a new id for the refund), requestId, amount (integer), transId (integer, the
       payment's), lang (optional), description, signature over
       "accessKey=..&amount=..&description=..&orderId=..&partnerCode=..&requestId=..&transId=..".
  out: partnerCode, orderId, requestId, amount, transId (the refund's own id), resultCode, message,
       responseTime. resultCode: 0 refunded; 20; 13; 40 (as create, with idempotent replay);
       41 orderId already used (by a payment or a refund); 42 no paid payment with that transId;
       22 amount < 1,000; 1081 amount more than paid minus earlier refunds.
`GET /pay/{orderId}`: a small HTML page for the order (404 when unknown); paying happens through `pay()`.
IPN body (`pay()` / `ipn_for()`): partnerCode, orderId, requestId (the create's), amount, orderInfo,
  orderType ("momo_wallet"), transId, resultCode, message, payType ("qr"), responseTime, extraData,
  signature (`momo.ipn_signature`, the payments.md IPN string). Integers are JSON integers.

ZaloPay (`ZaloPaySandbox`; bodies form-encoded or JSON; always HTTP 200; read `return_code`)
------------------------------------------------------------------------------------------
return_code 1 success, 2 fail, 3 processing; each answer has return_code, return_message,
sub_return_code, sub_return_message.
`POST /v2/create`
  in:  app_id, app_user, app_trans_id (`yymmdd_...`, today's date in GMT+7, ≤ 40 chars), app_time
       (ms, within 15 min of now), amount (> 0), item (JSON array text), embed_data (JSON object text),
       description, callback_url (optional), bank_code (optional), mac.
  mac = hex HMAC-SHA256(key1, "app_id|app_trans_id|app_user|amount|app_time|embed_data|item"), values as sent.
  out on 1: order_url (`{url}/openinapp?order=<zp_trans_token>`), zp_trans_token, order_token, qr_code
       (a VietQR payload). sub_return_code: 1 ok; -401 bad or missing field, wrong date prefix, app_time
       not recent ms; -402 wrong app_id or mac; -68 duplicate app_trans_id.
`POST /v2/query`
  in:  app_id, app_trans_id, mac = HMAC-SHA256(key1, "app_id|app_trans_id|key1").
  out: + is_processing (false), amount, zp_trans_id (0 until paid), server_time, discount_amount.
       return_code 1 paid, 2 failed (sub_return_code as `fail()` set it) or unknown app_trans_id
       (sub_return_code -54), 3 not paid yet (sub_return_code 3); -401 / -402 refused (return_code 2).
`POST /v2/refund`
  in:  app_id, m_refund_id (`yymmdd_<app_id>_<id>`, today in GMT+7), zp_trans_id, amount, timestamp
       (ms, within 15 min), description, refund_fee_amount (optional), mac = HMAC-SHA256(key1,
       "app_id|zp_trans_id|amount|description|timestamp"), or with refund_fee_amount:
       "app_id|zp_trans_id|amount|refund_fee_amount|description|timestamp".
  out: + refund_id. return_code 1 refunded (3 processing while `refund_processing` is true, until
       `settle_refunds()`); 2 with sub_return_code -401 / -402 as above, -101 no paid payment with that
       zp_trans_id, -102 amount more than paid minus earlier refunds, -68 m_refund_id reused for a
       different request (an identical repeat answers the stored answer).
`POST /v2/query_refund`
  in:  app_id, m_refund_id, timestamp, mac = HMAC-SHA256(key1, "app_id|m_refund_id|timestamp").
  out: return_code 1 done, 3 processing, 2 unknown m_refund_id (-101) or refused.
`GET /openinapp?order=..`: a small HTML page.
Callback (`pay()` / `callback_for()`): {"data": <JSON text>, "mac": hex HMAC-SHA256(key2, data), "type": 1}
  with data = compact JSON of app_id, app_trans_id, app_time, app_user, amount, embed_data, item,
  zp_trans_id, server_time, channel (38), merchant_user_id (""), user_fee_amount, discount_amount.

VNPay (`VnpaySandbox`; API 2.1.0)
--------------------------------
Pay: the browser goes to our pay URL; `GET {url}/paymentv2/vpcpay.html?...` (= `pay_base_url`) checks
  it like `visit()` and answers a small HTML page (200, or 400 with the reason). `visit(pay_url)` does
  the same in process and registers the order as pending; `ipn_params(pay_url, ...)` also builds the
  IPN query parameters: vnp_Amount, vnp_BankCode, vnp_BankTranNo, vnp_CardType, vnp_OrderInfo,
  vnp_PayDate, vnp_ResponseCode, vnp_TmnCode, vnp_TransactionNo, vnp_TransactionStatus, vnp_TxnRef,
  vnp_SecureHash (`vnpay.sign`: sorted, quote_plus, HMAC-SHA512).
`POST /merchant_webapi/api/transaction` (= `api_url`), JSON, always HTTP 200; every answer is signed.
  Values are JSON strings (vnp_Amount and vnp_TransactionNo may also be integers); the checksum is
  hex HMAC-SHA512(hash_secret, values joined with "|"), a missing optional value counting as "".
  querydr in: vnp_RequestId, vnp_Version ("2.1.0"), vnp_Command ("querydr"), vnp_TmnCode, vnp_TxnRef,
    vnp_OrderInfo, vnp_TransactionNo (optional), vnp_TransactionDate (the pay URL's vnp_CreateDate),
    vnp_CreateDate (now, GMT+7), vnp_IpAddr, vnp_SecureHash over `VNPAY_QUERYDR_FIELDS`:
    vnp_RequestId|vnp_Version|vnp_Command|vnp_TmnCode|vnp_TxnRef|vnp_TransactionDate|vnp_CreateDate|vnp_IpAddr|vnp_OrderInfo
  querydr out: vnp_ResponseId, vnp_Command, vnp_ResponseCode, vnp_Message, vnp_TmnCode, vnp_TxnRef,
    vnp_Amount (×100), vnp_BankCode, vnp_PayDate, vnp_TransactionNo, vnp_TransactionType ("01"),
    vnp_TransactionStatus ("01" not completed, "00" paid, or the failed IPN's status), vnp_OrderInfo,
    vnp_PromotionCode (""), vnp_PromotionAmount (""), vnp_SecureHash over `VNPAY_QUERYDR_ANSWER_FIELDS`
    (those fields in that order). Unknown values are "".
  refund in: vnp_RequestId, vnp_Version, vnp_Command ("refund"), vnp_TmnCode, vnp_TransactionType
    ("02" full, "03" partial), vnp_TxnRef, vnp_Amount (refund × 100), vnp_OrderInfo, vnp_TransactionNo
    (optional), vnp_TransactionDate, vnp_CreateBy, vnp_CreateDate, vnp_IpAddr, vnp_SecureHash over
    `VNPAY_REFUND_FIELDS`: vnp_RequestId|vnp_Version|vnp_Command|vnp_TmnCode|vnp_TransactionType|vnp_TxnRef
    |vnp_Amount|vnp_TransactionNo|vnp_TransactionDate|vnp_CreateBy|vnp_CreateDate|vnp_IpAddr|vnp_OrderInfo
  refund out: as querydr without the promotion fields (`VNPAY_REFUND_ANSWER_FIELDS`); vnp_Amount is the
    refund's, vnp_TransactionNo the refund's own number, vnp_TransactionType echoed,
    vnp_TransactionStatus "05" (refund being processed), vnp_PayDate the refund's time.
  vnp_ResponseCode, checked in this order: 03 bad format (missing field, unknown command (answered
    as querydr), version, dates not 14 digits, amount not a positive multiple of 100); 02 wrong vnp_TmnCode; 97 bad checksum;
    94 vnp_RequestId already used (querydr and refund share them); 91 unknown vnp_TxnRef, or
    vnp_TransactionDate / vnp_TransactionNo not the payment's; refund only: 95 payment not paid,
    04 full refund after a partial one, 93 amount more than the rest (or a full refund of another
    amount); 00 success.

Bank transfer (`BankNotifier`): `notice(...)` returns the raw JSON body and headers
`{"Content-Type": "application/json", "X-Signature": hex HMAC-SHA256(secret, body)}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import html
import itertools
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlsplit

import httpx
import msgspec
import uvicorn

from api.payments import momo, vietqr, vnpay, zalopay

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

GMT7 = dt.timezone(dt.timedelta(hours=7), "GMT+7")
_JSON = "application/json; charset=utf-8"
_HTML = "text/html; charset=utf-8"
DELIVERY_TIMEOUT = 10.0  # seconds, for `deliver()`


class SandboxError(ValueError):
    """A control was asked for something the provider would refuse (e.g. a tampered pay URL)."""


# --- Shared machinery ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names
    raw: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # a JSON value, or `str` for HTML
    content_type: str = _JSON

    def encode(self) -> bytes:
        if isinstance(self.body, str):
            return self.body.encode()
        return msgspec.json.encode(self.body)


@dataclass(frozen=True)
class Exchange:
    """One request a sandbox received and what it answered."""

    method: str
    path: str
    query: str
    body: Any  # the JSON object or form fields as received; None when empty or unreadable
    status: int
    answer: Any
    at: float  # time.time() when it arrived


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _gmt7(moment: dt.datetime | None = None) -> dt.datetime:
    return (moment or dt.datetime.now(dt.UTC)).astimezone(GMT7)


def _hmac_hex(key: str, message: str, digest: Callable[..., Any] = hashlib.sha256) -> str:
    return hmac.new(key.encode(), message.encode(), digest).hexdigest()


def _same_hex(expected: str, received: object) -> bool:
    if not isinstance(received, str) or not received:
        return False
    return hmac.compare_digest(expected.encode(), received.lower().encode("utf-8", "replace"))


def _text(value: object) -> str | None:
    """A field's wire text: strings as they are, integers in decimal; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _form(raw: bytes) -> dict[str, str] | None:
    try:
        return dict(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw)))
    except (UnicodeDecodeError, ValueError):
        return None


def _fields(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object (JSON content type, or a body starting with `{`) or as form fields."""
    if request.content_type == "application/json" or request.raw.lstrip()[:1] == b"{":
        return _json_object(request.raw)
    return _form(request.raw)


def _page(title: str, *lines: str) -> str:
    items = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>{items}"


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class _EmbeddedConfig(uvicorn.Config):
    # Leave the logging of the process (tests, the API server, the benchmark) alone.
    def configure_logging(self) -> None:
        pass


def post_json(url: str, body: Mapping[str, Any], *, timeout: float = DELIVERY_TIMEOUT) -> httpx.Response:
    """POST `body` as JSON, as a provider posts a callback."""
    headers = {"Content-Type": "application/json"}
    return httpx.post(url, content=msgspec.json.encode(body), headers=headers, timeout=timeout)


async def apost_json(url: str, body: Mapping[str, Any]) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as client:
        return await client.post(url, content=msgspec.json.encode(body), headers=headers)


Handler = Callable[[Request], Reply]


class _Sandbox:
    """Lifecycle, routing, records and the `outage`/`latency` controls shared by the providers."""

    _thread_name = "payment-sandbox"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, keep_records: bool = True) -> None:
        self.host = host
        self.port = port
        self.keep_records = keep_records
        self.requests: list[Exchange] = []
        # Seconds to wait before answering any request (a slow provider); 0 answers at once.
        self.latency = 0.0
        self._outage: int | None = None
        # Guards the provider state: handlers run on the server thread, controls on the caller's.
        self._lock = threading.RLock()
        self._routes: dict[tuple[str, str], Handler] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle

    def start(self, timeout: float = DELIVERY_TIMEOUT) -> Self:
        """Serve on a daemon thread; returns once serving, with `port` set to the real port."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}: already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        config = _EmbeddedConfig(
            self._asgi,
            access_log=False,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=120,  # longer than httpx's pool expiry: the client closes idle connections
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=self._serve, args=(server, sock), name=self._thread_name, daemon=True
        )
        self._server, self._thread = server, thread
        self.port = sock.getsockname()[1]
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__}: the server on {self.url} did not start")
            time.sleep(0.005)
        return self

    @staticmethod
    def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError(f"{type(self).__name__}: port 0 is chosen at start(); start it first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # Controls

    def outage(self, status: int | None) -> None:
        """While set, every request is answered with HTTP `status` and `{"error": "outage"}`; None ends it."""
        self._outage = status

    def reset(self) -> None:
        """Forget records and provider state; end any outage and latency."""
        with self._lock:
            self.requests.clear()
            self._outage = None
            self.latency = 0.0
            self._reset_state()

    def _reset_state(self) -> None:
        raise NotImplementedError

    def received(self, path: str) -> list[Exchange]:
        """The recorded requests to `path`."""
        return [exchange for exchange in list(self.requests) if exchange.path == path]

    # The ASGI app

    def _fallback(self, request: Request) -> Reply:
        if any(path == request.path for _, path in self._routes):
            return Reply(405, {"error": "method not allowed"})
        return Reply(404, {"error": "not found"})

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        arrived = time.time()
        raw = await _read_body(receive)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        query = scope.get("query_string", b"").decode("latin-1")
        request = Request(scope["method"], scope["path"], query, headers, raw)
        if (status := self._outage) is not None:
            reply = Reply(status, {"error": "outage"})
        else:
            handler = self._routes.get((request.method, request.path))
            try:
                reply = handler(request) if handler is not None else self._fallback(request)
            except Exception as exc:  # a sandbox bug: make it visible to the caller, not a hang
                reply = Reply(500, {"error": f"sandbox error: {exc!r}"})
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if self.keep_records:
            body = _fields(request) if raw else (dict(parse_qsl(query)) if query else None)
            self.requests.append(
                Exchange(request.method, request.path, query, body, reply.status, reply.body, arrived)
            )
        payload = reply.encode()
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", reply.content_type.encode()),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _id_sequence(low: int, high: int) -> Iterator[int]:
    """Increasing ids from a random start, so two sandboxes sharing a database do not collide."""
    return itertools.count(low + secrets.randbelow(high - low))


# --- MoMo ------------------------------------------------------------------------------------

# Written out from payments.md and MoMo's docs, independently of api.payments.momo (see the module doc).
MOMO_CREATE_SIGNED = (
    "accessKey",
    "amount",
    "extraData",
    "ipnUrl",
    "orderId",
    "orderInfo",
    "partnerCode",
    "redirectUrl",
    "requestId",
    "requestType",
)
MOMO_QUERY_SIGNED = ("accessKey", "orderId", "partnerCode", "requestId")
MOMO_REFUND_SIGNED = ("accessKey", "amount", "description", "orderId", "partnerCode", "requestId", "transId")
_MOMO_REQUEST_TYPES = frozenset({"captureWallet", "payWithMethod", "payWithATM"})
_MOMO_ORDER_ID = re.compile(r"[0-9a-zA-Z]([-_.]*[0-9a-zA-Z]+)*")
_MOMO_MESSAGES = {
    0: "Successful.",
    13: "Merchant authentication failed. Please check your credentials, including the signature.",
    20: "Bad format request.",
    22: "Transaction amount is out of range.",
    40: "Duplicated requestId.",
    41: "Duplicated orderId.",
    42: "Invalid orderId or orderId is not found.",
    1000: "Transaction is initiated, waiting for user confirmation.",
    1001: "Transaction failed due to insufficient funds.",
    1003: "Transaction cancelled.",
    1005: "Transaction failed because the url or QR code expired.",
    1006: "Transaction failed because the user denied the confirmation of payment.",
    1081: "Refund rejected: the transaction was already refunded or the amount exceeds the refundable amount.",
    9000: "Transaction is authorized successfully.",
}


def momo_signature(secret_key: str, access_key: str, order: Sequence[str], fields: Mapping[str, Any]) -> str:
    """hex HMAC-SHA256 of `k=v&k=v` in `order`, `accessKey` included; raw values, integers in decimal."""
    values = {**fields, "accessKey": access_key}
    return _hmac_hex(secret_key, "&".join(f"{name}={_text(values.get(name)) or ''}" for name in order))


@dataclass
class MomoOrder:
    order_id: str
    request_id: str
    amount: int
    order_info: str
    extra_data: str
    ipn_url: str
    redirect_url: str
    request_type: str
    lang: str
    created_at: int
    result_code: int = 1000
    trans_id: int = 0
    pay_type: str = ""
    responded_at: int = 0  # when the result was set (the IPN's responseTime)
    refunded: int = 0

    @property
    def status(self) -> Literal["paid", "pending", "failed"]:
        return momo.result_kind(self.result_code)


@dataclass(frozen=True)
class MomoRefund:
    order_id: str  # the refund's own orderId
    request_id: str
    payment_order_id: str
    payment_trans_id: int
    trans_id: int  # the refund's transId
    amount: int
    description: str
    created_at: int


class MomoSandbox(_Sandbox):
    """MoMo's AIO v2 create, query and refund endpoints; `pay()` makes the IPN."""

    _thread_name = "momo-sandbox"

    def __init__(
        self,
        partner_code: str = "MOMO",
        access_key: str = "F8BBA842ECF85",
        secret_key: str = "K951B6PE1waDMi640xX08PD3vg6EkVlz",  # noqa: S107 (MoMo's public sandbox key)
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_records: bool = True,
    ) -> None:
        super().__init__(host=host, port=port, keep_records=keep_records)
        self.partner_code = partner_code
        self.access_key = access_key
        self.secret_key = secret_key
        self.orders: dict[str, MomoOrder] = {}
        self.refunds: list[MomoRefund] = []
        self._by_trans_id: dict[int, MomoOrder] = {}
        self._used_order_ids: set[str] = set()
        self._request_ids: dict[str, tuple[bytes, Reply]] = {}
        self._trans_ids = _id_sequence(2_000_000_000, 9_000_000_000)
        self._routes = {
            ("POST", "/v2/gateway/api/create"): self._create,
            ("POST", "/v2/gateway/api/query"): self._query,
            ("POST", "/v2/gateway/api/refund"): self._refund,
        }

    def _reset_state(self) -> None:
        self.orders.clear()
        self.refunds.clear()
        self._by_trans_id.clear()
        self._used_order_ids.clear()
        self._request_ids.clear()

    # Controls

    def pay(self, order_id: str, result_code: int = 0) -> dict[str, Any]:
        """Settle a pending order with `result_code` (0 paid, or a failure code) and return MoMo's IPN body.

        Nothing is sent. A settled order keeps its state: the body then carries `result_code` with the
        order's transId, which is how a repeated or late (e.g. failed after paid) IPN looks.
        """
        with self._lock:
            order = self.orders[order_id]
            if order.status == "pending":
                order.result_code = result_code
                order.trans_id = next(self._trans_ids)
                order.pay_type = "qr"
                order.responded_at = _now_ms()
                self._by_trans_id[order.trans_id] = order
            return self.ipn_for(order_id, resultCode=result_code)

    def ipn_for(self, order_id: str, *, sign: bool = True, **overrides: Any) -> dict[str, Any]:
        """The IPN body for the order's current state, `overrides` applied.

        Signed after the overrides, unless `sign=False`: then the signature is the one over the body
        before them, as if the overridden fields were changed in transit. A `signature` override wins.
        """
        with self._lock:
            order = self.orders[order_id]
            result_code = overrides.get("resultCode", order.result_code)
            body: dict[str, Any] = {
                "partnerCode": self.partner_code,
                "orderId": order.order_id,
                "requestId": order.request_id,
                "amount": order.amount,
                "orderInfo": order.order_info,
                "orderType": "momo_wallet",
                "transId": order.trans_id,
                "resultCode": order.result_code,
                "message": _MOMO_MESSAGES.get(result_code, "Transaction failed."),
                "payType": order.pay_type or "qr",
                "responseTime": order.responded_at or _now_ms(),
                "extraData": order.extra_data,
            }
        original = momo.ipn_signature(body, self.access_key, self.secret_key)
        body.update({k: v for k, v in overrides.items() if k != "signature"})
        body["signature"] = momo.ipn_signature(body, self.access_key, self.secret_key) if sign else original
        if "signature" in overrides:
            body["signature"] = overrides["signature"]
        return body

    def deliver(
        self, ipn_url: str, body: Mapping[str, Any], *, timeout: float = DELIVERY_TIMEOUT
    ) -> httpx.Response:
        """POST an IPN body to `ipn_url` as MoMo does (JSON); MoMo expects HTTP 204."""
        return post_json(ipn_url, body, timeout=timeout)

    async def adeliver(self, ipn_url: str, body: Mapping[str, Any]) -> httpx.Response:
        return await apost_json(ipn_url, body)

    def sign_query(self, fields: Mapping[str, Any]) -> str:
        """The query request's signature: a convenience for tests; clients sign on their own."""
        return momo_signature(self.secret_key, self.access_key, MOMO_QUERY_SIGNED, fields)

    def sign_refund(self, fields: Mapping[str, Any]) -> str:
        return momo_signature(self.secret_key, self.access_key, MOMO_REFUND_SIGNED, fields)

    # Endpoints

    def _answer(self, result_code: int, body: Mapping[str, Any], **extra: Any) -> Reply:
        lang = body.get("lang") if body.get("lang") in ("vi", "en") else "vi"
        answer: dict[str, Any] = {
            "partnerCode": _text(body.get("partnerCode")) or "",
            "requestId": _text(body.get("requestId")) or "",
            "orderId": _text(body.get("orderId")) or "",
            "amount": body["amount"] if _is_int(body.get("amount")) else 0,
            "responseTime": _now_ms(),
            "message": _MOMO_MESSAGES.get(result_code, "Transaction failed."),
            "resultCode": result_code,
            **extra,
        }
        if lang == "vi" and result_code == 0:
            answer["message"] = "Thành công."
        return Reply(200 if result_code == 0 else 400, answer)

    def _authenticate(self, body: dict[str, Any], order: Sequence[str]) -> bool:
        if body.get("partnerCode") != self.partner_code:
            return False
        expected = momo_signature(self.secret_key, self.access_key, order, body)
        return _same_hex(expected, body.get("signature"))

    def _replay(self, body: dict[str, Any]) -> tuple[bytes, Reply | None]:
        """(fingerprint, stored answer): the stored answer when this requestId was used."""
        fingerprint = msgspec.json.encode(body, order="sorted")
        seen = self._request_ids.get(body["requestId"])
        if seen is None:
            return fingerprint, None
        return fingerprint, seen[1] if seen[0] == fingerprint else self._answer(40, body)

    def _create(self, request: Request) -> Reply:
        body = _json_object(request.raw)
        if body is None:
            return self._answer(20, {})
        strings: tuple[str, ...] = ("partnerCode", "requestId", "orderId", "orderInfo", "redirectUrl")
        strings += ("ipnUrl", "requestType", "extraData", "signature")
        if (
            any(not isinstance(body.get(name), str) for name in strings)
            or not _is_int(body.get("amount"))
            or body.get("lang", "vi") not in ("vi", "en")
            or body["requestType"] not in _MOMO_REQUEST_TYPES
            or not 1 <= len(body["requestId"]) <= 50
            or len(body["orderId"]) > 200
            or not _MOMO_ORDER_ID.fullmatch(body["orderId"])
            or not body["ipnUrl"]
            or not _valid_extra_data(body["extraData"])
        ):
            return self._answer(20, body)
        if not self._authenticate(body, MOMO_CREATE_SIGNED):
            return self._answer(13, body)
        with self._lock:
            fingerprint, replay = self._replay(body)
            if replay is not None:
                return replay
            if not momo.MIN_AMOUNT <= body["amount"] <= momo.MAX_AMOUNT:
                reply = self._answer(22, body)
            elif body["orderId"] in self._used_order_ids:
                reply = self._answer(41, body)
            else:
                order = MomoOrder(
                    order_id=body["orderId"],
                    request_id=body["requestId"],
                    amount=body["amount"],
                    order_info=body["orderInfo"],
                    extra_data=body["extraData"],
                    ipn_url=body["ipnUrl"],
                    redirect_url=body["redirectUrl"],
                    request_type=body["requestType"],
                    lang=body.get("lang", "vi"),
                    created_at=_now_ms(),
                )
                self.orders[order.order_id] = order
                self._used_order_ids.add(order.order_id)
                sid = secrets.token_urlsafe(16)
                link = f"momo://app?action=payWithApp&isScanQR={{}}&serviceType={{}}&sid={sid}&v=3.0"
                reply = self._answer(
                    0,
                    body,
                    payUrl=f"{self.url}/pay/{order.order_id}",
                    deeplink=link.format("false", "app"),
                    qrCodeUrl=link.format("true", "qr"),
                )
            self._request_ids[body["requestId"]] = (fingerprint, reply)
            return reply

    def _query(self, request: Request) -> Reply:
        body = _json_object(request.raw)
        if body is None:
            return self._answer(20, {})
        if any(
            not isinstance(body.get(name), str)
            for name in ("partnerCode", "requestId", "orderId", "signature")
        ):
            return self._answer(20, body)
        if not self._authenticate(body, MOMO_QUERY_SIGNED):
            return self._answer(13, body)
        with self._lock:
            order = self.orders.get(body["orderId"])
            if order is None:
                return self._answer(42, body)
            refund_trans = [
                {
                    "orderId": refund.order_id,
                    "amount": refund.amount,
                    "resultCode": 0,
                    "transId": refund.trans_id,
                    "createdTime": refund.created_at,
                }
                for refund in self.refunds
                if refund.payment_order_id == order.order_id
            ]
            answer = self._answer(0, {**body, "amount": order.amount}).body
            answer.update(
                resultCode=order.result_code,
                message=_MOMO_MESSAGES.get(order.result_code, "Transaction failed."),
                extraData=order.extra_data,
                transId=order.trans_id,
                payType=order.pay_type,
                refundTrans=refund_trans,
                lastUpdated=order.responded_at or order.created_at,
            )
            return Reply(200, answer)

    def _refund(self, request: Request) -> Reply:
        body = _json_object(request.raw)
        if body is None:
            return self._answer(20, {})
        strings = ("partnerCode", "orderId", "requestId", "description", "signature")
        if (
            any(not isinstance(body.get(name), str) for name in strings)
            or not _is_int(body.get("amount"))
            or not _is_int(body.get("transId"))
            or body.get("lang", "vi") not in ("vi", "en")
            or not 1 <= len(body["requestId"]) <= 50
            or not _MOMO_ORDER_ID.fullmatch(body["orderId"])
        ):
            return self._answer(20, body)
        if not self._authenticate(body, MOMO_REFUND_SIGNED):
            return self._answer(13, body)
        with self._lock:
            fingerprint, replay = self._replay(body)
            if replay is not None:
                return replay
            payment = self._by_trans_id.get(body["transId"])
            if body["orderId"] in self._used_order_ids:
                reply = self._answer(41, body)
            elif payment is None or payment.status != "paid":
                reply = self._answer(42, body)
            elif body["amount"] < momo.MIN_AMOUNT:
                reply = self._answer(22, body)
            elif body["amount"] > payment.amount - payment.refunded:
                reply = self._answer(1081, body)
            else:
                refund = MomoRefund(
                    order_id=body["orderId"],
                    request_id=body["requestId"],
                    payment_order_id=payment.order_id,
                    payment_trans_id=payment.trans_id,
                    trans_id=next(self._trans_ids),
                    amount=body["amount"],
                    description=body["description"],
                    created_at=_now_ms(),
                )
                payment.refunded += refund.amount
                self.refunds.append(refund)
                self._used_order_ids.add(refund.order_id)
                reply = self._answer(0, body, transId=refund.trans_id)
            self._request_ids[body["requestId"]] = (fingerprint, reply)
            return reply

    def _fallback(self, request: Request) -> Reply:
        if request.method == "GET" and request.path.startswith("/pay/"):
            order = self.orders.get(request.path.removeprefix("/pay/"))
            if order is None:
                return Reply(404, _page("MoMo sandbox", "Unknown order."), _HTML)
            lines = (f"Order {order.order_id}", f"{order.amount} VND", f"State: {order.status}")
            return Reply(200, _page("MoMo sandbox", *lines), _HTML)
        return super()._fallback(request)


def _valid_extra_data(value: str) -> bool:
    if value == "":
        return True
    try:
        return isinstance(json.loads(base64.b64decode(value, validate=True)), dict)
    except (binascii.Error, ValueError):
        return False


# --- ZaloPay ---------------------------------------------------------------------------------

_ZP_RETURN_MESSAGES = {1: "Giao dịch thành công", 2: "Giao dịch thất bại", 3: "Giao dịch đang xử lý"}
_ZP_SUB_MESSAGES = {
    1: "Giao dịch thành công",
    3: "Giao dịch chưa được thực hiện",
    -54: "TIME_INVALID: giao dịch không tồn tại hoặc đã hết hạn",
    -68: "DUPLICATE_APPS_TRANS_ID",
    -101: "Giao dịch không tồn tại hoặc chưa thanh toán",
    -102: "Số tiền hoàn vượt quá số tiền còn lại",
    -401: "ILLEGAL_DATA_REQUEST",
    -402: "ILLEGAL_APP/SIGNATURE_REQUEST",
}
_ZP_CLOCK_SKEW_MS = 15 * 60 * 1000


@dataclass
class ZaloPayOrder:
    app_trans_id: str
    app_user: str
    app_time: int
    amount: int
    item: str
    embed_data: str
    description: str
    callback_url: str
    bank_code: str
    zp_trans_token: str
    created_at: int
    return_code: int = 3  # 1 paid, 2 failed, 3 not paid yet
    sub_return_code: int = 3
    zp_trans_id: int = 0
    server_time: int = 0
    channel: int = 38
    user_fee_amount: int = 0
    discount_amount: int = 0
    refunded: int = 0

    @property
    def status(self) -> Literal["paid", "pending", "failed"]:
        return "paid" if self.return_code == 1 else "failed" if self.return_code == 2 else "pending"


@dataclass
class ZaloPayRefund:
    m_refund_id: str
    zp_trans_id: int
    app_trans_id: str
    amount: int
    refund_fee_amount: int
    description: str
    timestamp: int
    refund_id: int
    return_code: int  # 1 done, 3 processing


class ZaloPaySandbox(_Sandbox):
    """ZaloPay's OpenAPI v2 create, query, refund and query_refund; `pay()` makes the callback."""

    _thread_name = "zalopay-sandbox"

    def __init__(
        self,
        app_id: int = 2553,
        key1: str = "PcY4iZIKFCIdgZvA6ueMcMHHUbRLYjPL",
        key2: str = "kLtgPl8HHhfvMuDHPwKfgfsY4Ydm9eIz",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_records: bool = True,
    ) -> None:
        super().__init__(host=host, port=port, keep_records=keep_records)
        self.app_id = app_id
        self.key1 = key1
        self.key2 = key2
        # True: refunds answer 3 (processing) and stay so until `settle_refunds()`, as ZaloPay's often do.
        self.refund_processing = False
        self.orders: dict[str, ZaloPayOrder] = {}
        self.refunds: dict[str, ZaloPayRefund] = {}  # by m_refund_id
        self._by_zp_trans_id: dict[int, ZaloPayOrder] = {}
        self._refund_requests: dict[str, tuple[bytes, Reply]] = {}
        self._trans_numbers = _id_sequence(1, 500_000_000)
        self._refund_ids = _id_sequence(10**12, 9 * 10**12)
        self._routes = {
            ("POST", "/v2/create"): self._create,
            ("POST", "/v2/query"): self._query,
            ("POST", "/v2/refund"): self._refund,
            ("POST", "/v2/query_refund"): self._query_refund,
        }

    def _reset_state(self) -> None:
        self.refund_processing = False
        self.orders.clear()
        self.refunds.clear()
        self._by_zp_trans_id.clear()
        self._refund_requests.clear()

    # Controls

    def pay(self, app_trans_id: str, *, channel: int = 38, discount_amount: int = 0) -> dict[str, Any]:
        """Mark a pending order paid and return the callback body ZaloPay would POST (not sent).

        An order already paid keeps its state and gives the same body again (a retried callback).
        """
        with self._lock:
            order = self.orders[app_trans_id]
            if order.status == "failed":
                raise SandboxError(f"{app_trans_id} failed; ZaloPay sends no callback for it")
            if order.status == "pending":
                order.return_code, order.sub_return_code = 1, 1
                order.server_time = _now_ms()
                order.zp_trans_id = int(f"{_gmt7():%y%m%d}{next(self._trans_numbers):09d}")
                order.channel, order.discount_amount = channel, discount_amount
                self._by_zp_trans_id[order.zp_trans_id] = order
            return self.callback_for(app_trans_id)

    def fail(self, app_trans_id: str, sub_return_code: int = -1) -> None:
        """Mark a pending order failed; ZaloPay sends no callback for failures, the query API tells."""
        with self._lock:
            order = self.orders[app_trans_id]
            if order.status == "pending":
                order.return_code, order.sub_return_code = 2, sub_return_code
                order.server_time = _now_ms()

    def settle_refunds(self) -> None:
        """Complete every refund still processing."""
        with self._lock:
            for refund in self.refunds.values():
                refund.return_code = 1

    def callback_for(self, app_trans_id: str, *, sign: bool = True, **overrides: Any) -> dict[str, Any]:
        """The callback body for the order's current state, `overrides` applied to the data fields.

        `mac` is over the data after the overrides, unless `sign=False` (then it is over the data
        before them: tampered in transit); a `mac` override sets it outright.
        """
        with self._lock:
            order = self.orders[app_trans_id]
            data: dict[str, Any] = {
                "app_id": self.app_id,
                "app_trans_id": order.app_trans_id,
                "app_time": order.app_time,
                "app_user": order.app_user,
                "amount": order.amount,
                "embed_data": order.embed_data,
                "item": order.item,
                "zp_trans_id": order.zp_trans_id,
                "server_time": order.server_time or _now_ms(),
                "channel": order.channel,
                "merchant_user_id": "",
                "user_fee_amount": order.user_fee_amount,
                "discount_amount": order.discount_amount,
            }
        original = _compact_json(data)
        data.update({k: v for k, v in overrides.items() if k != "mac"})
        text = _compact_json(data)
        mac = _hmac_hex(self.key2, text if sign else original)
        return {"data": text, "mac": overrides.get("mac", mac), "type": 1}

    def deliver(
        self, callback_url: str, body: Mapping[str, Any], *, timeout: float = DELIVERY_TIMEOUT
    ) -> httpx.Response:
        """POST a callback body to `callback_url` as ZaloPay does (JSON)."""
        return post_json(callback_url, body, timeout=timeout)

    async def adeliver(self, callback_url: str, body: Mapping[str, Any]) -> httpx.Response:
        return await apost_json(callback_url, body)

    def query_mac(self, app_trans_id: str) -> str:
        """The query request's mac: a convenience for tests; clients compute their own."""
        return _hmac_hex(self.key1, f"{self.app_id}|{app_trans_id}|{self.key1}")

    def refund_mac(
        self,
        zp_trans_id: int | str,
        amount: int,
        description: str,
        timestamp: int,
        refund_fee_amount: int | None = None,
    ) -> str:
        parts = [
            self.app_id,
            zp_trans_id,
            amount,
            *([refund_fee_amount] if refund_fee_amount is not None else []),
        ]
        return _hmac_hex(self.key1, "|".join(str(part) for part in [*parts, description, timestamp]))

    def query_refund_mac(self, m_refund_id: str, timestamp: int) -> str:
        return _hmac_hex(self.key1, f"{self.app_id}|{m_refund_id}|{timestamp}")

    # Endpoints

    @staticmethod
    def _answer(return_code: int, sub_return_code: int, **extra: Any) -> Reply:
        body = {
            "return_code": return_code,
            "return_message": _ZP_RETURN_MESSAGES[return_code],
            "sub_return_code": sub_return_code,
            "sub_return_message": _ZP_SUB_MESSAGES.get(sub_return_code, "Giao dịch thất bại"),
            **extra,
        }
        return Reply(200, body)

    def _read(
        self, request: Request, names: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, str] | None:
        """The named fields as wire text, or None when one is missing or not a string/integer."""
        body = _fields(request)
        if body is None:
            return None
        values: dict[str, str] = {}
        for name in (*names, *optional):
            if name not in body and name in optional:
                continue
            text = _text(body.get(name))
            if text is None:
                return None
            values[name] = text
        return values

    def _recent(self, millis: str) -> bool:
        return millis.isdigit() and abs(int(millis) - _now_ms()) <= _ZP_CLOCK_SKEW_MS

    def _create(self, request: Request) -> Reply:
        names = ("app_id", "app_user", "app_trans_id", "app_time", "amount", "item", "embed_data")
        fields = self._read(request, (*names, "description", "mac"), ("callback_url", "bank_code"))
        if fields is None or not _is_json(fields["item"], list) or not _is_json(fields["embed_data"], dict):
            return self._answer(2, -401)
        today = f"{_gmt7():%y%m%d}_"
        trans_id = fields["app_trans_id"]
        if (
            not _canonical_int(fields["amount"])
            or int(fields["amount"]) <= 0
            or not trans_id.startswith(today)
            or len(trans_id) == len(today)
            or len(trans_id) > zalopay.APP_TRANS_ID_MAX
            or not _canonical_int(fields["app_time"])
            or not self._recent(fields["app_time"])
        ):
            return self._answer(2, -401)
        # Integers are canonical decimal here, so the mac over them is the mac over the wire text.
        expected = zalopay.create_mac(
            app_id=fields["app_id"],
            app_trans_id=trans_id,
            app_user=fields["app_user"],
            amount=int(fields["amount"]),
            app_time=int(fields["app_time"]),
            embed_data=fields["embed_data"],
            item=fields["item"],
            key1=self.key1,
        )
        if fields["app_id"] != str(self.app_id) or not _same_hex(expected, fields["mac"]):
            return self._answer(2, -402)
        with self._lock:
            if trans_id in self.orders:
                return self._answer(2, -68)
            token = secrets.token_urlsafe(24)
            order = ZaloPayOrder(
                app_trans_id=trans_id,
                app_user=fields["app_user"],
                app_time=int(fields["app_time"]),
                amount=int(fields["amount"]),
                item=fields["item"],
                embed_data=fields["embed_data"],
                description=fields["description"],
                callback_url=fields.get("callback_url", ""),
                bank_code=fields.get("bank_code", ""),
                zp_trans_token=token,
                created_at=_now_ms(),
            )
            self.orders[trans_id] = order
        qr_code = vietqr.build_payload(
            bank_bin="970454",
            account=f"99ZP{self.app_id}"[: vietqr.ACCOUNT_MAX],
            amount_vnd=order.amount,
            memo=trans_id.replace("_", "")[: vietqr.MEMO_MAX],
            dynamic=True,
        )
        return self._answer(
            1,
            1,
            order_url=f"{self.url}/openinapp?order={token}",
            zp_trans_token=token,
            order_token=token,
            qr_code=qr_code,
        )

    def _query(self, request: Request) -> Reply:
        fields = self._read(request, ("app_id", "app_trans_id", "mac"))
        if fields is None:
            return self._answer(2, -401)
        expected = _hmac_hex(self.key1, f"{fields['app_id']}|{fields['app_trans_id']}|{self.key1}")
        if fields["app_id"] != str(self.app_id) or not _same_hex(expected, fields["mac"]):
            return self._answer(2, -402)
        with self._lock:
            order = self.orders.get(fields["app_trans_id"])
            if order is None:
                return self._answer(
                    2, -54, is_processing=False, amount=0, zp_trans_id=0, server_time=_now_ms()
                )
            return self._answer(
                order.return_code,
                order.sub_return_code,
                is_processing=False,
                amount=order.amount,
                zp_trans_id=order.zp_trans_id,
                server_time=order.server_time or _now_ms(),
                discount_amount=order.discount_amount,
            )

    def _refund(self, request: Request) -> Reply:
        names = ("app_id", "m_refund_id", "zp_trans_id", "amount", "timestamp", "description", "mac")
        fields = self._read(request, names, ("refund_fee_amount",))
        if fields is None:
            return self._answer(2, -401)
        prefix = f"{_gmt7():%y%m%d}_{self.app_id}_"
        fee = fields.get("refund_fee_amount")
        if (
            not fields["amount"].isdigit()
            or int(fields["amount"]) <= 0
            or not fields["zp_trans_id"].isdigit()
            or (fee is not None and not fee.isdigit())
            or not fields["m_refund_id"].startswith(prefix)
            or len(fields["m_refund_id"]) == len(prefix)
            or not self._recent(fields["timestamp"])
        ):
            return self._answer(2, -401)
        parts = [
            fields["app_id"],
            fields["zp_trans_id"],
            fields["amount"],
            *([fee] if fee is not None else []),
        ]
        expected = _hmac_hex(self.key1, "|".join([*parts, fields["description"], fields["timestamp"]]))
        if fields["app_id"] != str(self.app_id) or not _same_hex(expected, fields["mac"]):
            return self._answer(2, -402)
        fingerprint = msgspec.json.encode(fields, order="sorted")
        with self._lock:
            seen = self._refund_requests.get(fields["m_refund_id"])
            if seen is not None:
                return seen[1] if seen[0] == fingerprint else self._answer(2, -68)
            payment = self._by_zp_trans_id.get(int(fields["zp_trans_id"]))
            amount = int(fields["amount"])
            if payment is None or payment.status != "paid":
                reply = self._answer(2, -101)
            elif amount > payment.amount - payment.refunded:
                reply = self._answer(2, -102)
            else:
                refund = ZaloPayRefund(
                    m_refund_id=fields["m_refund_id"],
                    zp_trans_id=payment.zp_trans_id,
                    app_trans_id=payment.app_trans_id,
                    amount=amount,
                    refund_fee_amount=int(fee or 0),
                    description=fields["description"],
                    timestamp=int(fields["timestamp"]),
                    refund_id=next(self._refund_ids),
                    return_code=3 if self.refund_processing else 1,
                )
                payment.refunded += amount
                self.refunds[refund.m_refund_id] = refund
                reply = self._answer(refund.return_code, refund.return_code, refund_id=refund.refund_id)
            self._refund_requests[fields["m_refund_id"]] = (fingerprint, reply)
            return reply

    def _query_refund(self, request: Request) -> Reply:
        fields = self._read(request, ("app_id", "m_refund_id", "timestamp", "mac"))
        if fields is None:
            return self._answer(2, -401)
        expected = _hmac_hex(self.key1, f"{fields['app_id']}|{fields['m_refund_id']}|{fields['timestamp']}")
        if fields["app_id"] != str(self.app_id) or not _same_hex(expected, fields["mac"]):
            return self._answer(2, -402)
        with self._lock:
            refund = self.refunds.get(fields["m_refund_id"])
            if refund is None:
                return self._answer(2, -101)
            return self._answer(refund.return_code, refund.return_code)

    def _fallback(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == "/openinapp":
            token = dict(parse_qsl(request.query)).get("order", "")
            with self._lock:
                order = next((o for o in self.orders.values() if o.zp_trans_token == token), None)
            if order is None:
                return Reply(404, _page("ZaloPay sandbox", "Unknown order."), _HTML)
            lines = (f"Order {order.app_trans_id}", f"{order.amount} VND", f"State: {order.status}")
            return Reply(200, _page("ZaloPay sandbox", *lines), _HTML)
        return super()._fallback(request)


def _canonical_int(text: str) -> bool:
    """Decimal digits without leading zeros: the text `str(int)` gives back."""
    return text.isdigit() and text == str(int(text))


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _is_json(text: str, kind: type) -> bool:
    try:
        return isinstance(json.loads(text), kind)
    except ValueError:
        return False


# --- VNPay -----------------------------------------------------------------------------------

# Written out from VNPay's merchant web API docs (2.1.0), independently of any client code.
VNPAY_QUERYDR_FIELDS = (
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
VNPAY_REFUND_ANSWER_FIELDS = (
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
VNPAY_QUERYDR_ANSWER_FIELDS = (*VNPAY_REFUND_ANSWER_FIELDS, "vnp_PromotionCode", "vnp_PromotionAmount")
_VNP_MESSAGES = {
    "00": "Request success",
    "02": "Merchant is not valid",
    "03": "Invalid data format",
    "04": "Full refund is not allowed after a partial refund",
    "91": "Transaction not found",
    "93": "Invalid refund amount",
    "94": "Duplicate request",
    "95": "The transaction was not successful at VNPAY; refund refused",
    "97": "Invalid checksum",
    "99": "Other error",
}
_VNP_DATE = re.compile(r"\d{14}")


def vnpay_checksum(secret: str, names: Sequence[str], values: Mapping[str, Any]) -> str:
    """hex HMAC-SHA512 of the `names` values joined with `|`; a missing value counts as ""."""
    return _hmac_hex(secret, "|".join(_text(values.get(name)) or "" for name in names), hashlib.sha512)


@dataclass
class VnpayOrder:
    txn_ref: str
    amount: int  # VND (vnp_Amount / 100)
    order_info: str
    create_date: str
    bank_code: str
    return_url: str
    params: dict[str, str]  # the pay URL's parameters as received
    transaction_status: str = "01"  # 01 not completed, 00 paid, else failed
    response_code: str = ""
    transaction_no: str = ""
    pay_date: str = ""
    refunded: int = 0  # VND
    partially_refunded: bool = False

    @property
    def status(self) -> Literal["paid", "pending", "failed"]:
        if self.transaction_status == "01":
            return "pending"
        return "paid" if self.transaction_status == "00" and self.response_code == "00" else "failed"


@dataclass(frozen=True)
class VnpayRefund:
    request_id: str
    txn_ref: str
    amount: int  # VND
    transaction_type: str  # 02 full, 03 partial
    transaction_no: str  # the refund's own number
    create_by: str
    created_at: str  # GMT+7 yyyyMMddHHmmss


class VnpaySandbox(_Sandbox):
    """VNPay 2.1.0: the pay page (checks our pay URL), the IPN parameters, querydr and refund."""

    _thread_name = "vnpay-sandbox"
    PAY_PATH = "/paymentv2/vpcpay.html"
    API_PATH = "/merchant_webapi/api/transaction"

    def __init__(
        self,
        tmn_code: str = "TEST_TMN_CODE",
        hash_secret: str = "test_secret",  # noqa: S107 (the payments.md test vector's secret)
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_records: bool = True,
    ) -> None:
        super().__init__(host=host, port=port, keep_records=keep_records)
        self.tmn_code = tmn_code
        self.hash_secret = hash_secret
        self.orders: dict[str, VnpayOrder] = {}
        self.refunds: list[VnpayRefund] = []
        self._request_ids: set[str] = set()
        self._transaction_numbers = _id_sequence(10_000_000, 90_000_000)
        self._routes = {
            ("GET", self.PAY_PATH): self._pay_page,
            ("POST", self.API_PATH): self._api,
        }

    def _reset_state(self) -> None:
        self.orders.clear()
        self.refunds.clear()
        self._request_ids.clear()

    @property
    def pay_base_url(self) -> str:
        return f"{self.url}{self.PAY_PATH}"

    @property
    def api_url(self) -> str:
        return f"{self.url}{self.API_PATH}"

    # Controls

    def visit(self, pay_url: str) -> VnpayOrder:
        """What the gateway does when the browser arrives: check the pay URL and register the order.

        Raises `SandboxError` on a bad signature, a missing or malformed parameter, another merchant,
        or a TxnRef already used for a different amount or already settled.
        """
        return self._register(pay_url, settled_ok=False)

    def _register(self, pay_url: str, *, settled_ok: bool) -> VnpayOrder:
        params = dict(parse_qsl(urlsplit(pay_url).query, keep_blank_values=True))
        problem = self._pay_problem(params)
        if problem:
            raise SandboxError(problem)
        with self._lock:
            order = self.orders.get(params["vnp_TxnRef"])
            amount = int(params["vnp_Amount"]) // 100
            if order is not None:
                if order.amount != amount or (order.status != "pending" and not settled_ok):
                    raise SandboxError(f"vnp_TxnRef {order.txn_ref} is already used")
                return order
            order = VnpayOrder(
                txn_ref=params["vnp_TxnRef"],
                amount=amount,
                order_info=params["vnp_OrderInfo"],
                create_date=params["vnp_CreateDate"],
                bank_code=params.get("vnp_BankCode", ""),
                return_url=params["vnp_ReturnUrl"],
                params=params,
            )
            self.orders[order.txn_ref] = order
            return order

    def ipn_params(
        self,
        pay_url: str,
        *,
        response_code: str = "00",
        transaction_status: str | None = None,
        sign: bool = True,
        **overrides: str,
    ) -> dict[str, str]:
        """Check `pay_url` (as `visit`, but a settled order is fine), settle it, return the IPN parameters.

        `transaction_status` defaults to "00" for response code "00", "02" otherwise. A pending order
        takes that outcome; a settled one keeps its state and transaction number (a repeated or late
        IPN). Signed after `overrides` unless `sign=False` (then over the parameters before them); a
        `vnp_SecureHash` override wins.
        """
        status = transaction_status or ("00" if response_code == "00" else "02")
        order = self._register(pay_url, settled_ok=True)
        with self._lock:
            if not order.transaction_no:
                order.transaction_no = str(next(self._transaction_numbers))
                order.pay_date = f"{_gmt7():%Y%m%d%H%M%S}"
                order.bank_code = order.bank_code or "NCB"
            if order.status == "pending":
                order.response_code, order.transaction_status = response_code, status
            params = {
                "vnp_Amount": str(order.amount * 100),
                "vnp_BankCode": order.bank_code,
                "vnp_BankTranNo": f"VNP{order.transaction_no}",
                "vnp_CardType": "ATM",
                "vnp_OrderInfo": order.order_info,
                "vnp_PayDate": order.pay_date,
                "vnp_ResponseCode": response_code,
                "vnp_TmnCode": self.tmn_code,
                "vnp_TransactionNo": order.transaction_no,
                "vnp_TransactionStatus": status,
                "vnp_TxnRef": order.txn_ref,
            }
        original = vnpay.sign(params, self.hash_secret)
        params.update({k: v for k, v in overrides.items() if k != "vnp_SecureHash"})
        params["vnp_SecureHash"] = vnpay.sign(params, self.hash_secret) if sign else original
        if "vnp_SecureHash" in overrides:
            params["vnp_SecureHash"] = overrides["vnp_SecureHash"]
        return params

    def deliver(
        self, ipn_url: str, params: Mapping[str, str], *, timeout: float = DELIVERY_TIMEOUT
    ) -> httpx.Response:
        """Call the IPN URL as VNPay does: GET with the parameters in the query."""
        return httpx.get(ipn_url, params=dict(params), timeout=timeout)

    async def adeliver(self, ipn_url: str, params: Mapping[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as client:
            return await client.get(ipn_url, params=dict(params))

    def sign_request(self, body: Mapping[str, Any]) -> str:
        """A merchant API request's vnp_SecureHash (querydr or refund, by vnp_Command): for tests."""
        names = VNPAY_REFUND_FIELDS if body.get("vnp_Command") == "refund" else VNPAY_QUERYDR_FIELDS
        return vnpay_checksum(self.hash_secret, names, body)

    # Endpoints

    def _pay_problem(self, params: Mapping[str, str]) -> str | None:
        required = (
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
        )
        if missing := [name for name in required if not params.get(name)]:
            return f"missing {', '.join(missing)}"
        if "vnp_SecureHashType" in params:
            return "vnp_SecureHashType is not sent with 2.1.0"
        if not vnpay.verify(params, [self.hash_secret]):
            return "invalid signature"
        amount = params["vnp_Amount"]
        checks = {
            "vnp_Version must be 2.1.0": params["vnp_Version"] == "2.1.0",
            "vnp_Command must be pay": params["vnp_Command"] == "pay",
            "unknown vnp_TmnCode": params["vnp_TmnCode"] == self.tmn_code,
            "vnp_Amount must be a positive multiple of 100": amount.isdigit()
            and int(amount) > 0
            and int(amount) % 100 == 0,
            "vnp_CreateDate must be yyyyMMddHHmmss": bool(_VNP_DATE.fullmatch(params["vnp_CreateDate"])),
            "vnp_ExpireDate must be yyyyMMddHHmmss": bool(
                _VNP_DATE.fullmatch(params.get("vnp_ExpireDate", "0" * 14))
            ),
            "vnp_CurrCode must be VND": params["vnp_CurrCode"] == "VND",
            "vnp_Locale must be vn or en": params["vnp_Locale"] in ("vn", "en"),
        }
        return next((problem for problem, ok in checks.items() if not ok), None)

    def _pay_page(self, request: Request) -> Reply:
        try:
            order = self.visit(f"{self.PAY_PATH}?{request.query}")
        except SandboxError as exc:
            return Reply(400, _page("VNPAY sandbox", f"Error: {exc}"), _HTML)
        return Reply(200, _page("VNPAY sandbox", f"Order {order.txn_ref}", f"{order.amount} VND"), _HTML)

    def _api_answer(self, command: str, code: str, body: Mapping[str, Any], **values: str) -> Reply:
        names = VNPAY_REFUND_ANSWER_FIELDS if command == "refund" else VNPAY_QUERYDR_ANSWER_FIELDS
        answer = dict.fromkeys(names, "")
        answer.update(
            vnp_ResponseId=uuid.uuid4().hex,
            vnp_Command=command,
            vnp_ResponseCode=code,
            vnp_Message=_VNP_MESSAGES[code],
            vnp_TmnCode=_text(body.get("vnp_TmnCode")) or "",
            vnp_TxnRef=_text(body.get("vnp_TxnRef")) or "",
        )
        answer.update(values)
        answer["vnp_SecureHash"] = vnpay_checksum(self.hash_secret, names, answer)
        return Reply(200, answer)

    def _api(self, request: Request) -> Reply:
        body = _json_object(request.raw)
        if body is None:
            return self._api_answer("querydr", "03", {})
        command = body.get("vnp_Command")
        if command not in ("querydr", "refund"):
            return self._api_answer("querydr", "03", body)
        signed = VNPAY_REFUND_FIELDS if command == "refund" else VNPAY_QUERYDR_FIELDS
        optional = {"vnp_TransactionNo"}
        texts = {name: _text(body.get(name)) for name in (*signed, "vnp_SecureHash")}
        amount = (texts.get("vnp_Amount") or "0") if command == "refund" else "100"
        if (
            any(value is None and name not in optional for name, value in texts.items())
            or any(not value for name, value in texts.items() if name not in optional)
            or texts["vnp_Version"] != "2.1.0"
            or not _VNP_DATE.fullmatch(texts["vnp_TransactionDate"] or "")
            or not _VNP_DATE.fullmatch(texts["vnp_CreateDate"] or "")
            or not amount.isdigit()
            or int(amount) <= 0
            or int(amount) % 100
            or (command == "refund" and texts["vnp_TransactionType"] not in ("02", "03"))
        ):
            return self._api_answer(command, "03", body)
        if texts["vnp_TmnCode"] != self.tmn_code:
            return self._api_answer(command, "02", body)
        if not _same_hex(vnpay_checksum(self.hash_secret, signed, body), texts["vnp_SecureHash"]):
            return self._api_answer(command, "97", body)
        with self._lock:
            request_id = texts["vnp_RequestId"] or ""
            if request_id in self._request_ids:
                return self._api_answer(command, "94", body)
            self._request_ids.add(request_id)
            order = self.orders.get(texts["vnp_TxnRef"] or "")
            transaction_no = _text(body.get("vnp_TransactionNo"))
            if (
                order is None
                or order.create_date != texts["vnp_TransactionDate"]
                or (transaction_no and transaction_no != order.transaction_no)
            ):
                return self._api_answer(command, "91", body)
            if command == "querydr":
                return self._api_answer(
                    command,
                    "00",
                    body,
                    vnp_Amount=str(order.amount * 100),
                    vnp_BankCode=order.bank_code if order.transaction_no else "",
                    vnp_PayDate=order.pay_date,
                    vnp_TransactionNo=order.transaction_no,
                    vnp_TransactionType="01",
                    vnp_TransactionStatus=order.transaction_status,
                    vnp_OrderInfo=order.order_info,
                )
            return self._refund(order, texts, body)

    def _refund(self, order: VnpayOrder, texts: Mapping[str, str | None], body: Mapping[str, Any]) -> Reply:
        amount = int(texts["vnp_Amount"] or 0) // 100
        full = texts["vnp_TransactionType"] == "02"
        if order.status != "paid":
            return self._api_answer("refund", "95", body)
        if full and order.partially_refunded:
            return self._api_answer("refund", "04", body)
        if amount > order.amount - order.refunded or (full and amount != order.amount):
            return self._api_answer("refund", "93", body)
        refund = VnpayRefund(
            request_id=texts["vnp_RequestId"] or "",
            txn_ref=order.txn_ref,
            amount=amount,
            transaction_type=texts["vnp_TransactionType"] or "",
            transaction_no=str(next(self._transaction_numbers)),
            create_by=texts["vnp_CreateBy"] or "",
            created_at=f"{_gmt7():%Y%m%d%H%M%S}",
        )
        order.refunded += amount
        order.partially_refunded = order.partially_refunded or not full
        self.refunds.append(refund)
        return self._api_answer(
            "refund",
            "00",
            body,
            vnp_Amount=str(amount * 100),
            vnp_BankCode=order.bank_code,
            vnp_PayDate=refund.created_at,
            vnp_TransactionNo=refund.transaction_no,
            vnp_TransactionType=refund.transaction_type,
            vnp_TransactionStatus="05",
            vnp_OrderInfo=texts["vnp_OrderInfo"] or "",
        )


# --- Bank-transfer notices -------------------------------------------------------------------


@dataclass
class BankNotifier:
    """Makes the signed webhook a bank or aggregator sends for an incoming transfer."""

    secret: str
    header: str = "X-Signature"
    sent: list[bytes] = field(default_factory=list)

    def sign(self, body: bytes) -> str:
        """hex HMAC-SHA256 of the raw body."""
        return hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()

    def notice(
        self,
        reference: str,
        account: str,
        amount: int,
        memo: str,
        received_at: dt.datetime | str,
        **extra: Any,
    ) -> tuple[bytes, dict[str, str]]:
        """(raw JSON body, headers) for one transfer; `extra` adds fields of the bank's own.

        `received_at` is written in ISO 8601; a datetime must carry its offset.
        """
        if isinstance(received_at, dt.datetime):
            if received_at.utcoffset() is None:
                raise ValueError("received_at must be timezone-aware")
            received_at = received_at.isoformat()
        payload = {
            "reference": reference,
            "account": account,
            "amount": amount,
            "memo": memo,
            "received_at": received_at,
            **extra,
        }
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        self.sent.append(body)
        return body, {"Content-Type": "application/json", self.header: self.sign(body)}

    def deliver(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float = DELIVERY_TIMEOUT
    ) -> httpx.Response:
        return httpx.post(url, content=body, headers=dict(headers), timeout=timeout)

    async def adeliver(self, url: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as client:
            return await client.post(url, content=body, headers=dict(headers))
