"""The OpenAPI document (`balancer/admin/openapi.json`) against what the routes really return.

A balancer runs in this process with two services (message and tcp mode) and backends in
every state (up, down after a failed check, drained, in maintenance); every key of each
answer must be described by the schema of its route and status, and every key the schema
requires must be there. The limits the document names are checked against the code's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import pytest_asyncio
from aiohttp import ClientSession

from balancer.admin.app import AdminServer
from balancer.admin.checks import MAX_BODY, MAX_ERROR
from balancer.admin.handlers import BACKEND_STATES
from balancer.admin.openapi import OPENAPI
from balancer.app import build_server
from balancer.config.model import (
    MAX_WEIGHT,
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    ServiceConfig,
)
from balancer.core.states import DOWN, DRAIN, MAINT, READY, UP
from balancer.runtime.server import Server
from tests.support import Numbers, ask, free_ports, reply_for

JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$ref` followed and its `allOf` parts merged (properties and
    required keys of every part; a later part's property describes the key)."""
    while "$ref" in schema:
        node: Any = OPENAPI
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    if "allOf" in schema:
        merged: dict[str, Any] = {"properties": {}, "required": []}
        for part in map(resolve, schema["allOf"]):
            merged |= {k: v for k, v in part.items() if k not in ("properties", "required")}
            merged["properties"] |= part.get("properties", {})
            merged["required"] += part.get("required", [])
        schema = merged
    return schema


def problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What in `value` the schema does not describe, and what it requires that is missing."""
    schema = resolve(schema)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null, not nullable"]
    kind = schema.get("type")
    if kind is not None:
        is_bool = isinstance(value, bool)
        if not isinstance(value, JSON_TYPES[kind]) or (is_bool and kind != "boolean"):
            return [f"{where}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                found += problems(item, properties[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                found += problems(item, extra, f"{where}[{key!r}]")
            else:
                found.append(f"{where}: key {key!r} is not in the schema")
        required = schema.get("required", ())
        found += [f"{where}: required key {k!r} missing" for k in required if k not in value]
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{where}[{i}]")
    return found


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    response = resolve(OPENAPI["paths"][path][method]["responses"][str(status)])
    return cast(dict[str, Any], response["content"]["application/json"]["schema"])


def schemas_of(node: Any) -> list[dict[str, Any]]:
    """Every schema in `node` that has properties, at any depth."""
    out: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            out.append(node)
        for item in node.values():
            out += schemas_of(item)
    elif isinstance(node, list):
        for item in node:
            out += schemas_of(item)
    return out


# -- the checker itself -------------------------------------------------------------------------


def test_the_checker_finds_undescribed_and_missing_keys() -> None:
    schema = {"$ref": "#/components/schemas/Error"}
    assert problems({"error": "no"}, schema) == []
    assert problems({"error": "no", "hint": "x"}, schema) == ["$: key 'hint' is not in the schema"]
    assert problems({}, schema) == ["$: required key 'error' missing"]
    assert problems({"error": 3}, schema) == ["$.error: 3 is not of type string"]
    backend = {"$ref": "#/components/schemas/Backend"}
    assert problems([{"state": "sideways"}], {"type": "array", "items": backend})[0] == (
        "$[0].state: 'sideways' not in ['up', 'down']"
    )


# -- the limits the document names -------------------------------------------------------------


def test_the_document_names_the_codes_limits_and_states() -> None:
    schemas = OPENAPI["components"]["schemas"]
    weights = [
        s["properties"]["weight"] for s in schemas_of(OPENAPI) if "weight" in s["properties"]
    ]
    assert len(weights) == 4  # a backend, a change of one, a new one, a discovered one
    assert all(w["maximum"] == MAX_WEIGHT and w["minimum"] == 0 for w in weights)
    assert schemas["BackendChange"]["properties"]["state"]["enum"] == list(BACKEND_STATES)
    assert schemas["Backend"]["properties"]["state"]["enum"] == [UP, DOWN]
    assert schemas["Backend"]["properties"]["admin_state"]["enum"] == [READY, DRAIN, MAINT]
    assert schemas["Error"]["properties"]["error"]["maxLength"] == MAX_ERROR
    text = json.dumps(OPENAPI)
    assert f"at most {MAX_BODY} bytes" in OPENAPI["info"]["description"]
    assert text.count(" bytes") == text.count(f" {MAX_BODY} bytes")


def test_every_reference_resolves() -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(OPENAPI)
    assert len(refs) > 20
    for ref in refs:
        assert resolve({"$ref": ref}), ref


# -- a running balancer ------------------------------------------------------------------------


@dataclass
class Running:
    server: Server
    http: ClientSession
    base: str
    port: int
    """The message service's listen port."""
    backends: list[str]
    """up, drained, in maintenance, down (nothing listens there)."""

    async def get(self, path: str, method: str = "GET", body: object = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as resp:
            doc = await resp.json()
            return resp.status, doc

    def sample(self, at: float) -> None:
        assert isinstance(self.server.admin, AdminServer)
        self.server.admin.history.sample(self.server, at, 1_700_000_000.0 + at)


@pytest_asyncio.fixture
async def running() -> AsyncIterator[Running]:
    loop = asyncio.get_running_loop()
    listeners = [await loop.create_server(Numbers, "127.0.0.1", 0) for _ in range(3)]
    ports = [int(s.sockets[0].getsockname()[1]) for s in listeners]
    listen, relay, closed = free_ports(3)
    checks = HealthConfig(interval=60.0, timeout=1.0)
    numbers = ServiceConfig(
        name="numbers",
        listen_host="127.0.0.1",
        listen_port=listen,
        backends=tuple(BackendConfig("127.0.0.1", p) for p in (*ports, closed)),
        health=checks,
    )
    tcp = ServiceConfig(
        name="relay",
        listen_host="127.0.0.1",
        listen_port=relay,
        backends=(BackendConfig("127.0.0.1", ports[0]),),
        mode="tcp",
        health=HealthConfig(enabled=False),
    )
    config = Config(services=(numbers, tcp), admin=AdminConfig(host="127.0.0.1", port=0))
    server = build_server(config, lambda: config)
    await server.start()
    try:
        assert server.admin_address is not None
        async with ClientSession() as http:
            base = f"http://127.0.0.1:{server.admin_address[1]}"
            addresses = [f"127.0.0.1:{p}" for p in (*ports, closed)]
            yield Running(server, http, base, listen, addresses)
    finally:
        await server.shutdown()
        for s in listeners:
            s.close()


async def test_every_answer_of_a_running_balancer_matches_its_schema(running: Running) -> None:
    up, drained, maint, down = running.backends
    backend_path = "/api/services/{service}/backends/{address}"
    status, doc = await running.get(
        f"/api/services/numbers/backends/{drained}", "PUT", {"state": "drain"}
    )
    assert (status, problems(doc, response_schema(backend_path, "put", 200))) == (200, [])
    change = {"state": "maint", "weight": 0}
    status, doc = await running.get(f"/api/services/numbers/backends/{maint}", "PUT", change)
    assert (status, problems(doc, response_schema(backend_path, "put", 200))) == (200, [])
    assert await ask(running.port, "7") == reply_for(7)

    status, doc = await running.get("/status")
    assert (status, problems(doc, response_schema("/status", "get", 200))) == (200, [])
    states = {
        b["address"]: (b["state"], b["admin_state"]) for b in doc["services"]["numbers"]["backends"]
    }
    assert states == {
        up: (UP, READY),
        drained: (UP, DRAIN),
        maint: (UP, MAINT),
        down: (DOWN, READY),
    }
    assert {svc["mode"] for svc in doc["services"].values()} == {"message", "tcp"}
    assert not [svc for svc in doc["services"].values() if "http" in svc]  # http mode's only
    down_backend = next(b for b in doc["services"]["numbers"]["backends"] if b["address"] == down)
    assert down_backend["last_check_ok"] is False
    assert down_backend["reason"]

    for sampled in (False, True):
        status, doc = await running.get("/api/services")
        assert (status, problems(doc, response_schema("/api/services", "get", 200))) == (200, [])
        assert (doc["sampled_at"] is not None) == sampled
        status, doc = await running.get("/api/history")
        assert (status, problems(doc, response_schema("/api/history", "get", 200))) == (200, [])
        assert bool(doc["samples"]) == sampled
        running.sample(100.0)
        running.sample(101.0)

    new = {"address": "127.0.0.1:1", "weight": 2}
    add_path = "/api/services/{service}/backends"
    status, doc = await running.get("/api/services/relay/backends", "POST", new)
    assert (status, problems(doc, response_schema(add_path, "post", 201))) == (201, [])
    status, doc = await running.get("/api/services/relay/backends/127.0.0.1:1", "DELETE")
    assert (status, problems(doc, response_schema(backend_path, "delete", 202))) == (202, [])
    status, doc = await running.get("/api/reload", "POST", {})
    assert (status, problems(doc, response_schema("/api/reload", "post", 200))) == (200, [])
    status, doc = await running.get("/api/services/nowhere/backends/127.0.0.1:1", "PUT", {})
    assert (status, problems(doc, response_schema(backend_path, "put", 404))) == (404, [])
