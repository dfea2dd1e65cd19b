"""The tutorial's synchronous API: `Client` (connect, `send`, `disconnect`) and the handle on
one backend that the tutorial calls its `Server` class (`check_connection`, `send`), here
`BackendHandle` so that it is not taken for the balancer's server."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Self

from balancer.tools.client.load import MAX_REPLY_LINE
from balancer.wire import HEALTH_CHECK


class Client:
    """A blocking line client: connects on creation, `send` returns the reply line."""

    def __init__(self, host: str = "localhost", port: int = 8080, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = socket.create_connection((host, port), timeout)
        self._reader = self._sock.makefile("rb")

    def send(self, msg: str) -> str:
        """Send one request line and return the reply line (without its line ending)."""
        if self._sock is None:
            raise ConnectionError("client is disconnected")
        self._sock.sendall(msg.encode() + b"\n")
        line = self._reader.readline(MAX_REPLY_LINE)
        if not line:
            raise ConnectionError(f"{self.host}:{self.port} closed the connection")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def disconnect(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()


class BackendHandle:
    """A handle on one backend: health check and requests over a kept connection."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client: Client | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def check_connection(self) -> bool:
        """True when the backend answers `!HEALTH_CHECK` on a fresh connection."""
        try:
            with Client(self.host, self.port, self.timeout) as probe:
                return probe.send(HEALTH_CHECK) == HEALTH_CHECK
        except (OSError, UnicodeError):
            return False

    def send(self, msg: str) -> str:
        """One request on the kept connection (reconnecting once if it broke)."""
        for attempt in range(2):
            if self._client is None:
                self._client = Client(self.host, self.port, self.timeout)
            try:
                return self._client.send(msg)
            except OSError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    def __repr__(self) -> str:
        return f"<BackendHandle {self.address}>"
