"""Service discovery settings: the `[discovery]` table and a service's `discover` target.

`discover = "a:NAME:PORT"`: the A and AAAA records of NAME, each address a backend on
PORT (weight 1). `discover = "srv:_service._proto.NAME"`: the SRV records of that name,
each target and port a backend, its weight the record's (clamped to the weight bounds).
Both are re-resolved every `[discovery] interval` (`balancer.runtime.discovery`).
`discover = "etcd"` (or `"etcd:NAME"`, another name than the service's): the backends
are the keys under `{prefix}/{NAME}/` in the etcd cluster of `[discovery] endpoints`,
watched (`balancer.runtime.etcd`; the key layout is `balancer.core.etcd_layout`'s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISCOVERY_KINDS = ("dns", "etcd")
DISCOVER_KINDS = ("a", "srv", "etcd")
"""`a`: A and AAAA records of a name and a port; `srv`: the SRV records of a name;
`etcd`: the keys of a service's directory in etcd."""
KIND_OF_TARGET = {"a": "dns", "srv": "dns", "etcd": "etcd"}
"""The `[discovery] kind` each kind of target needs."""

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})"
_A_RE = re.compile(rf"a:({_NAME}):([0-9]{{1,5}})")
_SRV_RE = re.compile(rf"srv:({_NAME})")
_ETCD_RE = re.compile(r"etcd(?::([A-Za-z0-9_.-]{1,128}))?")
_ENDPOINT_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})/?")
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9_.-]+)+")
MAX_ENDPOINTS = 16


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where and how often the services' `discover` names are resolved."""

    kind: str = "dns"
    interval: float = 5.0
    """Seconds between two resolutions of every name (dns); between two checks that etcd
    still answers while its watch is quiet (etcd)."""
    timeout: float = 2.0
    """A resolution (an etcd call) not answered within this has failed (the last set is
    kept)."""
    nameservers: tuple[str, ...] = ()
    """`"IP"` or `"IP:PORT"` (`"[IPv6]:PORT"`); empty: the system's resolver."""
    endpoints: tuple[str, ...] = ()
    """etcd: the cluster's members, `"http://host:port"`."""
    prefix: str = "/balancer"
    """etcd: the directory under which each service's keys are (`{prefix}/{service}/`)."""


@dataclass(frozen=True)
class DiscoverTarget:
    """A parsed `discover` value."""

    kind: str
    """"a", "srv" or "etcd"."""
    name: str
    """The DNS name; for "etcd", the service's directory name ("": the service's own)."""
    port: int = 0
    """For "a": the backends' port."""


DISCOVER_EXPECTED = '"a:NAME:PORT", "srv:_service._tcp.NAME", "etcd" or "etcd:NAME"'


def parse_discover(text: str) -> DiscoverTarget | None:
    """The target `text` names, or None when it is not one."""
    match = _A_RE.fullmatch(text)
    if match is not None:
        port = int(match.group(2))
        return DiscoverTarget("a", match.group(1), port) if 1 <= port <= 65535 else None
    match = _SRV_RE.fullmatch(text)
    if match is not None:
        return DiscoverTarget("srv", match.group(1))
    match = _ETCD_RE.fullmatch(text)
    if match is not None:
        return DiscoverTarget("etcd", match.group(1) or "")
    return None


def etcd_name(service: str, discover: str) -> str | None:
    """The etcd directory name of a service with this `discover` (`"etcd"`: its own name,
    `"etcd:NAME"`: NAME); None when its backends are not from etcd."""
    target = parse_discover(discover) if discover else None
    if target is None or target.kind != "etcd":
        return None
    return target.name or service


def valid_endpoint(text: str) -> bool:
    """An etcd member's URL: `http://host:port` (or https), port 1..65535."""
    match = _ENDPOINT_RE.fullmatch(text)
    return match is not None and 1 <= int(match.group(2)) <= 65535


def valid_prefix(text: str) -> bool:
    """An etcd directory: `/name` segments, at most 200 characters, no trailing slash."""
    return len(text) <= 200 and _PREFIX_RE.fullmatch(text) is not None


def parse_nameserver(text: str) -> tuple[str, int] | None:
    """(ip, port) from `"IP"`, `"IP:PORT"` or `"[IPv6]:PORT"`; None when it is not one."""
    import ipaddress

    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        if rest:
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, tail = text.partition(":")
        if not tail.isdigit():
            return None
        port = int(tail)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if 1 <= port <= 65535 else None
