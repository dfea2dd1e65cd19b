"""Which backend a request belongs with, when it says (no I/O).

- `request_key` is what `consistent_hash` hashes for a request: the client's
  address (`source`), the path without its query (`path`), a header's value
  (`header:NAME`) or a cookie's (`cookie:NAME`); a request without that header
  or cookie falls back to the client's address.
- A sticky cookie names a backend by `backend_token`: a digest of its address
  (the same in every balancer instance, and it does not show the address).
"""

from __future__ import annotations

import hashlib

from balancer.core.http.wire import Head


def cookie_value(head: Head, name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie headers (the first one)."""
    for header, value in head.headers:
        if len(header) == 6 and header.lower() == b"cookie":
            for pair in value.split(b";"):
                key, eq, found = pair.strip().partition(b"=")
                if eq and key == name:
                    return found.strip(b'"')
    return None


def header_value(head: Head, name: bytes) -> bytes | None:
    for header, value in head.headers:
        if header.lower() == name:
            return value
    return None


def request_key(head: Head, hash_key: str, client_ip: str) -> bytes:
    """What `consistent_hash` hashes for this request."""
    found: bytes | None = None
    if hash_key == "path":
        found = head.target.split(b"?", 1)[0]
    elif hash_key.startswith("header:"):
        found = header_value(head, hash_key[7:].lower().encode())
    elif hash_key.startswith("cookie:"):
        found = cookie_value(head, hash_key[7:].encode())
    return found if found else client_ip.encode()


def backend_token(address: str) -> bytes:
    return hashlib.sha256(address.encode()).hexdigest()[:16].encode()


def set_cookie(name: bytes, token: bytes) -> bytes:
    return b"%s=%s; Path=/; HttpOnly; SameSite=Lax" % (name, token)
