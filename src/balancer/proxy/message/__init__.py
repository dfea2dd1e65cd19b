"""Message mode: every request line is balanced on its own.

How it works:
- A `ClientSession` (one per client connection) frames what the client sends
  into requests and keeps them in arrival order. Each request is handed to
  a backend chosen by the service's policy; replies may come back from
  different backends in any order, and the session writes them to the client
  strictly in request order (a reply waits until every earlier one is there).
- Client framing is the service's `client_framing`: `line` (one request per
  line; an unterminated rest at EOF is one last request), `raw` (each read is
  one message, each reply is written unterminated, as the tutorial's
  original programs send), or `auto`: a first chunk without a newline
  followed by a quiet period (RAW_QUIET_PERIOD, restarted by every chunk) means
  raw; a connection found raw that later sends a newline was not raw after
  all, and is answered with an error and closed.
- Each backend has a `BackendChannel`: a few persistent connections
  (`BackendConnection`) over which requests are pipelined. Replies on one
  connection come back in the order its requests were sent, so each
  connection holds a FIFO of the requests it carries. A connection's framing
  is the backend's (`Backend.framing`) when it is opened; when that changes,
  the old connections take no more requests. A raw connection carries one
  request at a time, and only one client's requests, so a reply that comes
  back in two reads can never reach another client.
- Isolation: every request written to a line backend is exactly one line.
  This is checked once per write, where the bytes go out (`flush`): a batch
  with an empty request, a line break or a bare CR inside a request is
  answered locally, request by request, and never written. A backend that
  answers more than it was sent is failed, so a reply is never matched to a
  request the backend has not seen. Empty requests are answered locally
  (`Invalid message`) for every framing.
- When a backend connection fails while it holds requests, those requests
  are re-sent to another backend (at most `retries` times each, never to a
  backend that already failed them) and the backend is marked down. Only
  when no backend is left does the client get `Server not available`. A
  connect that fails for want of our own resources (file descriptors, local
  ports, memory) is not the backend's fault: no failure is counted, and its
  requests go elsewhere without using up their retries.
- Memory: bytes of unfinished lines are counted per service; over
  `max_buffered` the clients holding the most are cut (`shed_buffers`). When
  much has been freed, the sweep asks the C allocator to return it
  (`malloc_trim`), at most every TRIM_INTERVAL seconds.
- Loops: every backend connection registers its local and remote address
  with `loopguard` while open (health checks do the same); a client
  connection whose peer and local address are one of those pairs reversed is
  this balancer talking to itself, and the backend it was opened for is
  marked as a loop. The peer address alone is not proof: a local client may
  get the same ephemeral port as one of our connections to elsewhere.
- Writes are coalesced: everything queued for a connection during one turn
  of the event loop (requests from all clients for a backend connection,
  replies from all backends for a client) goes out as one write at the end
  of that turn. A backend connection is added only when the open ones each
  carry several requests, so requests share connections and writes.

Where each part lives: `request` (a request, the mode's tunables),
`connection` (a backend connection matching replies to its FIFO),
`channel` (a backend's connections), `dispatch` (the request path: pick,
queue, settle, fail, retry, the coalesced writes), `session` (a client
connection) and `service` (listener, sweep, reload, drain).
"""
