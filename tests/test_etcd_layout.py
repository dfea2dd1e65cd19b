"""The etcd key layout of a service's backends (pure): keys and values to a view."""

from __future__ import annotations

from balancer.config.discovery import DiscoverTarget, parse_discover
from balancer.config.model import BackendConfig
from balancer.core import etcd_layout
from balancer.core.etcd_layout import admin_key, backend_key, service_dir, view
from balancer.net.etcd import prefix_end, watch_events

D = service_dir("/balancer", "web")


def kv(**entries: str) -> dict[str, bytes]:
    return {D + key.replace("__", "/"): value.encode() for key, value in entries.items()}


def test_keys_of_a_service() -> None:
    assert D == "/balancer/web/"
    assert service_dir("/balancer/", "web") == D
    assert backend_key("/balancer", "web", "127.0.0.1:80") == "/balancer/web/backends/127.0.0.1:80"
    assert admin_key("/a/b", "web", "[::1]:80") == "/a/b/web/admin/[::1]:80"


def test_backends_with_their_weights_in_address_order() -> None:
    found = view(
        D,
        {
            D + "backends/127.0.0.2:80": b'{"weight": 3}',
            D + "backends/127.0.0.1:80": b"",
            D + "backends/[::1]:81": b"{}",
            "/balancer/other/backends/127.0.0.9:80": b"{}",
            "/balancer/webx/backends/127.0.0.8:80": b"{}",
        },
    )
    assert found.backends == (
        BackendConfig("127.0.0.1", 80, 1),
        BackendConfig("127.0.0.2", 80, 3),
        BackendConfig("::1", 81, 1),
    )
    assert found.states == {"127.0.0.1:80": "up", "127.0.0.2:80": "up", "[::1]:81": "up"}
    assert found.problems == ()


def test_admin_keys_set_states_and_weights_of_listed_backends_only() -> None:
    found = view(
        D,
        {
            D + "backends/127.0.0.1:80": b'{"weight": 3}',
            D + "backends/127.0.0.2:80": b"{}",
            D + "admin/127.0.0.1:80": b'{"state": "drain", "weight": 7}',
            D + "admin/127.0.0.2:80": b'{"state": "maint"}',
            D + "admin/127.0.0.3:80": b'{"state": "drain"}',
        },
    )
    assert found.backends == (BackendConfig("127.0.0.1", 80, 7), BackendConfig("127.0.0.2", 80, 1))
    assert found.states == {"127.0.0.1:80": "drain", "127.0.0.2:80": "maint"}


def test_bad_keys_and_values_are_skipped_and_said() -> None:
    found = view(
        D,
        {
            D + "backends/127.0.0.1:80": b"{}",
            D + "backends/nothing": b"{}",
            D + "backends/127.0.0.2:80": b"[1]",
            D + "backends/127.0.0.3:80": b'{"weight": 0}',
            D + "backends/127.0.0.4:80": b'{"weight": true}',
            D + "backends/127.0.0.5:80": b"\xff",
            D + "admin/127.0.0.1:80": b'{"state": "gone"}',
            D + "later/whatever": b"{}",
        },
    )
    assert found.backends == (BackendConfig("127.0.0.1", 80, 1),)
    assert found.states == {"127.0.0.1:80": "up"}  # its admin key was skipped
    assert len(found.problems) == 6
    assert any("'nothing' is not host:port" in p for p in found.problems)
    assert any("weight 0 is not 1..1000" in p for p in found.problems)
    assert any("state 'gone' is not one of up, drain, maint" in p for p in found.problems)


def test_values_the_api_writes_read_back() -> None:
    assert etcd_layout.admin_entry(etcd_layout.encode_admin("drain", 5).encode()) == (
        etcd_layout.AdminEntry("drain", 5)
    )
    assert etcd_layout.admin_entry(etcd_layout.encode_admin(None, None).encode()) == (
        etcd_layout.AdminEntry()
    )
    found = view(D, {D + "backends/127.0.0.1:80": etcd_layout.encode_backend(9).encode()})
    assert found.backends == (BackendConfig("127.0.0.1", 80, 9),)


def test_discover_etcd_targets() -> None:
    assert parse_discover("etcd") == DiscoverTarget("etcd", "")
    assert parse_discover("etcd:web-2") == DiscoverTarget("etcd", "web-2")
    assert parse_discover("etcd:") is None
    assert parse_discover("etcd:a/b") is None


def test_prefix_ranges() -> None:
    import base64

    assert base64.b64decode(prefix_end("/balancer/")) == b"/balancer0"
    assert base64.b64decode(prefix_end("a\xff")) == "a\xff".encode()[:-1] + b"\xc0"
    assert base64.b64decode(prefix_end("")) == b"\0"


def test_watch_answers_become_events() -> None:
    import base64

    def b(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    events = watch_events(
        {
            "events": [
                {"kv": {"key": b("/k1"), "value": b("v"), "mod_revision": "7", "lease": "9"}},
                {"type": "DELETE", "kv": {"key": b("/k2"), "mod_revision": "8"}},
            ]
        }
    )
    assert [(e.kind, e.kv.key, e.kv.value, e.kv.lease) for e in events] == [
        ("put", "/k1", b"v", 9),
        ("delete", "/k2", b"", 0),
    ]
