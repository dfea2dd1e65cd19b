"""Consistent hashing with a Maglev lookup table, with optional bounded load.

How it works (Eisenbud et al., "Maglev", NSDI 2016; weighted as Envoy does):
the table has M slots, M prime (65537 by default, `policy_options.table_size`, at
most 524287: a build is about 0.4 s of Python at that size, and the table is
rebuilt whenever a backend joins or leaves).
Each target, by a hash of its address, gets an offset and a skip, which
define its preference list offset, offset + skip, offset + 2 skip, ... mod M
(a permutation of the slots, M being prime). Targets take turns claiming their
next preferred free slot until the table is full; a target with weight w
takes a turn in w / max-weight of the rounds, so its share of slots follows
its weight. Equal weights give shares within one slot of each other, and when
a target leaves its own slots change hands, and some others: few with a few
targets, about six times as many again with 1,000 targets at M = 65537
(`bench/scale_sim.py`: the fewer slots per target, the more); the build is
deterministic (targets are sorted by address), so a target coming
back restores the very same table.

A key (the client address or the request line, as bytes) is hashed with
CRC-32, stable across processes and runs and fast (about 80 ns for a short
key, against about 300 ns for CRC-32 plus a murmur finaliser and 400 ns for
8-byte BLAKE2b); its distribution over M slots is as uniform as a random
function's. pick() looks the key's slot up. Without a key, picks step through
the table with a large stride, which spreads them.

The table is rebuilt only when the set of (address, weight) changes. It uses
the configured `weight` (when the target has one) rather than the slow-start
ramp: a ramp would remap keys on every step.

Nothing in the table depends on the process: no salted `hash()`, no set or
dict order, no randomness. So balancer instances (and workers) that see the
same targets with the same weights build the same table and send every key to
the same target, without talking to each other. `digest` names the table:
BLAKE2b, 8 bytes, hex, of the owners' addresses in slot order (each UTF-8,
followed by a newline; an empty table hashes no bytes). Equal digests mean
equal tables; the admin side shows it so a divergent instance is visible. It
is computed on first use after a rebuild (about 5 ms at M = 65537), never per
pick.

Bounded load (`hash_balance_factor` f > 1, HAProxy's hash-balance-factor):
a target whose in_flight would exceed ceil(f * (total in flight + 1) * w / W)
(w / W its share of the weights; 1 / n with equal weights) is skipped, and so
are excluded and drained ones: the walk goes on to the next slots of the
table, which belong to other targets in an order fixed by the key, so a
key's overflow always lands on the same next target. Some target always
fits unless exclusions or drained targets forbid it; then the first usable
target met is used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Self
from zlib import crc32

from balancer.config.policies import ALGORITHMS, DEFAULT_TABLE_SIZE
from balancer.core.policies.base import Policy, Target


def static_weight(target: Target) -> float:
    """The configured weight when the target has one, else its effective weight."""
    weight = getattr(target, "weight", None)
    if isinstance(weight, int | float):
        return float(weight)
    return target.effective_weight


def _address_hash(address: str, salt: bytes) -> int:
    digest = hashlib.blake2b(address.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "little")


def build_table(addresses: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """The Maglev table: for each of `size` slots, the index of the target owning it.

    Targets with a weight of 0 or less get no slot; with none left, the table is empty.
    """
    members = [i for i, w in enumerate(weights) if w > 0]
    if not members:
        return []
    max_weight = max(weights[i] for i in members)
    # Per member: the next slot it prefers, its skip, the weight it has claimed so far.
    position = [_address_hash(addresses[i], b"offset") % size for i in members]
    skip = [_address_hash(addresses[i], b"skip") % (size - 1) + 1 for i in members]
    claimed = [0.0] * len(members)
    norm = [weights[i] / max_weight for i in members]
    table = [-1] * size
    filled = 0
    rounds = 0
    while True:
        rounds += 1
        for k, owner in enumerate(members):
            if rounds * norm[k] < claimed[k]:
                continue
            claimed[k] += 1.0
            c = position[k]
            s = skip[k]
            while table[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            table[c] = owner
            c += s
            position[k] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table


def table_digest(addresses: Sequence[str], table: Sequence[int]) -> str:
    """BLAKE2b-64 (hex) of the owners' addresses in slot order, each followed by a newline."""
    encoded = [(a + "\n").encode() for a in addresses]
    return hashlib.blake2b(b"".join([encoded[i] for i in table]), digest_size=8).hexdigest()


class ConsistentHash(Policy):
    name = "consistent_hash"

    def __init__(self, table_size: int = DEFAULT_TABLE_SIZE, balance_factor: float = 0.0) -> None:
        super().__init__()
        problem = ALGORITHMS[self.name].option_error("table_size", table_size)
        if problem is not None:
            raise ValueError(f"policy option 'table_size': {problem}")
        if not (balance_factor == 0 or balance_factor > 1):
            raise ValueError(
                f"hash_balance_factor: expected 0 (off) or a number > 1, got {balance_factor:g}"
            )
        self.table_size = table_size
        self.balance_factor = balance_factor
        self.rebuilds = 0
        self._signature: tuple[tuple[str, float], ...] = ()
        self._ring: list[Target] = []
        self._weights: list[float] = []
        self._members = 0
        self._total_weight = 0.0
        self._table: list[int] = []
        self._digest: str | None = None
        self._stride = max(1, int(table_size * 0.6180339887)) % table_size or 1
        self._spread = 0

    @classmethod
    def from_options(cls, options: Mapping[str, float], balance_factor: float = 0.0) -> Self:
        algorithm = ALGORITHMS[cls.name]
        algorithm.check_options(options)
        return cls(int(algorithm.value(options, "table_size")), balance_factor)

    def update(self, targets: Sequence[Target]) -> None:
        super().update(targets)
        ring = sorted(self.targets, key=lambda t: t.address)
        weights = [static_weight(t) for t in ring]
        signature = tuple(zip((t.address for t in ring), weights, strict=True))
        if signature != self._signature:
            self._signature = signature
            self._table = build_table([t.address for t in ring], weights, self.table_size)
            self._digest = None
            self.rebuilds += 1
        self._ring = ring
        self._weights = weights
        self._members = sum(1 for w in weights if w > 0)
        self._total_weight = sum(w for w in weights if w > 0)

    @property
    def digest(self) -> str:
        """The table's name: equal on every instance that built the same table."""
        if self._digest is None:
            self._digest = table_digest([t.address for t in self._ring], self._table)
        return self._digest

    @property
    def members(self) -> int:
        """Targets the table gives slots to (weight above 0 when it was built)."""
        return self._members

    def pick(self, key: bytes | None = None, exclude: Collection[Target] = ()) -> Target | None:
        table = self._table
        if not table:
            return self._unmapped(exclude)
        if key is None:
            slot = self._spread = (self._spread + self._stride) % self.table_size
        else:
            slot = crc32(key) % self.table_size
        i = table[slot]
        target = self._ring[i]
        if not exclude and target.effective_weight > 0:
            if not self.balance_factor:
                return target
            scale = self._scale()
            if target.in_flight < math.ceil(scale * self._weights[i]):
                return target
            return self._walk(slot, exclude, scale)
        return self._walk(slot, exclude, self._scale() if self.balance_factor else 0.0)

    def _scale(self) -> float:
        """Bounded load: a target of weight w may hold up to ceil(scale * w) in flight."""
        total = sum([t.in_flight for t in self._ring])
        return self.balance_factor * (total + 1) / self._total_weight

    def _walk(self, slot: int, exclude: Collection[Target], scale: float) -> Target | None:
        """The first usable target from `slot` on, within its load bound when `scale` > 0."""
        ring = self._ring
        table = self._table
        weights = self._weights
        size = self.table_size
        seen: set[int] = set()
        fallback: Target | None = None
        for step in range(size):
            i = table[slot + step - size if slot + step >= size else slot + step]
            if i in seen:
                continue
            seen.add(i)
            target = ring[i]
            if target.effective_weight > 0 and not (exclude and target in exclude):
                if not scale or target.in_flight < math.ceil(scale * weights[i]):
                    return target
                if fallback is None:
                    fallback = target
            if len(seen) == self._members:
                break
        return fallback if fallback is not None else self._unmapped(exclude)

    def _unmapped(self, exclude: Collection[Target]) -> Target | None:
        """A usable target the table has no slot for (its weight was 0 when the table was
        built, and nothing else is usable), in address order; None when there is none."""
        for target in self._ring:
            if target.effective_weight > 0 and not (exclude and target in exclude):
                return target
        return None

    def __repr__(self) -> str:
        counts = [0] * len(self._ring)
        for i in self._table:
            counts[i] += 1
        parts = ", ".join(
            f"{t.address} {c} slots {t.in_flight} in flight"
            for t, c in zip(self._ring, counts, strict=True)
        )
        bound = f", balance factor {self.balance_factor:g}" if self.balance_factor else ""
        return (
            f"<ConsistentHash maglev M={self.table_size}{bound}, "
            f"{len(self._ring)} targets: {parts}>"
        )
