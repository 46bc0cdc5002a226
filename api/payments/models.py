"""Request and response bodies of the payment routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

import msgspec

from api.payments.ledger import InvoiceStatus

Method = Literal["vnpay", "momo", "zalopay", "vietqr"]


class PaymentCreate(msgspec.Struct, forbid_unknown_fields=True):
    method: Method
    return_url: Annotated[str, msgspec.Meta(max_length=500, pattern=r"^(https?|telehealth)://")] | None = None
    """Where the provider sends the browser or app back (it never marks anything paid)."""


class PaymentOut(msgspec.Struct):
    id: uuid.UUID
    invoice_id: uuid.UUID
    method: Method
    status: Literal["pending", "paid", "failed", "expired", "refunded"]
    amount_vnd: int
    expires_at: dt.datetime
    redirect_url: str | None = None
    """VNPay, MoMo, ZaloPay: the page to open."""
    deeplink: str | None = None
    """MoMo: opens the MoMo app."""
    qr_payload: str | None = None
    """VietQR: the dynamic QR text to render for a banking app (amount and memo included)."""


class InvoiceOut(msgspec.Struct):
    id: uuid.UUID
    patient_id: uuid.UUID
    facility_id: uuid.UUID
    appointment_id: uuid.UUID | None
    amount_vnd: int
    status: InvoiceStatus
    paid_vnd: int
    refunded_vnd: int
    created_at: dt.datetime
    payments: list[PaymentOut]


class InvoicePage(msgspec.Struct):
    items: list[InvoiceOut]
    next_cursor: str | None


RefundStatus = Literal["requested", "done", "failed", "manual"]


class RefundCreate(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    amount_vnd: Annotated[int, msgspec.Meta(gt=0)] | None = None
    """Omitted: everything paid that is not refunded or being refunded yet."""


class RefundConfirm(msgspec.Struct, forbid_unknown_fields=True):
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    """The bank's reference of the transfer the cashier made back to the patient."""


class RefundOut(msgspec.Struct):
    id: uuid.UUID
    invoice_id: uuid.UUID
    facility_id: uuid.UUID
    amount_vnd: int
    status: RefundStatus
    """requested: going to the provider's refund API; manual: a VietQR transfer the cashier must send back;
    done: in the ledger."""
    reason: str
    reference: str | None
    created_at: dt.datetime


class RefundPage(msgspec.Struct):
    items: list[RefundOut]
    next_cursor: str | None
