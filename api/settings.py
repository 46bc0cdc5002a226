"""Settings come from environment variables, validated once at start-up.

Each field reads the variable of the same name in upper case (``database_url`` ←
``DATABASE_URL``), except ``env`` which reads ``TELEHEALTH_ENV``. Dev defaults are safe to
run on a laptop; production refuses to start with any of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

DEV_JWT_SECRET = "dev-only-jwt-secret-not-for-production-use"  # noqa: S105 (a known dev value prod rejects)
DEV_VNEID_AUDIENCE = "telehealth-dev"
ACCESS_TOKEN_TTL_MAX = 15 * 60
# The providers' published sandbox credentials (../shared/reference/payments.md): dev only.
DEV_VNPAY_SECRET = "test_secret"  # noqa: S105
DEV_MOMO_SECRET = "K951B6PE1waDMi640xX08PD3vg6EkVlz"  # noqa: S105
DEV_ZALOPAY_KEY1 = "PcY4iZIKFCIdgZvA6ueMcMHHUbRLYjPL"
DEV_ZALOPAY_KEY2 = "kLtgPl8HHhfvMuDHPwKfgfsY4Ydm9eIz"
DEV_BANK_WEBHOOK_SECRET = "dev-only-bank-webhook-secret"  # noqa: S105


class SettingsError(Exception):
    """A variable is missing or invalid; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    env: Literal["dev", "prod"] = "dev"
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: str = ".data"
    public_base_url: str = "http://127.0.0.1:8000"

    jwt_secret: Annotated[str, msgspec.Meta(min_length=32)] = DEV_JWT_SECRET
    jwt_issuer: str = "telehealth"
    jwt_audience: str = "telehealth-app"
    access_token_ttl: Annotated[int, msgspec.Meta(ge=60, le=ACCESS_TOKEN_TTL_MAX)] = ACCESS_TOKEN_TTL_MAX
    refresh_token_ttl: Annotated[int, msgspec.Meta(ge=3600)] = 30 * 24 * 3600

    vneid_issuer: str | None = None
    vneid_audience: str | None = None
    vneid_jwks_url: str | None = None
    vneid_leeway: Annotated[int, msgspec.Meta(ge=0, le=120)] = 30
    # The dev issuer signs VNeID-shaped ID tokens locally; on by default in dev only.
    dev_issuer: bool | None = None

    db_pool_min: Annotated[int, msgspec.Meta(ge=1)] = 2
    db_pool_max: Annotated[int, msgspec.Meta(ge=1)] = 10
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_000_000
    sign_in_rate_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 20
    outbound_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=30)] = 5.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Push goes through FCM with this Firebase service-account file. Without one, dev sends to
    # a local FCM emulator (notifications/fcm_emulator.py); production refuses to start.
    fcm_credentials_file: str | None = None
    # Another FCM endpoint (messages:send); tests and the benchmark point it at the emulator.
    fcm_endpoint: str | None = None
    # Where the notification worker runs: inside the API process (the dev default) or as
    # separate `telehealth worker` processes (the production default).
    notification_worker: Literal["in_process", "external"] | None = None
    notification_batch_size: Annotated[int, msgspec.Meta(ge=1, le=500)] = 250
    notification_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 10
    # How long a claimed message stays with the worker that claimed it before another may retry it.
    notification_lease_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    notification_poll_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0

    # Booking: how long a prepaid slot is held for payment, how late a visit can be cancelled,
    # how many future visits one patient may have at one facility, and booking attempts per
    # user per minute (so nobody hoards slots).
    booking_hold_minutes: Annotated[int, msgspec.Meta(ge=1, le=120)] = 10
    booking_cancel_cutoff_minutes: Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 60)] = 120
    booking_max_per_facility: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    booking_rate_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 20
    payment_rate_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 20
    # Payment creation per client address: generous, since a commune station's patients may
    # share one address behind its router.
    payment_rate_per_address_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 300
    waitlist_offer_minutes: Annotated[int, msgspec.Meta(ge=1, le=24 * 60)] = 15

    # Payment providers for facilities without their own account in `payment_accounts`. Dev
    # defaults are the providers' public sandbox credentials; production refuses them. A secret
    # may list two values separated by a comma while it is rotated: the first signs, both verify.
    vnpay_tmn_code: str = "TEST_TMN_CODE"
    vnpay_hash_secret: str = DEV_VNPAY_SECRET
    vnpay_pay_url: str = "https://sandbox.vnpayment.vn/paymentv2/vpcpay.html"
    vnpay_api_url: str = "https://sandbox.vnpayment.vn/merchant_webapi/api/transaction"
    momo_partner_code: str = "MOMO"
    momo_access_key: str = "F8BBA842ECF85"
    momo_secret_key: str = DEV_MOMO_SECRET
    momo_endpoint: str = "https://test-payment.momo.vn"
    zalopay_app_id: int = 2553
    zalopay_key1: str = DEV_ZALOPAY_KEY1
    zalopay_key2: str = DEV_ZALOPAY_KEY2
    zalopay_endpoint: str = "https://sb-openapi.zalopay.vn"
    vietqr_bank_bin: str = "970436"
    vietqr_account: str = "0011000000000"
    bank_webhook_secret: str = DEV_BANK_WEBHOOK_SECRET
    payment_minutes: Annotated[int, msgspec.Meta(ge=1, le=24 * 60)] = 15
    """How long a payment attempt stays open (never past the appointment's hold)."""

    @property
    def is_dev(self) -> bool:
        return self.env == "dev"

    @property
    def dev_issuer_enabled(self) -> bool:
        return self.is_dev if self.dev_issuer is None else self.dev_issuer

    @property
    def worker_in_process(self) -> bool:
        if self.notification_worker is None:
            return self.is_dev
        return self.notification_worker == "in_process"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def dev_issuer_url(self) -> str:
        return f"{self.public_base_url.rstrip('/')}/dev/vneid"

    @property
    def vneid(self) -> VneidConfig:
        """The issuer we trust: the configured one, or the embedded dev issuer."""
        if self.vneid_issuer and self.vneid_audience and self.vneid_jwks_url:
            return VneidConfig(self.vneid_issuer, self.vneid_audience, self.vneid_jwks_url)
        return VneidConfig(self.dev_issuer_url, DEV_VNEID_AUDIENCE, f"{self.dev_issuer_url}/jwks.json")


class VneidConfig(msgspec.Struct, frozen=True):
    issuer: str
    audience: str
    jwks_url: str


def _env_name(field: str) -> str:
    return "TELEHEALTH_ENV" if field == "env" else field.upper()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate settings; raise `SettingsError` naming the offending variable."""
    environ = os.environ if environ is None else environ
    raw = {}
    for field in msgspec.structs.fields(Settings):
        value = environ.get(_env_name(field.name))
        if value not in (None, ""):
            raw[field.name] = value
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.(\w+)`", str(exc))
        name = _env_name(match.group(1)) if match else "environment"
        raise SettingsError(f"{name}: {str(exc).split(' - at ')[0]}") from None
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    if settings.db_pool_min > settings.db_pool_max:
        raise SettingsError("DB_POOL_MIN: must not exceed DB_POOL_MAX")
    configured = [settings.vneid_issuer, settings.vneid_audience, settings.vneid_jwks_url]
    if any(configured) and not all(configured):
        missing = [
            name
            for name, value in zip(
                ("VNEID_ISSUER", "VNEID_AUDIENCE", "VNEID_JWKS_URL"), configured, strict=True
            )
            if not value
        ]
        raise SettingsError(f"{', '.join(missing)}: set all three VNeID variables or none")
    if settings.is_dev:
        return
    if settings.jwt_secret == DEV_JWT_SECRET:
        raise SettingsError("JWT_SECRET: production refuses the dev secret")
    if settings.dev_issuer_enabled:
        raise SettingsError("DEV_ISSUER: production refuses the embedded dev issuer")
    if not all(configured):
        raise SettingsError("VNEID_ISSUER: production needs VNEID_ISSUER, VNEID_AUDIENCE and VNEID_JWKS_URL")
    if not settings.database_url:
        raise SettingsError("DATABASE_URL: production refuses the embedded database")
    if not settings.fcm_credentials_file:
        raise SettingsError("FCM_CREDENTIALS_FILE: production needs a Firebase service-account file")
    for name, value, dev_value in (
        ("VNPAY_HASH_SECRET", settings.vnpay_hash_secret, DEV_VNPAY_SECRET),
        ("MOMO_SECRET_KEY", settings.momo_secret_key, DEV_MOMO_SECRET),
        ("ZALOPAY_KEY1", settings.zalopay_key1, DEV_ZALOPAY_KEY1),
        ("ZALOPAY_KEY2", settings.zalopay_key2, DEV_ZALOPAY_KEY2),
        ("BANK_WEBHOOK_SECRET", settings.bank_webhook_secret, DEV_BANK_WEBHOOK_SECRET),
    ):
        if dev_value in secrets_of(value):
            raise SettingsError(f"{name}: production refuses the public sandbox credential")


def secrets_of(value: str) -> list[str]:
    """`new,old` while a secret is rotated: the first signs, every one verifies."""
    return [part.strip() for part in value.split(",") if part.strip()]
