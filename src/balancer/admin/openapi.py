"""The OpenAPI description of the admin endpoint, served at `/api/openapi.json`."""

from __future__ import annotations

from typing import Any

from balancer.config.model import MAX_WEIGHT

BACKEND_STATES = ("up", "drain", "maint")
"""Admin states a backend can be set to through the API."""
MAX_BODY = 64 * 1024
"""Largest request body the admin endpoint reads, in bytes."""


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SERVICE = {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}}
_ADDRESS = {
    "name": "address",
    "in": "path",
    "required": True,
    "description": "the backend as host:port",
    "schema": {"type": "string", "example": "127.0.0.1:8081"},
}
_BACKEND_REF = {"$ref": "#/components/schemas/Backend"}
_WEIGHT = {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT}

_EVERY = {
    "400": _error("invalid request (or a malformed Host header); nothing changed"),
    "403": _error("cross-site request refused (an Origin of another site)"),
    "421": _error("the Host header names a host this endpoint does not answer to"),
}
_READ = {
    **_EVERY,
    "401": _error("reads need a token here (read_access) and it is missing or wrong"),
}
_WRITE = {
    **_EVERY,
    "401": _error("missing or wrong bearer token"),
    "403": _error("cross-site request refused, or a token that may only read"),
    "404": _error("no such service or backend"),
    "415": _error(
        "the body is not 'Content-Type: application/json' in UTF-8 without Content-Encoding"
    ),
}
_BODY = {"413": _error(f"the body is larger than {MAX_BODY} bytes")}
_READ_SECURITY: list[dict[str, list[str]]] = [{}, {"bearer": []}]
"""Reads: open, or a bearer token (the read or the write token) where read_access says so."""
_WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "balancer admin API",
        "version": "1",
        "description": (
            "Status, metrics and runtime changes of a running balancer. Writes need "
            "'Authorization: Bearer <token>' when a token is configured ([admin] token or "
            "BALANCER_ADMIN_TOKEN); a non-loopback admin listener always needs one. Reads "
            "need the read token ([admin] read_token) or the write token when read_access is "
            '"token", or "auto" (the default) on a non-loopback listener. Every request must '
            "name this endpoint in Host (loopback names, the listen address, this machine's "
            "host name, [admin] allowed_hosts) and come from no other site's page (Origin). "
            "Write bodies are JSON objects of at most "
            f"{MAX_BODY} bytes. Unknown paths answer 404 and other methods 405, as JSON."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string", "maxLength": 500}},
            },
            "Backend": {
                "type": "object",
                "properties": {
                    "address": {"type": "string"},
                    "state": {"type": "string", "enum": ["up", "down"]},
                    "admin_state": {"type": "string", "enum": ["ready", "drain", "maint"]},
                    "weight": _WEIGHT,
                    "requests": {"type": "integer"},
                    "in_flight": {"type": "integer"},
                    "failures": {"type": "integer"},
                    "connect_failures": {"type": "integer"},
                    "last_check": {"type": "number", "nullable": True},
                    "last_check_ok": {"type": "boolean", "nullable": True},
                    "last_check_age_s": {"type": "number", "nullable": True},
                    "reason": {
                        "type": "string",
                        "description": "why the backend is down (the last failed check)",
                    },
                    "active_connections": {"type": "integer"},
                    "total_connections": {"type": "integer"},
                    "bytes_in": {"type": "integer"},
                    "bytes_out": {"type": "integer"},
                    "rps": {"type": "number"},
                    "error_rate": {"type": "number"},
                },
            },
            "Services": {
                "type": "object",
                "properties": {
                    "services": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {
                                "listen": {"type": "string"},
                                "mode": {"type": "string"},
                                "algorithm": {"type": "string"},
                                "client_connections": {"type": "integer"},
                                "not_available": {"type": "integer"},
                                "retries": {"type": "integer"},
                                "refused": {"type": "integer"},
                                "rps": {"type": "number"},
                                "error_rate": {"type": "number"},
                                "p99_ms": {"type": "number"},
                                "backends": {"type": "array", "items": _BACKEND_REF},
                            },
                        },
                    }
                },
            },
            "BackendChange": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "state": {"type": "string", "enum": list(BACKEND_STATES)},
                    "weight": _WEIGHT,
                },
            },
            "NewBackend": {
                "type": "object",
                "additionalProperties": False,
                "required": ["address"],
                "properties": {
                    "address": {"type": "string", "example": "127.0.0.1:8085"},
                    "weight": {**_WEIGHT, "default": 1},
                },
            },
        },
    },
    "paths": {
        "/status": {
            "get": {
                "summary": "Services and backends with their counters",
                "security": _READ_SECURITY,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Services"}, "status"),
                    **_READ,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": _READ_SECURITY,
                "responses": {"200": {"description": "text exposition format"}, **_READ},
            }
        },
        "/api/services": {
            "get": {
                "summary": "Same as /status, plus the rates of the latest one-second sample",
                "security": _READ_SECURITY,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Services"}, "status"),
                    **_READ,
                },
            }
        },
        "/api/history": {
            "get": {
                "summary": "One-second samples (requests/s, error rate, p99) of the last minutes",
                "security": _READ_SECURITY,
                "parameters": [
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "description": "only samples taken after this Unix time",
                        "schema": {"type": "number"},
                    }
                ],
                "responses": {"200": _json({"type": "object"}, "samples, oldest first"), **_READ},
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This description (needs no token)",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3"), **_EVERY},
            }
        },
        "/api/services/{service}/backends": {
            "post": {
                "summary": "Add a backend; it takes traffic once its health checks pass",
                "security": _WRITE_SECURITY,
                "parameters": [_SERVICE],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewBackend"}}
                    },
                },
                "responses": {
                    "201": _json(_BACKEND_REF, "added"),
                    **_WRITE,
                    "400": _error(
                        "invalid request, or the address is this balancer itself; nothing changed"
                    ),
                    "409": _error("the service already has this backend"),
                    **_BODY,
                },
            }
        },
        "/api/services/{service}/backends/{address}": {
            "put": {
                "summary": "Set a backend's admin state (up, drain, maint) and/or weight",
                "security": _WRITE_SECURITY,
                "parameters": [_SERVICE, _ADDRESS],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/BackendChange"}
                        }
                    },
                },
                "responses": {"200": _json(_BACKEND_REF, "changed"), **_WRITE, **_BODY},
            },
            "delete": {
                "summary": (
                    "Remove a backend: answered at once with 202; the backend drains (no new "
                    "requests) and is removed when its in-flight requests finish or the drain "
                    "timeout passes. A service's last backend cannot be removed."
                ),
                "security": _WRITE_SECURITY,
                "parameters": [_SERVICE, _ADDRESS],
                "responses": {
                    "202": _json({"type": "object"}, "removal started"),
                    **_WRITE,
                    "409": _error("the service's last backend: add another one first"),
                },
            },
        },
        "/api/reload": {
            "post": {
                "summary": "Re-read the config file and apply it",
                "security": _WRITE_SECURITY,
                "responses": {
                    "200": _json({"type": "object"}, "reloaded"),
                    **{code: doc for code, doc in _WRITE.items() if code != "404"},
                    "400": _error(
                        "the config file is invalid, or a backend in it is the balancer "
                        "itself; nothing changed"
                    ),
                    "409": _error(
                        "a new listen address is busy, or the balancer is stopping; nothing changed"
                    ),
                },
            }
        },
    },
}
