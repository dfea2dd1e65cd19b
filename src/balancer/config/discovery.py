"""Service discovery settings: the `[discovery]` table and a service's `discover` target.

`discover = "a:NAME:PORT"`: the A and AAAA records of NAME, each address a backend on
PORT (weight 1). `discover = "srv:_service._proto.NAME"`: the SRV records of that name,
each target and port a backend, its weight the record's (clamped to the weight bounds).
Both are re-resolved every `[discovery] interval` (`balancer.runtime.discovery`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISCOVERY_KINDS = ("dns",)
DISCOVER_KINDS = ("a", "srv")
"""`a`: A and AAAA records of a name and a port; `srv`: the SRV records of a name."""

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})"
_A_RE = re.compile(rf"a:({_NAME}):([0-9]{{1,5}})")
_SRV_RE = re.compile(rf"srv:({_NAME})")


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where and how often the services' `discover` names are resolved."""

    kind: str = "dns"
    interval: float = 5.0
    """Seconds between two resolutions of every name."""
    timeout: float = 2.0
    """A resolution not answered within this has failed (the last set is kept)."""
    nameservers: tuple[str, ...] = ()
    """`"IP"` or `"IP:PORT"` (`"[IPv6]:PORT"`); empty: the system's resolver."""


@dataclass(frozen=True)
class DiscoverTarget:
    """A parsed `discover` value."""

    kind: str
    """"a" or "srv"."""
    name: str
    port: int = 0
    """For "a": the backends' port."""


DISCOVER_EXPECTED = '"a:NAME:PORT" or "srv:_service._tcp.NAME"'


def parse_discover(text: str) -> DiscoverTarget | None:
    """The target `text` names, or None when it is not one."""
    match = _A_RE.fullmatch(text)
    if match is not None:
        port = int(match.group(2))
        return DiscoverTarget("a", match.group(1), port) if 1 <= port <= 65535 else None
    match = _SRV_RE.fullmatch(text)
    if match is not None:
        return DiscoverTarget("srv", match.group(1))
    return None


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
