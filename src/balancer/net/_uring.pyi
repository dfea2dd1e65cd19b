"""Types of the io_uring relay engine (`_uring.c`)."""

from typing import Any

SETUP_SQPOLL: int
SETUP_SINGLE_ISSUER: int
SETUP_DEFER_TASKRUN: int
SETUP_COOP_TASKRUN: int
SUBMIT_EACH: int
NO_POOL: int
DONE: int
CLOSED: int
ABORTED: int
CLIENT_FAILED: int
BACKEND_FAILED: int

class Ring:
    active: int
    queued: int
    pooled: bool
    waits: int
    def __init__(
        self, entries: int = ..., flags: int = ..., buffer_size: int = ..., max_pairs: int = ...
    ) -> None: ...
    def add(
        self, client_fd: int, backend_fd: int, initial: bytes, client_eof: bool, token: Any
    ) -> int: ...
    def close_pair(self, pair: int) -> None: ...
    def abort_pair(self, pair: int) -> None: ...
    def counts(self, pair: int) -> tuple[int, int]: ...
    def reap(self) -> list[tuple[Any, int, int, int, int]]: ...
    def flush(self) -> list[tuple[Any, int, int, int, int]]: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
