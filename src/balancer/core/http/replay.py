"""When an HTTP request may be sent again, and where (no I/O).

A request is sent again only while nothing of its response reached the
client, and only when its body (if any) is still whole in the replay buffer.
Then:

- a connect that failed sent nothing: any method goes to another backend,
  unless it is the keep-alive race's fresh try that failed (below);
- a reused keep-alive connection that failed before any response byte came
  back (the backend closed it as we reused it, the keep-alive race) costs the
  client nothing: the request goes once more, on a fresh connection to the
  same backend, whatever its method. Should that fresh connect fail, the
  backend was not closing an idle connection but going down, and may have
  acted on the request: only an idempotent method (or `retry_non_idempotent`)
  goes on to another backend;
- a request sent on a connection that then failed, or got no response head
  in time, or whose status is in `retry_on_status`, goes to another backend
  only when its method is idempotent (or `retry_non_idempotent` says so):
  the backend may have acted on it.

`retries` and the retry budget bound the retries to other backends; the
keep-alive race's one fresh try is not a retry of the backend's fault and
takes from neither.
"""

from __future__ import annotations

import enum

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Stage(enum.Enum):
    CONNECT = "connect"
    """The connect failed: nothing was sent."""
    SENT = "sent"
    """The connection failed after the request (or part of it) was sent, before any
    response byte."""
    TIMEOUT = "timeout"
    """No response head within `response_header_timeout`."""
    STATUS = "status"
    """The response head's status is one of `retry_on_status` (nothing sent on yet)."""


class Again(enum.Enum):
    NO = "no"
    FRESH = "fresh"
    """Once more on a new connection to the same backend (the keep-alive race)."""
    OTHER = "other"
    """To another backend, if `retries` and the retry budget allow."""


def send_again(
    stage: Stage,
    method: bytes,
    *,
    replayable: bool,
    reused: bool,
    response_byte: bool,
    race_retried: bool,
    retry_non_idempotent: bool,
) -> Again:
    """May the request go again after a failure at `stage`, and where."""
    if not replayable:
        return Again.NO
    may_repeat = method in IDEMPOTENT or retry_non_idempotent
    if stage is Stage.CONNECT:
        return Again.OTHER if may_repeat or not race_retried else Again.NO
    if stage is Stage.SENT and reused and not response_byte and not race_retried:
        return Again.FRESH
    return Again.OTHER if may_repeat else Again.NO
