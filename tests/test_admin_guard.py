"""Who may use the admin endpoint (Host, Origin, tokens): the rules alone, no sockets."""

from __future__ import annotations

import pytest

from balancer.adminguard import OPEN, READ, WRITE, AdminGuard, check_admin_security, split_host
from balancer.config import AdminConfig, ConfigError


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
