"""Every error is an RFC 9457 problem: one shape, a stable code, a message in the caller's language."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

import api.directory.queries

PROBLEM_KEYS = {"type", "title", "status", "code", "detail", "request_id"}
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
# What would betray internals if it reached a client.
LEAK_MARKERS = ("Traceback", 'File "', "Exception", "Error:", "asyncpg", "litestar", ".py", "line ")

VI = {
    "validation_failed": "Dữ liệu gửi lên không hợp lệ.",
    "not_found": "Không tìm thấy.",
    "method_not_allowed": "Phương thức không được hỗ trợ.",
    "body_too_large": "Nội dung yêu cầu quá lớn.",
    "unauthorized": "Cần đăng nhập.",
    "internal_error": "Đã xảy ra lỗi, vui lòng thử lại.",
}
EN = {
    "validation_failed": "The request is not valid.",
    "not_found": "Not found.",
    "method_not_allowed": "Method not allowed.",
    "body_too_large": "The request body is too large.",
    "unauthorized": "Authentication is required.",
    "internal_error": "Something went wrong; please try again.",
}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The common contract of every error response; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/problem+json"
    body = response.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].startswith("https://") and body["type"].endswith(f"/{code}")
    assert body["title"]
    assert body["request_id"] == response.headers["x-request-id"]
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "default-src 'none'" in response.headers["content-security-policy"]
    for marker in LEAK_MARKERS:
        assert marker not in response.text, marker
    return body


# --- language -------------------------------------------------------------------------------------


async def _error_of_each_kind(client: Any, headers: dict[str, str]) -> list[tuple[str, httpx.Response]]:
    return [
        ("not_found", await client.get("/v1/no-such-thing", headers=headers)),
        ("validation_failed", await client.post("/v1/auth/vneid", json={}, headers=headers)),
        ("method_not_allowed", await client.delete("/health/live", headers=headers)),
        ("unauthorized", await client.get("/v1/me", headers=headers)),
        (
            "body_too_large",
            await client.post("/v1/auth/vneid", json={"id_token": "x" * 70_000}, headers=headers),
        ),
    ]


async def test_errors_are_in_vietnamese_by_default(client):
    for code, response in await _error_of_each_kind(client, {}):
        body = assert_problem(response, response.status_code, code)
        assert body["detail"] == VI[code]


@pytest.mark.parametrize("accept", ["en", "en-US,en;q=0.9", "EN-gb"])
async def test_errors_are_in_english_when_asked(client, accept):
    for code, response in await _error_of_each_kind(client, {"Accept-Language": accept}):
        body = assert_problem(response, response.status_code, code)
        assert body["detail"] == EN[code]


@pytest.mark.parametrize("accept", ["vi-VN,vi;q=0.9,en;q=0.8", "fr-FR", "*", ""])
async def test_vietnamese_is_kept_unless_english_comes_first(client, accept):
    body = assert_problem(
        await client.get("/v1/nowhere", headers={"Accept-Language": accept}), 404, "not_found"
    )
    assert body["detail"] == VI["not_found"]


# --- validation -----------------------------------------------------------------------------------


async def test_missing_field_is_named(client):
    body = assert_problem(await client.post("/v1/auth/vneid", json={}), 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["id_token"]
    assert body["errors"][0]["message"]


async def test_wrong_type_is_named(client):
    body = assert_problem(
        await client.post("/v1/auth/vneid", json={"id_token": 12345}), 422, "validation_failed"
    )
    assert [e["field"] for e in body["errors"]] == ["id_token"]
    assert "str" in body["errors"][0]["message"]


async def test_unknown_field_is_refused_and_named(client):
    """A client cannot slip extra properties (e.g. a role) into a request body."""
    body = assert_problem(
        await client.post("/v1/auth/vneid", json={"id_token": "x" * 40, "role": "admin"}),
        422,
        "validation_failed",
    )
    assert [e["field"] for e in body["errors"]] == ["role"]


async def test_too_short_value_is_named(client):
    body = assert_problem(
        await client.post("/v1/auth/vneid", json={"id_token": "short"}), 422, "validation_failed"
    )
    assert [e["field"] for e in body["errors"]] == ["id_token"]


async def test_bad_query_parameter_is_named(client):
    body = assert_problem(await client.get("/v1/facilities?limit=abc"), 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["limit"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"id_token": ', b"[]", b'"a string"', b"\xff\xfe\x00", b""],
    ids=["garbage", "truncated", "array", "string", "binary", "empty"],
)
async def test_malformed_body_is_a_client_error(client, content):
    response = await client.post(
        "/v1/auth/vneid", content=content, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code, "validation_failed")


# --- size, routing ------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413(client, settings):
    assert settings.max_body_bytes == 64_000
    body = assert_problem(
        await client.post("/v1/auth/vneid", json={"id_token": "a" * (settings.max_body_bytes + 10)}),
        413,
        "body_too_large",
    )
    assert body["detail"] == VI["body_too_large"]


async def test_streamed_body_over_the_limit_is_413(app, settings):
    """Without a Content-Length to check, the limit still holds while the body is read.

    The test client cannot stream a request body, so this speaks ASGI to the app directly, as uvicorn
    would for a chunked upload. The body is refused before the handler (Redis, database) runs.
    """
    chunk = b"a" * 8192
    chunks = [b'{"refresh_token": "', *[chunk] * (settings.max_body_bytes // len(chunk) + 2), b'"}']
    received: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        body = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        received.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/auth/refresh",
        "raw_path": b"/v1/auth/refresh",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in received if m["type"] == "http.response.start")
    assert start["status"] == 413
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert headers["content-type"] == "application/problem+json"
    body = b"".join(m.get("body", b"") for m in received if m["type"] == "http.response.body")
    assert b'"code":"body_too_large"' in body
    assert len(chunks) > 0, "the whole body was read before refusing it"


async def test_body_under_the_limit_is_not_413(client, settings):
    response = await client.post("/v1/auth/vneid", json={"id_token": "a" * (settings.max_body_bytes - 100)})
    assert response.status_code != 413


async def test_unknown_path_is_a_404_problem_with_headers(client):
    response = await client.get("/definitely/not/here?x=1")
    body = assert_problem(response, 404, "not_found")
    assert GENERATED_ID.match(body["request_id"])


async def test_wrong_method_is_405(client):
    response = await client.delete("/health/live")
    assert_problem(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


async def test_missing_credentials_are_401_with_challenge(client):
    response = await client.get("/v1/me")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].lower().startswith("bearer")


# --- request ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("incoming", ["client-req-12345678", "a1b2c3d4.e5f6_g7", "X" * 64])
async def test_sane_request_id_is_echoed(client, incoming):
    response = await client.get("/nowhere", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] == incoming
    assert response.json()["request_id"] == incoming
    ok = await client.get("/health/live", headers={"X-Request-ID": incoming})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == incoming


@pytest.mark.parametrize(
    "incoming",
    [
        "abcdefgh\nSet-Cookie: session=evil",
        "abcdefgh\r\nX-Injected: 1",
        "x" * 65,
        "<script>alert(1)</script>",
        "short",
        "spaces are not ok",
    ],
    ids=["newline", "crlf", "too-long", "markup", "too-short", "spaces"],
)
async def test_malicious_request_id_is_replaced(client, incoming):
    response = await client.get("/nowhere", headers={"X-Request-ID": incoming})
    echoed = response.headers["x-request-id"]
    assert echoed != incoming
    assert GENERATED_ID.match(echoed)
    assert response.json()["request_id"] == echoed
    assert "set-cookie" not in response.headers
    assert "x-injected" not in response.headers


async def test_each_request_gets_its_own_id(client):
    ids = {(await client.get("/health/live")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(GENERATED_ID.match(i) for i in ids)


# --- unexpected failures ---------------------------------------------------------------------------


async def test_unexpected_exception_is_a_generic_500(client, monkeypatch):
    listed = await client.get("/v1/facilities", params={"limit": 1})
    facility_id = listed.json()["items"][0]["id"]
    secret = "boom: relation secret_table, patient 011080000101, password=hunter2"

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(secret)

    monkeypatch.setattr(api.directory.queries, "get_facility", broken)
    for accept, detail in (("vi", VI["internal_error"]), ("en", EN["internal_error"])):
        response = await client.get(f"/v1/facilities/{facility_id}", headers={"Accept-Language": accept})
        body = assert_problem(response, 500, "internal_error")
        assert body["detail"] == detail
        for fragment in ("boom", "secret_table", "011080000101", "hunter2", "RuntimeError", "broken"):
            assert fragment not in response.text, fragment
        assert "errors" not in body

    monkeypatch.undo()
    again = await client.get(f"/v1/facilities/{facility_id}")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == facility_id
