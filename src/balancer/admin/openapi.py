"""The OpenAPI description of the admin endpoint, served at `/api/openapi.json`.

The document is data, `openapi.json` beside this module; a test checks it against what
the routes return and against the limits it names (body size, weights, states).
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any


def load_openapi() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        files("balancer.admin").joinpath("openapi.json").read_text("utf-8")
    )
    return doc


OPENAPI = load_openapi()
