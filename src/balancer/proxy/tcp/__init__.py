"""TCP (L4) mode: each client connection is relayed, byte for byte, to one backend.

How it works: the listener accepts a connection and a `_ClientSide` protocol
takes it. It asks the pool for a backend (keyed by the client's address) and
connects to it; bytes the client sends meanwhile are held, up to
`connect_buffer`, after which the client is not read until the backend
answers. A backend that refuses or does not answer within `connect_timeout` is
marked down and the next one is tried (at most `retries` more), the held bytes
going to whichever accepts. Once connected, a `_BackendSide` protocol owns the
backend socket and the two sides relay to each other:

- Flow control: when one side's transport buffers more than `_HIGH_WATER`
  bytes it pauses reading on the other side, and resumes it below
  `_LOW_WATER`, so a fast sender and a slow reader cost bounded memory.
- Half-close: an EOF from one peer is passed on with `write_eof()`; the other
  direction keeps flowing until it ends too, then both sockets are closed.
- Resets: a side lost with an error aborts the other with an RST (SO_LINGER 0).
- Each side's `data_received` is, once connected, the other side's bound
  `transport.write` itself (an instance attribute, handed to the loop again
  with `set_protocol`): on uvloop a chunk goes from the read to the write in
  C, with no Python frame per chunk, the system calls of a C relay and little
  more.
- Byte counters and idleness come from the kernel (`TCP_INFO`), not from
  counting chunks: a side's bytes received are added to its backend's
  counters when the peer's EOF arrives, when the connection ends (the loop
  calls `connection_lost` before it closes the socket) and when `/status` or
  `/metrics` asks (`TcpService.account`).

Limits: `max_connections` per service and `max_backend_connections` per
backend refuse excess connections cleanly (accepted, closed, counted in
`refused`); a backend at its limit is skipped for the next one. When the
process's descriptor budget (`resources.FDS`) is set, each relayed connection
takes two descriptors of it (the client's socket and the backend's) at
accept, and one that would eat into the reserve kept for health checks,
backend connects and the admin endpoint is refused the same way.
`idle_timeout` closes a connection that moved no byte in either direction for
that long, checked by one periodic sweep rather than a timer per connection,
from the time since each socket last received data (`tcpi_last_data_recv`).

Local shortages: a backend connect that fails because this process is out of
descriptors, socket memory or local ports (`resources.is_local_shortage`) says
nothing about the backend: no failure is counted against it, no other backend
is tried, the alarm notes it and the client connection is closed (counted in
`not_available`).

Loops (a backend that is this balancer itself): a backend address that
resolves to one of this process's listeners is marked a loop
(`pool.mark_loop`: down for good) before any connect, and the next backend is
tried. For loops no address comparison sees (address translation, probes of
the health checker), the backend socket is made and its connect started here,
not by `loop.create_connection`, so its local address is registered
(`balancer.net.loopguard`) before the
event loop can run the accept on the other end. An accepted connection that
`loopguard` finds to be one of our own backend connections is closed at once,
before it picks a backend, and that backend is marked a loop. The connection
that opened it goes on to the next backend if it is not relaying yet, and is
closed if it is. The check is made again before each connect and when the
backend side attaches, for sockets registered late by others.

Engines: the relaying described above is the `uvloop` engine's; with `io_uring`
(the default where the kernel allows it) the connected pair is handed to one
io_uring for the process and handed back when it ends (`engine`), the rest
unchanged.

Where each part lives: `relay` (the two sides of a relayed connection and the
connect loop), `service` (listener, limits, idle sweep, drain), `engine` (which
engine, and the ring's hand-over and hand-back), `held` (the backend socket of a
pair the ring relays); what every mode shares to reach backends is in
`balancer.proxy.upstream`.
"""
