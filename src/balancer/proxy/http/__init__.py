"""HTTP/1.1 mode: a reverse proxy that balances every request.

How it works: each client connection is a `client.ClientConnection`, which
parses requests with the sans-IO reader of `balancer.core.http.wire` and
serves them in order, one `exchange.Exchange` at a time (pipelined requests
wait their turn, so answers keep their order). An exchange picks a backend
with the service's algorithm, takes an idle kept-alive connection to it from
`upstream.IdlePool` or makes one (`connect`), sends the request
re-serialized from what was parsed (never the bytes received, so the proxy and
the backend cannot disagree about where a message ends), with the header
rules of `balancer.core.http.headers`, and relays the response as it comes.
When an attempt fails before any response byte reached the client,
`balancer.core.http.replay` says whether and where the request goes again.
A 101 response turns the pair into a byte relay (`tunnel.Tunnel`).
"""
