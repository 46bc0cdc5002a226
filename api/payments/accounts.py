"""Which merchant account a facility takes payments with, per provider.

A facility's own account lives in `payment_accounts`; without one, the default account from
the settings is used (in dev, the providers' public sandbox). Secrets are lists: while a key
is rotated two are active, the first signs and every one verifies. No secret ever leaves
this module in a response or a log line.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Literal

import asyncpg
import msgspec

from api.errors import ApiError
from api.payments import queries
from api.settings import Settings, secrets_of

Provider = Literal["vnpay", "momo", "zalopay", "vietqr"]
PROVIDERS: tuple[Provider, ...] = ("vnpay", "momo", "zalopay", "vietqr")


class Account(msgspec.Struct, frozen=True):
    provider: str
    config: dict[str, Any]
    secrets: dict[str, list[str]]

    def secret(self, name: str) -> str:
        """The secret that signs."""
        return self.secrets[name][0]


@functools.lru_cache(maxsize=64)  # settings never change while a process runs
def default_account(settings: Settings, provider: str) -> Account:
    if provider == "vnpay":
        return Account(
            provider,
            {
                "tmn_code": settings.vnpay_tmn_code,
                "pay_url": settings.vnpay_pay_url,
                "api_url": settings.vnpay_api_url,
            },
            {"hash_secret": secrets_of(settings.vnpay_hash_secret)},
        )
    if provider == "momo":
        return Account(
            provider,
            {
                "partner_code": settings.momo_partner_code,
                "access_key": settings.momo_access_key,
                "endpoint": settings.momo_endpoint,
            },
            {"secret_key": secrets_of(settings.momo_secret_key)},
        )
    if provider == "zalopay":
        return Account(
            provider,
            {"app_id": settings.zalopay_app_id, "endpoint": settings.zalopay_endpoint},
            {"key1": secrets_of(settings.zalopay_key1), "key2": secrets_of(settings.zalopay_key2)},
        )
    return Account(provider, {"bank_bin": settings.vietqr_bank_bin, "account": settings.vietqr_account}, {})


async def account_for(
    conn: asyncpg.Connection, settings: Settings, facility_id: uuid.UUID, provider: str
) -> Account:
    row = await queries.account(conn, facility_id, provider)
    if row is None:
        return default_account(settings, provider)
    return _own_account(provider, row["enabled"], row["config"], row["secrets"])


def account_of_attempt(settings: Settings, attempt: asyncpg.Record) -> Account:
    """The account an attempt found by `queries.find_attempt` is paid to (read with it, so a
    rotated secret counts from the next report on)."""
    provider = attempt["provider"]
    if attempt["account_enabled"] is None:
        return default_account(settings, provider)
    return _own_account(
        provider, attempt["account_enabled"], attempt["account_config"], attempt["account_secrets"]
    )


def _own_account(provider: str, enabled: bool, config: str, secrets: str) -> Account:
    if not enabled:
        raise ApiError("payment_method_unavailable")
    return Account(provider, msgspec.json.decode(config), msgspec.json.decode(secrets))
