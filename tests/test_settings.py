"""Settings: safe dev defaults; production refuses to start on any of them and names the variable."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from api.settings import DEV_JWT_SECRET, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
TELEHEALTH = ROOT / ".venv" / "bin" / "telehealth"

PROD_SECRET = "s3cr3t-" + "x" * 40
PROD: dict[str, str] = {
    "TELEHEALTH_ENV": "prod",
    "JWT_SECRET": PROD_SECRET,
    "DATABASE_URL": "postgresql://telehealth@db.internal:5432/telehealth",
    "REDIS_URL": "redis://cache.internal:6379/0",
    "PUBLIC_BASE_URL": "https://api.telehealth.example",
    "VNEID_ISSUER": "https://vneid.gov.vn",
    "VNEID_AUDIENCE": "telehealth-dienbien",
    "VNEID_JWKS_URL": "https://vneid.gov.vn/.well-known/jwks.json",
    "FCM_CREDENTIALS_FILE": "/run/secrets/firebase-service-account.json",
    "VNPAY_HASH_SECRET": "vnpay-" + "y" * 32,
    "MOMO_SECRET_KEY": "momo-" + "z" * 32,
    "ZALOPAY_KEY1": "zalo1-" + "a" * 32,
    "ZALOPAY_KEY2": "zalo2-" + "b" * 32,
    "BANK_WEBHOOK_SECRET": "bank-" + "c" * 32,
}


def refused(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    return str(caught.value)


def without(name: str) -> dict[str, str]:
    return {k: v for k, v in PROD.items() if k != name}


def test_defaults_are_dev():
    settings = load_settings({})
    assert settings.env == "dev"
    assert settings.is_dev
    assert settings.dev_issuer_enabled
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.jwt_secret == DEV_JWT_SECRET
    assert settings.access_token_ttl <= 15 * 60
    # With no VNeID configured, dev trusts the embedded dev issuer on its own base URL.
    assert settings.vneid.issuer == "http://127.0.0.1:8000/dev/vneid"
    assert settings.vneid.jwks_url == "http://127.0.0.1:8000/dev/vneid/jwks.json"


def test_load_settings_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("ACCESS_TOKEN_TTL", "600")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    settings = load_settings()
    assert settings.access_token_ttl == 600
    assert settings.log_level == "WARNING"


def test_values_are_converted_from_strings():
    settings = load_settings(
        {
            "ACCESS_TOKEN_TTL": "300",
            "DEV_ISSUER": "false",
            "OUTBOUND_TIMEOUT_SECONDS": "2.5",
            "MAX_BODY_BYTES": "2048",
        }
    )
    assert settings.access_token_ttl == 300
    assert settings.dev_issuer is False and not settings.dev_issuer_enabled
    assert settings.outbound_timeout_seconds == 2.5
    assert settings.max_body_bytes == 2048


def test_empty_variables_count_as_unset():
    assert load_settings({"DATABASE_URL": "", "ACCESS_TOKEN_TTL": ""}) == load_settings({})


def test_complete_prod_config_loads():
    settings = load_settings(PROD)
    assert settings.env == "prod"
    assert not settings.is_dev
    assert not settings.dev_issuer_enabled
    assert settings.jwt_secret == PROD_SECRET
    assert settings.vneid.issuer == "https://vneid.gov.vn"
    assert settings.vneid.audience == "telehealth-dienbien"
    assert settings.vneid.jwks_url == "https://vneid.gov.vn/.well-known/jwks.json"


def test_prod_refuses_the_dev_jwt_secret():
    message = refused({**PROD, "JWT_SECRET": DEV_JWT_SECRET})
    assert message.startswith("JWT_SECRET")


def test_prod_refuses_a_missing_jwt_secret():
    assert refused(without("JWT_SECRET")).startswith("JWT_SECRET")


def test_prod_refuses_the_dev_issuer():
    assert refused({**PROD, "DEV_ISSUER": "true"}).startswith("DEV_ISSUER")


@pytest.mark.parametrize("name", ["VNEID_ISSUER", "VNEID_AUDIENCE", "VNEID_JWKS_URL"])
def test_prod_refuses_missing_vneid(name):
    assert name in refused(without(name))


def test_prod_refuses_no_vneid_at_all():
    environ = {k: v for k, v in PROD.items() if not k.startswith("VNEID_")}
    assert refused(environ).startswith("VNEID_ISSUER")


def test_prod_refuses_missing_database_url():
    """Production never falls back to the embedded database."""
    assert refused(without("DATABASE_URL")).startswith("DATABASE_URL")


def test_prod_refuses_to_run_without_push_credentials():
    """Production never sends to the local FCM emulator."""
    assert refused(without("FCM_CREDENTIALS_FILE")).startswith("FCM_CREDENTIALS_FILE")


@pytest.mark.parametrize(
    ("name", "sandbox"),
    [
        ("VNPAY_HASH_SECRET", "test_secret"),
        ("MOMO_SECRET_KEY", "K951B6PE1waDMi640xX08PD3vg6EkVlz"),
        ("ZALOPAY_KEY2", "new-key-of-ours," + "kLtgPl8HHhfvMuDHPwKfgfsY4Ydm9eIz"),
        ("BANK_WEBHOOK_SECRET", "dev-only-bank-webhook-secret"),
    ],
)
def test_prod_refuses_payment_sandbox_credentials(name, sandbox):
    assert refused({**PROD, name: sandbox}).startswith(name)


def test_worker_runs_in_process_in_dev_and_apart_in_prod():
    assert load_settings({}).worker_in_process
    assert not load_settings(PROD).worker_in_process
    assert not load_settings({"NOTIFICATION_WORKER": "external"}).worker_in_process


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"VNEID_ISSUER": "https://vneid.gov.vn"}, ["VNEID_AUDIENCE", "VNEID_JWKS_URL"]),
        ({"VNEID_AUDIENCE": "a", "VNEID_JWKS_URL": "https://x/jwks.json"}, ["VNEID_ISSUER"]),
        ({"VNEID_ISSUER": "https://i", "VNEID_AUDIENCE": "a"}, ["VNEID_JWKS_URL"]),
    ],
)
def test_some_vneid_variables_are_refused_even_in_dev(given, missing):
    """Half a VNeID config would silently fall back to the dev issuer: refuse it instead."""
    message = refused(given)
    for name in missing:
        assert name in message
    prod_message = refused({**{k: v for k, v in PROD.items() if not k.startswith("VNEID_")}, **given})
    for name in missing:
        assert name in prod_message


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"ACCESS_TOKEN_TTL": "99999"}, "ACCESS_TOKEN_TTL"),
        ({"ACCESS_TOKEN_TTL": "abc"}, "ACCESS_TOKEN_TTL"),
        ({"ACCESS_TOKEN_TTL": "10"}, "ACCESS_TOKEN_TTL"),
        ({"JWT_SECRET": "too-short"}, "JWT_SECRET"),
        ({"TELEHEALTH_ENV": "staging"}, "TELEHEALTH_ENV"),
        ({"TELEHEALTH_ENV": "production"}, "TELEHEALTH_ENV"),
        ({"REFRESH_TOKEN_TTL": "60"}, "REFRESH_TOKEN_TTL"),
        ({"VNEID_LEEWAY": "3600"}, "VNEID_LEEWAY"),
        ({"DB_POOL_MIN": "0"}, "DB_POOL_MIN"),
        ({"DB_POOL_MIN": "20", "DB_POOL_MAX": "5"}, "DB_POOL_MIN"),
        ({"MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES"),
        ({"SIGN_IN_RATE_PER_MINUTE": "0"}, "SIGN_IN_RATE_PER_MINUTE"),
        ({"OUTBOUND_TIMEOUT_SECONDS": "0"}, "OUTBOUND_TIMEOUT_SECONDS"),
        ({"OUTBOUND_TIMEOUT_SECONDS": "600"}, "OUTBOUND_TIMEOUT_SECONDS"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ({"DEV_ISSUER": "maybe"}, "DEV_ISSUER"),
    ],
)
def test_bad_value_names_the_variable(environ, name):
    message = refused(environ)
    assert message.startswith(f"{name}:"), message
    # The same mistake is caught in production too, with the same name.
    assert refused({**PROD, **environ}).startswith(f"{name}:")


def test_a_refused_secret_is_not_echoed():
    secret = "short-but-secret"
    message = refused({**PROD, "JWT_SECRET": secret})
    assert message.startswith("JWT_SECRET")
    assert secret not in message


def test_settings_are_frozen():
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.env = "prod"  # type: ignore[misc]
    assert isinstance(settings, Settings)


# --- the real command ---------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, **extra}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"JWT_SECRET": DEV_JWT_SECRET}, "JWT_SECRET"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"ACCESS_TOKEN_TTL": "99999"}, "ACCESS_TOKEN_TTL"),
    ],
)
def test_serve_refuses_to_start_and_says_why(tmp_path, overrides, name):
    env = _clean_env(**{**PROD, "DATA_DIR": str(tmp_path), **overrides})
    started = time.monotonic()
    result = subprocess.run(
        [str(TELEHEALTH), "serve", "--port", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 15, elapsed
    assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert DEV_JWT_SECRET not in result.stderr
    # It stopped before touching anything: no embedded database was created.
    assert not (tmp_path / "postgres").exists()
