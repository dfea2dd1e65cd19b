"""The etcd key layout of a service's backends, and the view it gives (pure).

Under `{prefix}/{service}/` (the `[discovery] prefix`, the service's name or its
`discover = "etcd:NAME"`):

- `backends/{host}:{port}`: a backend (IPv6 as `[::1]:port`). Its value is JSON,
  `{"weight": W}` (1..1000; an empty value or `{}` is weight 1). A backend that registers
  itself writes this key with a lease and keeps the lease alive
  (`balancer service --register`); when the lease expires the key goes, and the backend
  leaves every balancer. The runtime API's `POST .../backends` writes it without a lease.
- `admin/{host}:{port}`: what operators set through any balancer's runtime API,
  `{"state": "up" | "drain" | "maint", "weight": W}` (both optional; the weight here wins
  over the backend key's). No lease: it outlives a backend's restarts.

A key or value that does not fit is skipped (and reported by `view`), never fatal: one
bad writer must not empty a service.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from balancer.config.addresses import parse_address
from balancer.config.errors import ConfigError
from balancer.config.model import MAX_WEIGHT, BackendConfig

BACKENDS = "backends"
ADMIN = "admin"
STATES = ("up", "drain", "maint")


def service_dir(prefix: str, name: str) -> str:
    """The directory of a service's keys, with its trailing slash."""
    return f"{prefix.rstrip('/')}/{name}/"


def backend_key(prefix: str, name: str, address: str) -> str:
    return f"{service_dir(prefix, name)}{BACKENDS}/{address}"


def admin_key(prefix: str, name: str, address: str) -> str:
    return f"{service_dir(prefix, name)}{ADMIN}/{address}"


def encode_backend(weight: int) -> str:
    return json.dumps({"weight": weight})


def encode_admin(state: str | None, weight: int | None) -> str:
    value: dict[str, object] = {}
    if state is not None:
        value["state"] = state
    if weight is not None:
        value["weight"] = weight
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class AdminEntry:
    state: str | None = None
    weight: int | None = None


@dataclass(frozen=True)
class ServiceView:
    """What a service's directory says: its backends (weights applied) and admin states."""

    backends: tuple[BackendConfig, ...] = ()
    states: Mapping[str, str] = field(default_factory=dict)
    """Address -> "up", "drain" or "maint", for each backend of `backends`."""
    problems: tuple[str, ...] = ()
    """Keys skipped, with why."""


def _address(text: str) -> tuple[str, int] | None:
    try:
        host, port = parse_address(text, where="key", source="etcd")
    except ConfigError:
        return None
    return host, port


def _weight(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= MAX_WEIGHT else None


def _object(raw: bytes) -> dict[str, object] | None:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _backend(raw: bytes) -> int | str:
    """The weight a backend key's value gives, or why it is not one."""
    value = _object(raw)
    if value is None:
        return 'not a JSON object (expected {"weight": 1..1000})'
    if "weight" not in value:
        return 1
    weight = _weight(value["weight"])
    return f"weight {value['weight']!r} is not 1..{MAX_WEIGHT}" if weight is None else weight


def admin_entry(raw: bytes) -> AdminEntry | str:
    """What an admin key's value sets, or why it is not one (an empty value sets nothing)."""
    value = _object(raw)
    if value is None:
        return 'not a JSON object (expected {"state": ..., "weight": ...})'
    state = value.get("state")
    if state is not None and state not in STATES:
        return f"state {state!r} is not one of {', '.join(STATES)}"
    weight = None
    if "weight" in value:
        weight = _weight(value["weight"])
        if weight is None:
            return f"weight {value['weight']!r} is not 1..{MAX_WEIGHT}"
    return AdminEntry(state if isinstance(state, str) else None, weight)


def view(directory: str, kvs: Mapping[str, bytes]) -> ServiceView:
    """The view of the keys `kvs` (key -> value) under `directory` (others are ignored)."""
    weights: dict[tuple[str, int], int] = {}
    admin: dict[tuple[str, int], AdminEntry] = {}
    problems: list[str] = []
    for key in sorted(kvs):
        if not key.startswith(directory):
            continue
        kind, _, text = key[len(directory) :].partition("/")
        if kind not in (BACKENDS, ADMIN):
            continue  # room for what later versions keep there
        address = _address(text)
        if address is None:
            problems.append(f"{key}: {text!r} is not host:port")
            continue
        if kind == BACKENDS:
            weight = _backend(kvs[key])
            if isinstance(weight, str):
                problems.append(f"{key}: {weight}")
            else:
                weights[address] = weight
        else:
            entry = admin_entry(kvs[key])
            if isinstance(entry, str):
                problems.append(f"{key}: {entry}")
            else:
                admin[address] = entry
    backends = []
    states: dict[str, str] = {}
    for (host, port), weight in sorted(weights.items()):
        entry = admin.get((host, port), AdminEntry())
        config = BackendConfig(host, port, entry.weight or weight)
        backends.append(config)
        states[config.address] = entry.state or "up"
    return ServiceView(tuple(backends), states, tuple(problems))
