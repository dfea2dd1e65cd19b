"""Restarts that drop nothing: a new process takes the listening sockets of this one.

How it works:
- A balancer started with `--handover-socket PATH` listens, once it is ready, on a Unix
  seqpacket socket at PATH (mode 0600; `balancer.net.handover` has the wire), one
  session at a time:
  1. the new process (`--takeover PATH`) sends `takeover` with its pid;
  2. the running one answers with `listeners` messages carrying, by SCM_RIGHTS,
     duplicates of its listening sockets (the same kernel sockets, backlogs and all)
     and what each is: the (host, port) its config names and the one it is bound to;
  3. the new process starts on them (a service, or the admin endpoint, whose listen
     address is the same serves on the socket received; one whose address is new binds)
     and, once it serves (`balancer ready`), sends `ready`;
  4. the running one answers `draining`, stops accepting (it closes its own copies and
     never calls shutdown(): the kernel sockets live on in the new process, and what
     waits in their backlogs is the new process's to accept), drains and exits 0.
  A session that ends any other way (the connection closed, a bad message, no `ready`
  within READY_TIMEOUT) changes nothing: the running process serves on and says why.
  Reloads wait while a session holds the listeners (the reload lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Protocol

from balancer.config.addresses import format_address
from balancer.net.handover import (
    RECEIVE_TIMEOUT,
    Handed,
    HandoverError,
    NothingToTakeOver,
    bind_control,
    check_path,
    encode,
    expect,
    identity,
    listener_messages,
    parse_listeners,
    pid_of,
    recv_listeners,
    recv_message,
    send_message,
)

log = logging.getLogger("balancer")

REQUEST_TIMEOUT = 5.0
"""The running process waits this long for the request of a connection it accepted."""
READY_TIMEOUT = 300.0
"""The running process waits this long for the new one to serve (its first health round)."""
ACK_TIMEOUT = 5.0
"""The new process waits this long for the running one to say it drains."""
MAX_LISTENERS = 4096


# -- the running process's side -------------------------------------------------------------


class HandoverSource(Protocol):
    """What the hand-over needs of the running server."""

    stopping: bool

    def handover_listeners(self) -> list[tuple[Handed, socket.socket]]:
        """Duplicates of every listening socket, with what each is (closed by the caller)."""
        ...

    def handed_over(self, pid: int) -> None:
        """The process `pid` serves on them now: stop accepting, drain, exit."""
        ...


class HandoverListener:
    """The running balancer's handover socket: hands its listeners to one new process."""

    def __init__(
        self,
        path: str,
        source: HandoverSource,
        lock: asyncio.Lock,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.path = path
        self.source = source
        self.lock = lock
        """Held from the first socket sent to the end: no reload changes the listeners."""
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self.handed_to: int | None = None
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._refusals: set[asyncio.Task[None]] = set()

    def open(self, replacing: str | None = None) -> None:
        """Listen on the path (HandoverError or OSError when it cannot be had)."""
        check_path(self.path, replacing)
        self._sock, self._identity = bind_control(self.path)
        loop = asyncio.get_running_loop()
        self._accepting = loop.create_task(self._accept_forever(), name="handover socket")
        log.info(
            "handover socket listening on %s (a new balancer takes over with --takeover %s)",
            self.path,
            self.path,
        )

    async def _accept_forever(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of file descriptors, say: try again soon
                log.warning("handover socket: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            busy = self._session is not None and not self._session.done()
            if busy or self.handed_to is not None:
                refusal = loop.create_task(self._refuse(conn), name="handover refusal")
                self._refusals.add(refusal)
                refusal.add_done_callback(self._refusals.discard)
                continue
            self._session = loop.create_task(self._serve(conn), name="handover session")

    async def _refuse(self, conn: socket.socket) -> None:
        """Read the request (a socket closed with a message unread resets the peer before
        it reads the answer), then say no."""
        try:
            request = expect(await recv_message(conn, self.request_timeout, "request"), "takeover")
            await send_message(conn, encode("refused", reason="another takeover is under way"))
            log.warning("handover: refused pid %d: another takeover is under way", pid_of(request))
        except (HandoverError, OSError) as exc:
            log.debug("handover: a connection refused: %s", exc)
        finally:
            conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._handover(conn)
        except HandoverError as exc:
            log.warning("handover: %s; this process serves on", exc)
        except OSError as exc:
            log.warning("handover: the control connection failed: %s; this process serves on", exc)
        finally:
            conn.close()

    async def _handover(self, conn: socket.socket) -> None:
        try:
            request = expect(
                await recv_message(conn, self.request_timeout, "takeover request"), "takeover"
            )
        except HandoverError as exc:
            if str(exc) == "the connection closed":
                log.debug("handover: a connection closed without a request (a probe)")
                return
            raise HandoverError(f"refused a connection: {exc}") from None
        pid = pid_of(request)
        async with self.lock:
            if self.source.stopping:
                await send_message(conn, encode("refused", reason="this balancer is stopping"))
                raise HandoverError(f"refused a takeover by pid {pid}: this balancer is stopping")
            listeners = self.source.handover_listeners()
            try:
                at = 0
                for data, count in listener_messages(os.getpid(), [h for h, _ in listeners]):
                    await send_message(
                        conn, data, [s.fileno() for _, s in listeners[at : at + count]]
                    )
                    at += count
            finally:
                for _, sock in listeners:
                    sock.close()
            log.info(
                "handover: gave %d listening socket(s) to pid %d (%s); this process serves "
                "until it says it serves",
                len(listeners),
                pid,
                ", ".join(f"{h.what} {format_address(*h.bound)}" for h, _ in listeners),
            )
            try:
                expect(await recv_message(conn, self.ready_timeout, "ready"), "ready")
            except HandoverError as exc:
                raise HandoverError(f"takeover by pid {pid} failed ({exc} before ready)") from None
            self.handed_to = pid
            with contextlib.suppress(OSError, HandoverError):
                await send_message(conn, encode("draining", pid=os.getpid()))
            self.stop_listening()
            self.source.handed_over(pid)

    def stop_listening(self) -> None:
        """Accept no more takeovers; remove the path if it is still ours."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self._identity is not None and identity(self.path) == self._identity:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    def close(self) -> None:
        self.stop_listening()
        if self._session is not None and not self._session.done():
            self._session.cancel()
        for refusal in list(self._refusals):
            refusal.cancel()

    def __repr__(self) -> str:
        state = f"handed to pid {self.handed_to}" if self.handed_to else "listening"
        return (
            f"<HandoverListener {self.path}: {state if self._sock or self.handed_to else 'closed'}>"
        )


# -- the new process's side -----------------------------------------------------------------


class Takeover:
    """The new process's control connection: the listeners received, then `ready` said."""

    def __init__(self, path: str, conn: socket.socket, old_pid: int) -> None:
        self.path = path
        self.conn = conn
        self.old_pid = old_pid

    @classmethod
    def receive(
        cls, path: str, timeout: float = RECEIVE_TIMEOUT
    ) -> tuple[Takeover, list[tuple[Handed, socket.socket]]]:
        """Connect to the balancer on `path` and take every listening socket it hands
        over (blocking, each answer within `timeout`); HandoverError if it cannot."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(timeout)
        received: list[tuple[Handed, socket.socket]] = []
        try:
            try:
                conn.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise NothingToTakeOver(
                    f"no balancer answers on {path} ({exc.strerror or exc})"
                ) from None
            except OSError as exc:
                raise HandoverError(f"cannot connect to {path}: {exc.strerror or exc}") from None
            conn.sendall(encode("takeover", pid=os.getpid()))
            while True:
                doc, socks = recv_listeners(conn)
                try:
                    handed, last = parse_listeners(expect(doc, "listeners"))
                    if len(handed) != len(socks):
                        raise HandoverError(
                            f"{len(socks)} socket(s) received for {len(handed)} listener(s)"
                        )
                    old_pid = pid_of(doc)
                except BaseException:
                    for sock in socks:
                        sock.close()
                    raise
                received.extend(zip(handed, socks, strict=True))
                if len(received) > MAX_LISTENERS:
                    raise HandoverError(f"more than {MAX_LISTENERS} listeners")
                if last:
                    break
        except OSError as exc:
            for _, sock in received:
                sock.close()
            conn.close()
            raise HandoverError(f"the control connection failed: {exc.strerror or exc}") from None
        except BaseException:
            for _, sock in received:
                sock.close()
            conn.close()
            raise
        log.info(
            "takeover: received %d listening socket(s) from the balancer pid %d on %s: %s",
            len(received),
            old_pid,
            path,
            ", ".join(f"{h.what} {format_address(*h.bound)}" for h, _ in received) or "none",
        )
        return cls(path, conn, old_pid), received

    async def ready(self) -> None:
        """Tell the old process this one serves; wait (bounded) for it to say it drains."""
        try:
            self.conn.sendall(encode("ready", pid=os.getpid()))
        except OSError as exc:
            log.warning(
                "takeover: could not tell the balancer pid %d that this one serves (%s): it "
                "may still serve too; stop it yourself",
                self.old_pid,
                exc.strerror or exc,
            )
            self.close()
            return
        self.conn.setblocking(False)
        try:
            expect(await recv_message(self.conn, ACK_TIMEOUT, "answer"), "draining")
        except (HandoverError, OSError) as exc:
            log.warning(
                "takeover: the balancer pid %d did not say it drains: %s", self.old_pid, exc
            )
        else:
            log.info(
                "takeover done: this process serves; the balancer pid %d stops accepting and "
                "drains",
                self.old_pid,
            )
        finally:
            self.close()

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"<Takeover from pid {self.old_pid} on {self.path}>"
