"""Hosts, ports and `host:port` addresses, as config files and command lines give them.

An IPv6 host is written in brackets (`[::1]:8080`); a host of digits and dots
must be a valid IPv4 address. Errors are ConfigErrors that say what was expected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NoReturn

from balancer.config.bounds import show_value
from balancer.config.errors import ConfigError

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NUMERIC_HOST_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    """CIDRs (or single addresses), as `trusted_proxies` takes them; ValueError on a bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def format_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets (`[::1]:8080`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def host_problem(text: str, *, bare_ipv6: bool = False) -> str | None:
    """Why `text` is not a host (brackets around IPv6 allowed), or None if it is one.

    A host of digits and dots only is an IPv4 address, and must be a valid one:
    the resolver would take `256.1.1.1` as a name, and `1.2.3` or `8080` as
    surprising addresses.
    """
    if text.startswith("[") and text.endswith("]"):
        return None if _is_ipv6(text[1:-1]) else "the part in brackets must be an IPv6 address"
    if ":" in text:
        if bare_ipv6 and _is_ipv6(text):
            return None
        return "an IPv6 address needs brackets, as in [::1]:8080"
    if not _HOSTNAME_RE.fullmatch(text):
        return "the host may hold letters, digits, '.', '-' and '_'"
    if _NUMERIC_HOST_RE.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return f"{text} is not a valid IPv4 address"
    return None


def parse_host(text: str, *, bare_ipv6: bool = False) -> str | None:
    """The host in `text` (brackets removed from IPv6), or None if it is not one."""
    if host_problem(text, bare_ipv6=bare_ipv6) is not None:
        return None
    return text[1:-1] if text.startswith("[") else text


def parse_port(text: str, *, allow_zero: bool = False) -> int | None:
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if (0 if allow_zero else 1) <= port <= 65535 else None


def parse_address(
    text: str,
    *,
    where: str,
    source: str,
    default_host: str | None = None,
    allow_port_zero: bool = False,
) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:8080`) into its host and port.

    With `default_host`, a bare `PORT` or `:PORT` means that host. Port 0
    (let the system choose) is accepted only with `allow_port_zero`, for
    listening addresses.
    """
    low = 0 if allow_port_zero else 1
    expected = f'expected "host:port" with a port {low}..65535'
    if default_host is not None:
        expected += " (or just a port)"

    def fail(detail: str | None = None) -> NoReturn:
        more = f"; {detail}" if detail else ""
        raise ConfigError(source, where, f"{expected}{more}, got {show_value(text)}")

    if not isinstance(text, str):
        fail()
    s = text.strip()
    host_text: str | None = None
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or s[close + 1 : close + 2] != ":":
            fail()
        host_text, port_text = s[: close + 1], s[close + 2 :]
    elif s.count(":") > 1:
        fail("an IPv6 address needs brackets, as in [::1]:8080")
    elif ":" in s:
        host_text, port_text = s.split(":")
        if not host_text and default_host is None:
            fail()
    elif default_host is not None and s.isdigit():
        port_text = s
    else:
        fail()
    if host_text:
        problem = host_problem(host_text)
        if problem is not None:
            fail(problem)
        host = host_text[1:-1] if host_text.startswith("[") else host_text
    else:
        assert default_host is not None
        host = default_host
    port = parse_port(port_text, allow_zero=allow_port_zero)
    if port is None:
        fail()
    return host, port
