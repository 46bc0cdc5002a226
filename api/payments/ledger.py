"""The invoice's state follows from the money that moved: a plain function of the ledger.

    pending → paid → refunded | partially_refunded
    pending → void            (its hold expired or its visit was cancelled before payment)

Money is never inferred from a state: every payment and refund is a row in `ledger_entries`
(append-only), and the state stored on the invoice is recomputed from those rows in the same
transaction that adds one. A test sums the ledger and compares.
"""

from __future__ import annotations

from typing import Literal

InvoiceStatus = Literal["pending", "paid", "refunded", "partially_refunded", "void"]


def invoice_status(amount_vnd: int, paid_vnd: int, refunded_vnd: int, *, voided: bool) -> InvoiceStatus:
    """`voided`: nothing was paid and the invoice was given up (the stored state was `void`).

    Judged on what is kept (paid minus refunded) against what is owed, so an invoice paid twice
    whose second payment went back is simply `paid`.
    """
    if paid_vnd <= 0:
        return "void" if voided else "pending"
    if refunded_vnd <= 0:
        return "paid"
    kept = paid_vnd - refunded_vnd
    if kept <= 0:
        return "refunded"
    if kept >= amount_vnd:
        return "paid"
    return "partially_refunded"
