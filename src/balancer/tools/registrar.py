"""A sample service registering itself in etcd (`balancer service --register URL`), for the
balancer's etcd discovery.

The URL: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX/SERVICE`. The members are tried in that
order (a port left out is etcd's 2379; an IPv6 host in brackets); the last path segment is
the service's name, the segments before it the prefix (`/balancer`, or several segments).

Key layout (the one `balancer.core.etcd_layout` reads): the backend key is
`{PREFIX}/{SERVICE}/backends/{HOST}:{PORT}` (IPv6 as `[::1]:PORT`), its value the JSON
`{"weight": W}` (1..1000), put with a lease of `--register-ttl` seconds.

How it works: once the service listens, `Registrar.start` runs one task. It grants a
lease, puts the key with it, then renews the lease every TTL/3 (`/v3/lease/keepalive`).
A renewal that says the lease is gone (no TTL in the answer: etcd was out of reach longer
than the TTL) starts over with a new lease and a new put. Each call (`balancer.net.etcd`)
goes to the member that answered last, then to each other member once; when none answers,
the task logs one warning for the streak of failures, waits a short bounded backoff and
tries again, for as long as the service runs. `Registrar.stop` ends the task and revokes
the lease, so the key goes at once and the backend leaves every balancer before the
service closes its listener; a service killed outright leaves when its lease expires.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence

from balancer.config.addresses import format_address, host_problem
from balancer.config.model import MAX_WEIGHT as MODEL_MAX_WEIGHT
from balancer.core import etcd_layout
from balancer.net.etcd import EtcdClient, EtcdError

SCHEME = "etcd://"
DEFAULT_ETCD_PORT = 2379
DEFAULT_TTL = 5
MIN_TTL, MAX_TTL = 1, 60
"""`--register-ttl` bounds, in seconds (etcd's TTLs are whole seconds)."""
MIN_WEIGHT, MAX_WEIGHT = 1, MODEL_MAX_WEIGHT
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 1.0
"""Seconds between two rounds of failed calls: doubling from the first up to the max."""
REVOKE_TIMEOUT = 2.0
"""Seconds `stop` may spend revoking the lease (it expires by itself otherwise)."""
LEASE_NOT_FOUND = "requested lease not found"
URL_FORM = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX/SERVICE"

_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _member(text: str) -> str:
    """`http://host:port` from one `HOST[:PORT]` of the URL; ValueError naming the problem."""
    if not text:
        raise ValueError("an empty etcd member (two commas, or a comma at an end)")
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += bracket
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"etcd member {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"etcd member {text!r}: an IPv6 host needs brackets, as in [::1]:2379")
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    if not host:
        raise ValueError(f"etcd member {text!r}: the host is empty")
    problem = host_problem(host)
    if problem is not None:
        raise ValueError(f"etcd member {text!r}: {problem}")
    port = DEFAULT_ETCD_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"etcd member {text!r}: the port must be 1..65535")
        port = int(port_text)
    return f"http://{host}:{port}"


def parse_register_url(text: str) -> tuple[tuple[str, ...], str, str]:
    """(the members' URLs `http://host:port`, the prefix, the service) from
    `etcd://HOST:PORT[,HOST:PORT...]/PREFIX/SERVICE`; ValueError saying what is wrong."""
    if not text.lower().startswith(SCHEME):
        scheme = text.partition("://")[0] if "://" in text else ""
        what = f"the scheme is {scheme!r}" if scheme else "no etcd:// scheme"
        raise ValueError(f"{text!r}: {what}; expected {URL_FORM}")
    members, slash, path = text[len(SCHEME) :].partition("/")
    if not members:
        raise ValueError(f"{text!r}: no etcd member before the path; expected {URL_FORM}")
    endpoints = tuple(_member(m) for m in members.split(","))
    segments = path.split("/") if slash else []
    if not segments or segments == [""]:
        raise ValueError(f"{text!r}: no /PREFIX/SERVICE path; expected {URL_FORM}")
    for segment in segments:
        if not segment:
            raise ValueError(f"{text!r}: an empty path segment (a doubled or trailing '/')")
        if not set(segment) <= _SEGMENT_CHARS:
            raise ValueError(
                f"{text!r}: path segment {segment!r} may hold letters, digits, '.', '-', '_'"
            )
    if len(segments) < 2:
        raise ValueError(
            f"{text!r}: no service: the path is /PREFIX/SERVICE (such as /balancer/{segments[0]})"
        )
    return endpoints, "/" + "/".join(segments[:-1]), segments[-1]


def backend_key(prefix: str, service: str, host: str, port: int) -> str:
    """`{prefix}/{service}/backends/{host}:{port}`, an IPv6 host in brackets."""
    return etcd_layout.backend_key(prefix, service, format_address(host.strip("[]"), port))


def backend_value(weight: int) -> str:
    """`{"weight": W}`."""
    return etcd_layout.encode_backend(weight)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Registrar:
    """Keeps `key` = `value` in etcd under a lease of `ttl` seconds while the service runs."""

    def __init__(
        self,
        endpoints: Sequence[str],
        key: str,
        value: str,
        ttl: int = DEFAULT_TTL,
        *,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be {MIN_TTL}..{MAX_TTL} seconds")
        # configuration
        self.key = key
        self.value = value
        self.ttl = ttl
        self.interval = ttl / 3
        self._etcd = EtcdClient(endpoints, timeout=max(0.3, min(2.0, self.interval)))
        self._log = log
        # state, while running
        self.lease = 0
        """The lease the key is put with (0: none granted yet, or it was lost)."""
        self.registered = False
        """The key is in etcd with `lease` (as far as the last answer said)."""
        self.failures = 0
        """Rounds of calls failed in a row."""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Register in the background (the service listens already)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"register {self.key}")

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except EtcdError as exc:
                if LEASE_NOT_FOUND in str(exc):
                    self.lease = 0  # expired between two calls: a new one next round
                    self.registered = False
                if self.failures == 0:
                    self._log(f"etcd registration of {self.key}: no member answered: {exc}")
                self.failures += 1
                await asyncio.sleep(min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX))
                continue
            if self.failures:
                self._log(f"etcd registration of {self.key}: etcd answers again")
                self.failures = 0
            await asyncio.sleep(self.interval)

    async def _step(self) -> None:
        """One round: register if the key is not there, renew the lease if it is."""
        if self.registered:
            if await self._etcd.keepalive(self.lease) > 0:
                return
            self._log(f"etcd registration of {self.key}: lease {self.lease} expired; again")
            self.lease = 0
            self.registered = False
        if self.lease == 0:
            self.lease = await self._etcd.grant(self.ttl)
        await self._etcd.put(self.key, self.value, lease=self.lease)
        self.registered = True
        print(f"registered {self.key} in etcd (lease {self.lease}, ttl {self.ttl}s)", flush=True)

    async def stop(self) -> None:
        """End the renewals and revoke the lease (the key goes at once)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.lease:
            try:
                async with asyncio.timeout(REVOKE_TIMEOUT):
                    await self._etcd.revoke(self.lease)
            except (EtcdError, TimeoutError) as exc:
                self._log(f"etcd registration of {self.key}: revoke failed ({exc}); it expires")
            self.lease = 0
            self.registered = False
        await self._etcd.close()

    def __repr__(self) -> str:
        state = "registered" if self.registered else "not registered"
        return (
            f"<Registrar {self.key} {state}, lease {self.lease}, ttl {self.ttl}s, "
            f"{self.failures} failures, member {self._etcd.endpoints[self._etcd.current]}>"
        )
