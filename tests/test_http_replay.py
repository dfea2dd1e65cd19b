"""When a failed http request goes again, and where (`core.http.replay`), and which backend a
request belongs with (`core.http.affinity`): every rule, no I/O."""

from __future__ import annotations

import pytest

from balancer.core.http.affinity import backend_token, cookie_value, request_key, set_cookie
from balancer.core.http.replay import IDEMPOTENT, Again, Stage, send_again
from balancer.core.http.wire import Head, RequestReader


def again(
    stage: Stage,
    method: bytes = b"GET",
    *,
    replayable: bool = True,
    reused: bool = False,
    response_byte: bool = False,
    race_retried: bool = False,
    retry_non_idempotent: bool = False,
) -> Again:
    return send_again(
        stage, method, replayable=replayable, reused=reused, response_byte=response_byte,
        race_retried=race_retried, retry_non_idempotent=retry_non_idempotent,
    )  # fmt: skip


def test_the_idempotent_methods_are_those_of_rfc_9110() -> None:
    assert frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}) == IDEMPOTENT


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_nothing_goes_again_once_its_body_is_no_longer_whole(stage: Stage, method: bytes) -> None:
    assert again(stage, method, replayable=False, reused=True) is Again.NO
    assert again(stage, method, replayable=False, retry_non_idempotent=True) is Again.NO


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PATCH"])
def test_a_refused_connect_sent_nothing_so_any_method_goes_elsewhere(method: bytes) -> None:
    assert again(Stage.CONNECT, method) is Again.OTHER


def test_a_refused_connect_after_the_race_retry_sends_only_idempotent_requests_on() -> None:
    assert again(Stage.CONNECT, b"POST", race_retried=True) is Again.NO
    assert again(Stage.CONNECT, b"GET", race_retried=True) is Again.OTHER
    assert again(Stage.CONNECT, b"POST", race_retried=True, retry_non_idempotent=True) is (
        Again.OTHER
    )


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_reused_connection_failing_before_any_response_byte_is_tried_once_fresh(
    method: bytes,
) -> None:
    assert again(Stage.SENT, method, reused=True) is Again.FRESH
    # once only, and not when the backend had begun to answer, nor on a new connection
    assert again(Stage.SENT, method, reused=True, race_retried=True) is not Again.FRESH
    assert again(Stage.SENT, method, reused=True, response_byte=True) is not Again.FRESH
    assert again(Stage.SENT, method, reused=False) is not Again.FRESH


@pytest.mark.parametrize("stage", [Stage.SENT, Stage.TIMEOUT, Stage.STATUS])
def test_after_a_send_only_idempotent_methods_go_to_another_backend(stage: Stage) -> None:
    for method in sorted(IDEMPOTENT):
        assert again(stage, method, response_byte=True) is Again.OTHER
    for method in (b"POST", b"PATCH", b"CONNECTX"):
        assert again(stage, method, response_byte=True) is Again.NO
        assert again(stage, method, response_byte=True, retry_non_idempotent=True) is (Again.OTHER)


def head_of(raw: bytes) -> Head:
    head = RequestReader().feed(raw)[0]
    assert isinstance(head, Head)
    return head


COOKIES = head_of(
    b"GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nCookie: theme=dark; lb=abc; empty\r\n"
    b'Cookie: other="q"\r\nX-User: u-7\r\n\r\n'
)


def test_cookies_are_found_in_every_cookie_header() -> None:
    assert cookie_value(COOKIES, b"lb") == b"abc"
    assert cookie_value(COOKIES, b"theme") == b"dark"
    assert cookie_value(COOKIES, b"other") == b"q"
    assert cookie_value(COOKIES, b"empty") is None
    assert cookie_value(COOKIES, b"l") is None


def test_the_hash_key_is_the_part_of_the_request_asked_for_else_the_client() -> None:
    assert request_key(COOKIES, "path", "10.0.0.1") == b"/a/b"
    assert request_key(COOKIES, "header:X-User", "10.0.0.1") == b"u-7"
    assert request_key(COOKIES, "cookie:theme", "10.0.0.1") == b"dark"
    assert request_key(COOKIES, "header:X-None", "10.0.0.1") == b"10.0.0.1"
    assert request_key(COOKIES, "cookie:none", "10.0.0.1") == b"10.0.0.1"
    assert request_key(COOKIES, "source", "10.0.0.1") == b"10.0.0.1"


def test_a_backend_token_is_stable_and_does_not_show_the_address() -> None:
    token = backend_token("10.0.0.5:8080")
    assert token == backend_token("10.0.0.5:8080")
    assert token != backend_token("10.0.0.6:8080")
    assert b"10.0.0.5" not in token
    assert len(token) == 16
    assert set_cookie(b"lb", token) == b"lb=" + token + b"; Path=/; HttpOnly; SameSite=Lax"
