"""A small etcd v3 client over its JSON gateway (`/v3/kv/*`, `/v3/watch`, `/v3/lease/*`).

etcd answers plain HTTP with JSON bodies, keys and values base64 encoded and 64-bit
numbers as strings, so aiohttp is all it takes (no gRPC stack). The client knows every
member's URL and sticks to one until it fails (a connection refused or reset, a timeout,
a 5xx answer), then moves to the next: a dead member costs one failed call, and a
caller that retries reaches a live one. `EtcdError` is every failure to get an answer;
`EtcdCompacted` is a watch whose start revision etcd has compacted away (read the whole
range again, then watch from its revision).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from balancer.errors import BalancerError


class EtcdError(BalancerError):
    """No member gave an answer (or the answer was an error)."""


class EtcdCompacted(EtcdError):
    """The watch's start revision is older than etcd's history."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (history starts at {revision})")
        self.revision = revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int = 0
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    kind: str
    """"put" or "delete"."""
    kv: KeyValue


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def prefix_end(prefix: str) -> str:
    """The range end that makes `[prefix, end)` every key starting with `prefix` (base64)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return _b64(bytes(raw))
        raw.pop()
    return _b64(b"\0")  # every key


def key_value(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        base64.b64decode(data.get("key", "")).decode("utf-8", "replace"),
        base64.b64decode(data.get("value", "")),
        int(data.get("mod_revision", 0)),
        int(data.get("lease", 0)),
    )


def watch_events(result: dict[str, Any]) -> list[WatchEvent]:
    """The events of one watch answer (a PUT's type is left out: it is the zero value)."""
    return [
        WatchEvent("delete" if e.get("type") == "DELETE" else "put", key_value(e.get("kv", {})))
        for e in result.get("events", ())
    ]


def revision_of(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))


class EtcdClient:
    """Calls to an etcd cluster, whose members are `endpoints` ("http://host:port")."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.timeout = timeout
        self.current = 0
        """Index of the member calls go to first."""
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no total timeout: a watch is a stream that stays open (calls have their own)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` on the current member, then on each other once."""
        errors: list[str] = []
        for step in range(len(self.endpoints)):
            index = (self.current + step) % len(self.endpoints)
            url = self.endpoints[index] + path
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.session.post(url, json=body) as response:
                        text = await response.text()
                        if response.status >= 500:
                            errors.append(f"{url}: HTTP {response.status} {text[:200]}")
                            continue
                        answer = json.loads(text) if text else {}
                        if response.status != 200 or "error" in answer:
                            raise EtcdError(f"{url}: {answer.get('error', text[:200])}")
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}".rstrip(": "))
                continue
            self.current = index
            return dict(answer)
        self.current = (self.current + 1) % len(self.endpoints)
        raise EtcdError("; ".join(errors))

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(revision, every key under `prefix` with its value)."""
        answer = await self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)}
        )
        return revision_of(answer), [key_value(kv) for kv in answer.get("kvs", ())]

    async def ping(self, key: str) -> int:
        """A linearizable read of one key's count (a member cut off from its cluster's
        quorum does not answer it); the cluster's revision."""
        answer = await self.call("/v3/kv/range", {"key": _b64(key), "count_only": True})
        return revision_of(answer)

    async def put(
        self, key: str, value: bytes | str, *, lease: int = 0, ignore_lease: bool = False
    ) -> int:
        """Write `key`; the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        if ignore_lease:
            body["ignore_lease"] = True
        return revision_of(await self.call("/v3/kv/put", body))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        return revision_of(await self.call("/v3/kv/deleterange", body))

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its ID."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl), "ID": "0"})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew `lease`; the seconds it has left (0: it has expired)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """(revision, events) for every change under `prefix` from `start_revision` on.

        Ends with EtcdError when the stream breaks (the caller reads the range again and
        watches anew); EtcdCompacted when etcd no longer has `start_revision`.
        """
        url = self.endpoints[self.current] + "/v3/watch"
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        decoder = json.JSONDecoder()
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.session.post(url, json=body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.current = (self.current + 1) % len(self.endpoints)
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            if response.status != 200:
                raise EtcdError(f"{url}: HTTP {response.status}")
            buffer = ""
            async for chunk in response.content.iter_any():
                buffer += chunk.decode("utf-8", "replace")
                while True:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # the rest of this message is still on its way
                    buffer = buffer[end:]
                    result = message.get("result") or {}
                    if "error" in message:
                        raise EtcdError(f"{url}: {message['error']}")
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        raise EtcdCompacted(compacted)
                    if result.get("canceled"):
                        raise EtcdError(f"{url}: watch canceled: {result.get('cancel_reason')}")
                    events = watch_events(result)
                    if events:
                        yield revision_of(result), events
            raise EtcdError(f"{url}: the watch stream ended")
        except (aiohttp.ClientError, OSError) as exc:
            self.current = (self.current + 1) % len(self.endpoints)
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        finally:
            response.close()
