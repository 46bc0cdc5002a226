"""The OpenAPI document as committed in `openapi/openapi.json` (built without starting the app)."""

from __future__ import annotations

import json

from api.settings import Settings


def openapi_json() -> str:
    from litestar.serialization import encode_json

    from api.app import create_app

    # Fixed default settings: the document must not depend on the environment it is built in.
    app = create_app(Settings())
    schema = json.loads(encode_json(app.openapi_schema.to_schema()))
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
