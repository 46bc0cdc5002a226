"""The committed OpenAPI document is what the app generates, and every operation is fully described."""

import json
from pathlib import Path

from api.access import PUBLIC, rule_for
from api.openapi_doc import openapi_json

COMMITTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_committed_document_is_current():
    assert COMMITTED.read_text(encoding="utf-8") == openapi_json(), (
        "openapi/openapi.json is stale: run `./dev openapi` and commit the file"
    )


def test_every_operation_is_described():
    document = json.loads(openapi_json())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("operationId"), where
            assert operation.get("summary"), where
            success = [s for s in operation["responses"] if s.startswith("2")]
            assert success, where
            errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
            assert {"400", "422", "500"} <= set(errors), where
            for status, response in errors.items():
                assert "application/problem+json" in response["content"], f"{where} {status}"
            needs_token = rule_for(method.upper(), path) != PUBLIC
            assert (operation.get("security") == [{"bearer": []}]) == needs_token, where
            if needs_token:
                assert "401" in errors, where


def test_operation_ids_are_unique():
    document = json.loads(openapi_json())
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
