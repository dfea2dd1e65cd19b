"""Who may use the admin endpoint (Host, Origin, tokens): the rules alone, no sockets."""

from __future__ import annotations

import socket

import pytest

from balancer.admin.security import (
    OPEN,
    READ,
    WRITE,
    AdminGuard,
    Refusal,
    check_admin_security,
    is_loopback,
    split_host,
)
from balancer.config.errors import ConfigError
from balancer.config.model import AdminConfig


def guard(**settings: object) -> AdminGuard:
    """A guard on this machine called "box", where 192.0.2.7 is one of its addresses."""
    return AdminGuard(
        AdminConfig(**settings),  # type: ignore[arg-type]
        hostname="box",
        is_local=lambda ip: ip == "192.0.2.7",
    )


# -- Host -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:9100", ("localhost", 9100)),
        ("localhost.:9100", ("localhost", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::1]", ("::1", None)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("", None),
        ("a b", None),
        ("host:", None),
        ("host:99999", None),
        ("host:12:13", None),
        ("::1", None),
        ("[nope]:80", None),
        ("[::1", None),
        ("h\u00e9te", None),
    ],
)
def test_split_host(text: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(text) == parsed


def test_a_rebinding_name_is_refused_on_a_loopback_listener() -> None:
    g = guard(host="127.0.0.1", port=9100)
    for ours in ("127.0.0.1:9100", "localhost:9100", "[::1]:9100", "127.0.0.2:9100", "box:9100"):
        assert g.check_host(ours) is None, ours
    refusal = g.check_host("rebind.evil.example:9100")
    assert refusal is not None
    assert refusal.status == 421
    assert "rebind.evil.example" in refusal.message
    assert "allowed_hosts" in refusal.message
    # an address of this host that the listener is not bound to is not its name
    assert g.check_host("192.0.2.7:9100") is not None
    malformed = g.check_host("a b")
    assert malformed is not None
    assert malformed.status == 400
    # no Host at all: not a browser, nothing to rebind
    assert g.check_host(None) is None


def test_allowed_hosts_and_the_listen_address_pass() -> None:
    g = guard(host="0.0.0.0", port=9100, allowed_hosts=("admin.example", "lb.example:8443"))
    assert g.check_host("admin.example:1234") is None
    assert g.check_host("lb.example:8443") is None
    assert g.check_host("lb.example:9100") is not None  # that entry names its port
    assert g.check_host("192.0.2.7:9100") is None  # wildcard listener: this host's addresses
    assert g.check_host("192.0.2.8:9100") is not None
    named = guard(host="admin.internal", port=9100)
    assert named.check_host("admin.internal:9100") is None
    assert named.check_host("192.0.2.7:9100") is not None
    named.listening_on("192.0.2.7")
    assert named.check_host("192.0.2.7:9100") is None


# -- Origin -----------------------------------------------------------------------------------


def test_only_the_endpoints_own_origin_passes() -> None:
    g = guard()
    host = "127.0.0.1:9100"
    assert g.check_request(host, None) is None
    assert g.check_request(host, "http://127.0.0.1:9100") is None
    for origin in (
        "http://evil.example",
        "null",
        "http://127.0.0.1:9101",
        "http://[::1",
        "file://",
        "javascript:1",
    ):
        refusal = g.check_request(host, origin)
        assert refusal is not None, origin
        assert refusal.status == 403, origin
    # a rebinding page sends its own name in both: the Host check answers first
    refusal = g.check_request("evil.example:9100", "http://evil.example:9100")
    assert refusal is not None
    assert refusal.status == 421


# -- tokens -----------------------------------------------------------------------------------


def test_tokens_for_reads_and_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    loopback_open = guard()
    for access in (OPEN, READ, WRITE):
        assert loopback_open.check_token(access, None) is None

    g = guard(token="w", read_token="r", read_access="token")
    assert g.check_token(OPEN, None) is None
    for access in (READ, WRITE):
        for header in (None, "", "Bearer", "Basic w", "Bearer nope", "Bearer \udcff"):
            refusal = g.check_token(access, header)
            assert refusal is not None, (access, header)
            assert refusal.status == 401, (access, header)
    assert g.check_token(READ, "Bearer r") is None
    assert g.check_token(READ, "bearer  w ") is None
    assert g.check_token(WRITE, "Bearer w") is None
    refusal = g.check_token(WRITE, "Bearer r")
    assert refusal is not None
    assert (refusal.status, "only read" in refusal.message) == (403, True)


def test_read_access_auto_is_open_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCER_ADMIN_TOKEN", "from-env")
    assert guard(host="127.0.0.1").check_token(READ, None) is None
    public = guard(host="0.0.0.0")
    refusal = public.check_token(READ, None)
    assert refusal is not None
    assert refusal.status == 401
    assert public.check_token(READ, "Bearer from-env") is None
    assert public.check_token(WRITE, "Bearer from-env") is None
    assert guard(host="0.0.0.0", read_access="open").check_token(READ, None) is None


def test_read_access_token_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="read_access"):
        check_admin_security(AdminConfig(read_access="token"))
    check_admin_security(AdminConfig(read_access="token", read_token="r"))
    check_admin_security(AdminConfig(read_access="token", token="w"))
    monkeypatch.setenv("BALANCER_ADMIN_TOKEN", "from-env")
    check_admin_security(AdminConfig(read_access="token"))


# -- what each refusal says (the operator reads these) ----------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("192.0.2.7", False),
        ("admin.example", False),
        (".localhost", False),
        ("localhost.example", False),
        ("", False),
    ],
)
def test_which_listen_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_security_errors_name_the_key_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError) as public:
        check_admin_security(AdminConfig(host="0.0.0.0", port=9100))
    assert (public.value.source, public.value.where) == ("admin", "listen")
    assert public.value.message == (
        "the admin endpoint 0.0.0.0:9100 is reachable from other hosts, so its runtime API "
        "needs a token: set [admin] token in the config or the BALANCER_ADMIN_TOKEN "
        "environment variable (or listen on 127.0.0.1)"
    )
    with pytest.raises(ConfigError) as reads:
        check_admin_security(AdminConfig(read_access="token"))
    assert (reads.value.source, reads.value.where) == ("admin", "read_access")
    assert reads.value.message == (
        'read_access = "token" needs a token to accept: set [admin] read_token or token '
        "(or the BALANCER_ADMIN_TOKEN environment variable)"
    )
    check_admin_security(AdminConfig(host="0.0.0.0", enabled=False))  # off: nothing to guard


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("[::1]]:80", None),
        ("[]", None),
        ("box.:65535", ("box", 65535)),
        ("box:65536", None),
        ("box:012345", None),
        ("box:00080", ("box", 80)),
        ("my-box_1.lan", ("my-box_1.lan", None)),
        ("box;x", None),
        ("  Box:81  ", ("box", 81)),
    ],
)
def test_split_host_edges(text: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(text) == parsed


def test_the_guards_names_come_from_the_listen_address_and_the_hostname() -> None:
    g = AdminGuard(AdminConfig(host="[::1]"), hostname="Box.Example.", is_local=lambda ip: False)
    assert g.own_names == {"localhost", "::1", "box.example"}
    assert g.check_host("box.example:9100") is None
    g.listening_on("[FE80::1]")
    assert "fe80::1" in g.own_names
    g.listening_on("0.0.0.0")
    assert "0.0.0.0" not in g.own_names, "a wildcard is no name"
    wildcard = AdminGuard(AdminConfig(host="::"), hostname="", is_local=lambda ip: False)
    assert wildcard.own_names == {"localhost"}
    assert wildcard.wildcard


def test_the_machines_own_hostname_is_a_name_of_the_guard() -> None:
    name = socket.gethostname().lower().rstrip(".")
    g = AdminGuard(AdminConfig())
    assert name in g.own_names
    assert g.check_host(f"{name}:9100") is None


def test_refusals_say_what_was_refused_and_clip_what_the_client_sent() -> None:
    g = guard(host="127.0.0.1", port=9100)
    assert g.check_host("a b") == Refusal(400, "malformed Host header 'a b'")
    long_name = "x" * 100 + ".example"
    refusal = g.check_host(long_name)
    assert refusal is not None
    clipped = repr(long_name)[:59] + "…"
    assert refusal == Refusal(
        421,
        f"this admin endpoint does not answer to the name {clipped}; "
        "add it to [admin] allowed_hosts if it is one of this host's names",
    )
    assert g.check_origin("http://evil.example", None) == Refusal(
        403, "cross-site request refused (Origin 'http://evil.example')"
    )


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        ("NULL", "127.0.0.1:9100", False),
        (" null ", "127.0.0.1:9100", False),
        ("HTTPS://127.0.0.1:9100", "127.0.0.1:9100", True),
        ("http://LOCALHOST:9100", "localhost:9100", True),
        ("http://localhost:9100", "LocalHost:9100", True),
        ("ftp://127.0.0.1:9100", "127.0.0.1:9100", False),
        ("http://", "127.0.0.1:9100", False),
        # no Host header: the Origin must name the endpoint itself
        ("http://127.0.0.1:9100", None, True),
        ("http://LocalHost:9100", None, True),
        ("http://evil.example:9100", None, False),
        ("http://a b", None, False),
    ],
)
def test_origin_cases(origin: str, host: str | None, ok: bool) -> None:
    assert (guard().check_origin(origin, host) is None) is ok


def test_token_refusals_say_what_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    g = guard(token="w", read_token="r", read_access="token")
    assert g.check_token(READ, None) == Refusal(
        401,
        "reads need a token: send 'Authorization: Bearer <token>' with the read token or "
        "the write token",
    )
    assert g.check_token(READ, "Bearer nope") == Refusal(401, "wrong token")
    assert g.check_token(WRITE, None) == Refusal(
        401, "writes need a token: send 'Authorization: Bearer <token>'"
    )
    assert g.check_token(WRITE, "Bearer nope") == Refusal(401, "wrong token")
    assert g.check_token(WRITE, "Bearer r") == Refusal(
        403, "this token may only read; writes need the write token"
    )
    closed = guard(host="0.0.0.0", read_access="open")
    assert closed.check_token(WRITE, None) == Refusal(
        401, "writes need a token; none is configured"
    )
    assert g.check_token(WRITE, "Bearer w\udcff") == Refusal(401, "wrong token")
    unicode = guard(token="t\u00e9", read_access="token")
    assert unicode.check_token(WRITE, "Bearer t\u00e9") is None
    assert unicode.check_token(READ, "Bearer t\u00e9") is None


def test_the_guards_repr_says_who_may_read_and_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    assert repr(guard(host="127.0.0.1")) == (
        "<AdminGuard names=['127.0.0.1', 'box', 'localhost'] allowed=[] wildcard=False "
        "reads=open writes=loopback>"
    )
    assert repr(guard(host="0.0.0.0", token="w", allowed_hosts=("a.example:81",))) == (
        "<AdminGuard names=['box', 'localhost'] allowed=[('a.example', 81)] wildcard=True "
        "reads=token writes=token>"
    )
    assert repr(guard(host="0.0.0.0", read_access="open")).endswith("reads=open writes=closed>")
