"""Random sequences of what happens to a prepaid booking's payments, checked against the ledger.

A Hypothesis state machine books one held appointment per example and then, in any order:
starts attempts with any method, delivers the providers' callbacks (valid, repeated, failed,
wrong amount), lets the hold run out (housekeeping), reconciles, cancels and refunds. After every
step the invariants hold: the invoice state is the one its ledger implies, at most one attempt is
paid, every paid (or paid-twice-and-given-back) attempt has exactly one payment in the ledger,
refunds never exceed payments, nobody gets two receipts for one attempt, and nothing answers 5xx.

The app, the pool and the HTTP client live on a private event loop in a thread (Hypothesis drives
steps synchronously); each step is sent there with `asyncio.run_coroutine_threadsafe`. The
providers are the loopback sandboxes of tests/payment_providers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from api.booking.housekeeping import expire_and_offer
from api.db import FairPool, create_pool
from api.errors import ApiError
from api.payments import ledger, reconcile, refunds
from api.settings import Settings
from tests.conftest import make_settings
from tests.factories import OwnClinic, Session, clinic_at, clinic_today, own_clinic, serve, sessions_for_many
from tests.payment_providers import BankNotifier, MomoSandbox, VnpaySandbox, ZaloPaySandbox

HOME = "PK-BINHAN"
PRICE = 120_000
BANK_SECRET = "stateful-bank-secret"
SLOTS_PER_DAY = 95  # 00:00-23:45 in 15-minute slots


class World:
    """The private loop, the app on it, a pool, and the sandboxes: shared by all examples."""

    def __init__(self, settings: Settings, boxes: tuple[MomoSandbox, ZaloPaySandbox, VnpaySandbox]) -> None:
        self.settings = settings
        self.momo, self.zalo, self.vnpay = boxes
        self.bank = BankNotifier(BANK_SECRET)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stateful-loop", daemon=True)
        self.thread.start()
        self._stop: asyncio.Event | None = None
        self._host: Any = None
        self.app: httpx.AsyncClient
        self.pool: FairPool
        self.outbound: httpx.AsyncClient
        self.clinic: OwnClinic
        self.next_slot = 0
        self.seen: list[str] = []  # each example's final invoice state
        self.run(self._open())

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self) -> None:
        self.pool = await create_pool(self.settings.database_url or "", min_size=1, max_size=4)
        self.outbound = httpx.AsyncClient(timeout=10)
        ready: asyncio.Future[httpx.AsyncClient] = self.loop.create_future()
        self._stop = asyncio.Event()

        async def host() -> None:  # the app's lifespan starts and ends in this one task
            async with serve(self.settings) as client:
                ready.set_result(client)
                assert self._stop is not None
                await self._stop.wait()

        self._host = asyncio.ensure_future(host())
        self.app = await ready
        async with self.pool.acquire() as conn:
            self.clinic = await own_clinic(
                conn, HOME, prepaid=True, price=PRICE, windows=(("00:00", "23:45"),), horizon_days=60
            )

    async def _close(self) -> None:
        assert self._stop is not None
        self._stop.set()
        await self._host
        await self.outbound.aclose()
        await self.pool.close()

    def close(self) -> None:
        self.run(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def slot(self) -> dt.datetime:
        n = self.next_slot
        self.next_slot += 1
        day = clinic_today() + dt.timedelta(days=2 + n // SLOTS_PER_DAY)
        minutes = (n % SLOTS_PER_DAY) * 15
        return clinic_at(day, f"{minutes // 60:02d}:{minutes % 60:02d}")


@pytest.fixture(scope="module")
def world(database_url: str, redis_url: str, issuer: Any) -> Iterator[World]:
    with MomoSandbox() as momo_box, ZaloPaySandbox() as zalo_box, VnpaySandbox() as vnpay_box:
        config = make_settings(
            database_url,
            redis_url,
            issuer,
            momo_endpoint=momo_box.url,
            zalopay_endpoint=zalo_box.url,
            vnpay_pay_url=vnpay_box.pay_base_url,
            vnpay_api_url=vnpay_box.api_url,
            public_base_url="https://api.telehealth.test",
            bank_webhook_secret=BANK_SECRET,
        )
        world = World(config, (momo_box, zalo_box, vnpay_box))
        try:
            yield world
        finally:
            world.close()


class PaymentMachine(RuleBasedStateMachine):
    world: World  # set on the subclass made per test

    attempts = Bundle("attempts")

    def __init__(self) -> None:
        super().__init__()
        self.patient: Session
        self.invoice_id: uuid.UUID
        self.appointment_id: uuid.UUID
        self.last: dict[str, tuple[str, Any]] = {}  # attempt id -> (how, what) last delivered
        self.statuses: list[int] = []

    # -- plumbing --------------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.world.run(coro)

    def answered(self, response: httpx.Response) -> httpx.Response:
        self.statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        return response

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.world.pool.acquire() as conn:
            return list(await conn.fetch(query, *args))

    def fetch(self, query: str, *args: Any) -> list[Any]:
        return self.run(self._fetch(query, *args))

    async def _ref(self, attempt_id: str) -> str:
        async with self.world.pool.acquire() as conn:
            ref: str = await conn.fetchval(
                "SELECT order_ref FROM payment_attempts WHERE id = $1", uuid.UUID(attempt_id)
            )
            return ref

    # -- the booking -------------------------------------------------------------------------------

    def book(self) -> None:
        async def go() -> None:
            async with self.world.pool.acquire() as conn:
                self.patient = (await sessions_for_many(conn, self.world.settings, 1))[0]
            response = await self.world.app.post(
                "/v1/appointments",
                json=self.world.clinic.booking(self.world.slot()),
                headers={**self.patient.headers, "Idempotency-Key": str(uuid.uuid4())},
            )
            assert response.status_code == 201, response.text
            body = response.json()
            self.invoice_id = uuid.UUID(body["invoice_id"])
            self.appointment_id = uuid.UUID(body["id"])

        self.run(go())

    @initialize(target=attempts, method=st.sampled_from(["vnpay", "momo", "zalopay", "vietqr"]))
    def first_attempt(self, method: str) -> Any:
        """Book the held appointment, then start paying it."""
        self.book()
        return self.start(method)

    # -- rules -----------------------------------------------------------------------------------

    @rule(target=attempts, method=st.sampled_from(["vnpay", "momo", "zalopay", "vietqr"]))
    def start(self, method: str) -> Any:
        async def go() -> httpx.Response:
            return await self.world.app.post(
                f"/v1/invoices/{self.invoice_id}/payments",
                json={"method": method},
                headers={**self.patient.headers, "Idempotency-Key": str(uuid.uuid4())},
            )

        response = self.answered(self.run(go()))
        if response.status_code == 201:
            payment = response.json()
            assert payment["amount_vnd"] == PRICE
            payment["order_ref"] = self.run(self._ref(payment["id"]))
            return payment
        assert response.status_code == 409, response.text
        assert response.json()["code"] in ("invoice_not_payable", "hold_expired"), response.text
        invoice = self.fetch("SELECT status FROM invoices WHERE id = $1", self.invoice_id)[0]["status"]
        held = self.fetch(
            "SELECT status, hold_expires_at <= now() AS over FROM appointments WHERE invoice_id = $1",
            self.invoice_id,
        )
        assert invoice != "pending" or not held or held[0]["status"] != "held" or held[0]["over"]
        return multiple()

    @rule(attempt=attempts, kind=st.sampled_from(["valid", "valid", "duplicate", "failed", "wrong_amount"]))
    def callback(self, attempt: dict[str, Any], kind: str) -> None:
        if kind == "duplicate":
            if attempt["id"] not in self.last:
                return
            how, what = self.last[attempt["id"]]
        else:
            made = self._make(attempt, kind)
            if made is None:
                return
            how, what = made
            self.last[attempt["id"]] = (how, what)
        response = self.answered(self.run(self._deliver(how, what)))
        self._check_answer(how, response)

    @rule(attempt=attempts, kind=st.sampled_from(["valid", "duplicate"]))
    def callback_again(self, attempt: dict[str, Any], kind: str) -> None:
        self.callback(attempt, kind)

    def _make(self, attempt: dict[str, Any], kind: str) -> tuple[str, Any] | None:
        w, ref, method = self.world, attempt["order_ref"], attempt["method"]
        if method == "vnpay":
            url = attempt["redirect_url"]
            order = w.vnpay.orders.get(ref)
            if kind == "wrong_amount":
                return "vnpay", w.vnpay.ipn_params(url, vnp_Amount=str((PRICE + 1_000) * 100))
            if kind == "failed":
                return "vnpay", w.vnpay.ipn_params(url, response_code="24")
            if order is not None and order.status == "failed":  # VNPay reports what happened
                return "vnpay", w.vnpay.ipn_params(
                    url, response_code=order.response_code, transaction_status=order.transaction_status
                )
            return "vnpay", w.vnpay.ipn_params(url)
        if method == "momo":
            mo_order = w.momo.orders[ref]
            if kind == "wrong_amount":
                return "momo", w.momo.ipn_for(ref, amount=PRICE + 1_000)
            if kind == "failed":
                return "momo", w.momo.pay(ref, result_code=1006)
            if mo_order.status == "failed":
                return "momo", w.momo.ipn_for(ref)
            return "momo", w.momo.pay(ref)
        if method == "zalopay":
            zp_order = w.zalo.orders[ref]
            if kind == "failed":
                w.zalo.fail(ref)  # ZaloPay sends nothing for a failure; reconciliation finds it
                return None
            if zp_order.status == "failed":
                return None
            if kind == "wrong_amount":
                if zp_order.status == "pending":
                    w.zalo.pay(ref)
                return "zalopay", w.zalo.callback_for(ref, amount=PRICE - 1_000)
            return "zalopay", w.zalo.pay(ref)
        if kind == "failed":
            return None  # a bank transfer does not fail: it arrives or not
        amount = PRICE - 1_000 if kind == "wrong_amount" else PRICE
        return "bank", w.bank.notice(
            f"FT{uuid.uuid4().hex[:14].upper()}",
            "0011000000000",
            amount,
            f"MBVCB.{uuid.uuid4().int % 10**8}.{ref}.CT",
            dt.datetime.now(dt.UTC),
        )

    async def _deliver(self, how: str, what: Any) -> httpx.Response:
        app = self.world.app
        if how == "vnpay":
            return await app.get(f"/v1/payments/callbacks/vnpay?{urlencode(what)}")
        if how == "bank":
            body, headers = what
            return await app.post("/v1/payments/callbacks/bank-transfer", content=body, headers=headers)
        path = "momo" if how == "momo" else "zalopay"
        return await app.post(
            f"/v1/payments/callbacks/{path}",
            content=msgspec.json.encode(what),
            headers={"Content-Type": "application/json"},
        )

    @staticmethod
    def _check_answer(how: str, response: httpx.Response) -> None:
        if how == "vnpay":
            assert response.json()["RspCode"] in ("00", "02", "04"), response.text
        elif how == "momo":
            assert response.status_code == 204, response.text
        elif how == "zalopay":
            assert response.json()["return_code"] == 1, response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["status"] in ("applied", "duplicate", "unmatched"), response.text

    @rule()
    def hold_runs_out(self) -> None:
        async def go() -> None:
            async with self.world.pool.acquire() as conn:
                await conn.execute(
                    """UPDATE appointments SET hold_expires_at = now() - interval '1 millisecond'
                        WHERE invoice_id = $1 AND status = 'held'""",
                    self.invoice_id,
                )
            await expire_and_offer(self.world.pool, self.world.settings)

        self.run(go())

    @rule()
    def reconcile_due(self) -> None:
        async def go() -> None:
            async with self.world.pool.acquire() as conn:
                await conn.execute(
                    """UPDATE payment_attempts SET expires_at = now() - interval '1 minute', last_checked_at = NULL
                        WHERE invoice_id = $1 AND status = 'pending'""",
                    self.invoice_id,
                )
            await reconcile.reconcile(
                self.world.pool, self.world.settings, self.world.outbound, dt.datetime.now(dt.UTC)
            )

        self.run(go())

    @rule(how=st.sampled_from(["cancel", "all", "part", "send"]))
    def give_back(self, how: str) -> None:
        """Cancel the visit (a paid one is refunded), ask a refund of all or part, or send refunds."""

        async def go() -> httpx.Response | None:
            if how == "cancel":
                rows = await self._fetch("SELECT id FROM appointments WHERE invoice_id = $1", self.invoice_id)
                if rows:
                    return await self.world.app.post(
                        f"/v1/appointments/{rows[0]['id']}/cancel", headers=self.patient.headers
                    )
            elif how in ("all", "part"):
                async with self.world.pool.acquire() as conn:
                    with contextlib.suppress(ApiError):
                        async with conn.transaction():
                            amount = None if how == "all" else 20_000
                            await refunds.refund_invoice(conn, self.invoice_id, amount, "stateful test")
            await refunds.send_requested(self.world.pool, self.world.settings, self.world.outbound)
            return None

        response = self.run(go())
        if response is not None:
            self.answered(response)
            assert response.status_code in (200, 409), response.text

    def teardown(self) -> None:
        if hasattr(self, "invoice_id"):
            status = self.fetch("SELECT status FROM invoices WHERE id = $1", self.invoice_id)[0]["status"]
            self.world.seen.append(status)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def ledger_agrees(self) -> None:
        if not hasattr(self, "invoice_id"):
            return
        row = self.fetch(
            """SELECT i.status, i.amount_vnd,
                      coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'payment'), 0) AS paid,
                      coalesce(sum(l.amount_vnd) FILTER (WHERE l.kind = 'refund'), 0) AS refunded
                 FROM invoices i LEFT JOIN ledger_entries l ON l.invoice_id = i.id
                WHERE i.id = $1 GROUP BY i.id""",
            self.invoice_id,
        )[0]
        assert row["status"] == ledger.invoice_status(
            int(row["amount_vnd"]), int(row["paid"]), int(row["refunded"]), voided=row["status"] == "void"
        ), dict(row)
        assert row["refunded"] <= row["paid"], dict(row)
        done = self.fetch(
            "SELECT coalesce(sum(amount_vnd), 0) AS s FROM refunds WHERE invoice_id = $1 AND status = 'done'",
            self.invoice_id,
        )[0]["s"]
        assert done == row["refunded"]

    @invariant()
    def one_payment_per_paid_attempt(self) -> None:
        if not hasattr(self, "invoice_id"):
            return
        attempts = self.fetch(
            """SELECT p.status,
                      (SELECT count(*) FROM ledger_entries l WHERE l.attempt_id = p.id AND l.kind = 'payment') AS entries,
                      (SELECT count(*) FROM notifications n
                        WHERE n.dedupe_key LIKE 'payment:' || p.id || ':payment_received:%') AS receipts
                 FROM payment_attempts p WHERE p.invoice_id = $1""",
            self.invoice_id,
        )
        assert sum(a["status"] == "paid" for a in attempts) <= 1, attempts
        for a in attempts:
            assert a["entries"] == (1 if a["status"] in ("paid", "refunded") else 0), attempts
            assert a["receipts"] <= 1, attempts

    @invariant()
    def a_booked_visit_is_paid_for(self) -> None:
        if not hasattr(self, "invoice_id"):
            return
        rows = self.fetch(
            """SELECT a.status, (SELECT count(*) FROM ledger_entries l
                                  WHERE l.invoice_id = a.invoice_id AND l.kind = 'payment') AS payments
                 FROM appointments a WHERE a.invoice_id = $1""",
            self.invoice_id,
        )
        for r in rows:
            if r["status"] == "booked":
                assert r["payments"] >= 1, rows
        assert len(rows) <= 1, rows  # the invoice belongs to one appointment at a time


def test_random_payment_histories_keep_the_ledger_and_invoice_in_step(world: World) -> None:
    machine = type("Machine", (PaymentMachine,), {"world": world})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # The runs went somewhere: in some of them money moved.
    assert {"paid", "refunded", "partially_refunded"} & set(world.seen), world.seen
