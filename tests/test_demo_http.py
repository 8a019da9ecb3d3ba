"""The demo speaks correct HTTP under abuse: every request gets exactly one well-formed answer
(400/408/411/413/414/415/417/431/501/503/505), the connection closes whenever its framing
cannot be trusted, deadlines hold however slowly bytes arrive, and nothing of it writes a
traceback (or anything else: the servers here are quiet) to stderr."""
from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest
from test_demo import PHOTOS, all_answers, http_server, load_captioner, parse_answers

from demo.limits import Limits

FAST = Limits(head_seconds=1.0, body_seconds=1.0, idle_seconds=2.0, drain_seconds=0.5)
GET_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
POST_CAPTION = b"POST /api/caption HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def captioner(tiny_model_file):
    return load_captioner(tiny_model_file)


@pytest.fixture(scope="module")
def server(captioner):
    srv = http_server.make_server(captioner, "127.0.0.1", 0, quiet=True, limits=FAST)
    with http_server.serving(srv):
        yield srv


@pytest.fixture(autouse=True)
def quiet_stderr(capfd):
    """Bad input is answered, never logged with a traceback: stderr stays empty."""
    yield
    time.sleep(0.05)  # let answering threads finish writing
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err == ""


def one_answer(server, request: bytes, **kwargs) -> tuple[int, dict]:
    """The single answer to `request`; the server must then close the connection."""
    answers = parse_answers(all_answers(server, request, **kwargs))
    assert len(answers) == 1, answers
    return answers[0]


def open_connection(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    if data:
        sock.sendall(data)
    return sock


# ----------------------------------------------------------------------- Content-Length


BAD_LENGTHS = [b"+5", b" 5", b"5 ", "\u0665".encode(), "\u0665".encode("latin-1", "replace"), b"0x10", b"1e3",
               b"-1", b"9" * 5000, b"9" * 16, b"", b"5, 5", b"1_0", b"\t5", "\uff15".encode()]


@pytest.mark.parametrize("value", BAD_LENGTHS, ids=lambda v: repr(v[:12]))
@pytest.mark.parametrize("request_head", [GET_HEALTH, POST_CAPTION, b"GET /nope HTTP/1.1\r\nHost: x\r\n"],
                         ids=["get-health", "post-caption", "not-found"])
def test_bad_content_length_is_exactly_one_400(server, request_head, value):
    status, answer = one_answer(server, request_head + b"Content-Length: " + value + b"\r\n\r\nhello")
    assert status == 400 and "invalid Content-Length" in answer["error"]


@pytest.mark.parametrize("headers, status, message", [
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "conflicting Content-Length"),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400, "ambiguous"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400, "ambiguous"),
    (b"Transfer-Encoding: chunked\r\n", 411, "send Content-Length"),
    (b"Transfer-Encoding: gzip, chunked\r\n", 411, "send Content-Length"),
])
@pytest.mark.parametrize("request_head", [GET_HEALTH, POST_CAPTION], ids=["get", "post"])
def test_ambiguous_framing_is_refused_and_closed(server, request_head, headers, status, message):
    got, answer = one_answer(server, request_head + headers + b"\r\nhello")
    assert got == status and message in answer["error"]


def test_repeated_equal_content_length_is_accepted(server):
    data = PHOTOS[0].read_bytes()
    n = str(len(data)).encode()
    status, answer = one_answer(server, POST_CAPTION + b"Connection: close\r\nContent-Length: " + n
                                + b"\r\nContent-Length: " + n + b"\r\n\r\n" + data)
    assert status == 200 and "caption" in answer


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_get_and_head_with_a_body_answer_once_then_close(server, method):
    request = method + b" /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    request += GET_HEALTH + b"\r\n"  # a pipelined request after the body is never reached
    data = all_answers(server, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    if method == b"HEAD":
        assert body == b""
    else:
        assert len(parse_answers(data)) == 1


# -------------------------------------------------------------------------- deadlines


def test_body_that_never_arrives_is_408(server):
    started = time.monotonic()
    status, answer = one_answer(server, POST_CAPTION + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
    elapsed = time.monotonic() - started
    assert status == 408 and "not received within 1 s" in answer["error"]
    assert 0.9 < elapsed < 4


def test_body_dripping_slowly_still_hits_the_deadline(server):
    """One byte every 0.2 s keeps each recv alive; the whole-body deadline still fires."""
    with open_connection(server, POST_CAPTION + b"Content-Length: 1000\r\n\r\n") as sock:
        started = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(50):
                sock.sendall(b"x")
                time.sleep(0.2)
        elapsed = time.monotonic() - started
    assert elapsed < 4


def test_headers_that_never_end_are_408(server):
    with open_connection(server, b"GET / HTTP/1.1\r\nHost: x\r\n") as sock:
        started = time.monotonic()
        for _ in range(3):  # drip a header line, never the blank line
            sock.sendall(b"X-A: 1\r\n")
            time.sleep(0.2)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
        elapsed = time.monotonic() - started
    [(status, answer)] = parse_answers(data)
    assert status == 408 and "headers not received" in answer["error"]
    assert elapsed < 4


def test_idle_connection_is_closed_without_an_answer(server):
    with open_connection(server) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
    assert 1.5 < time.monotonic() - started < 5


def test_client_that_half_closes_mid_head_gets_400(server):
    status, answer = one_answer(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", half_close=True)
    assert status == 400 and "incomplete" in answer["error"]


# ------------------------------------------------------------------------ malformed heads


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line longer"),
    (GET_HEALTH + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", 431, "headers larger"),
    (GET_HEALTH + b"X-A: 1\r\n" * 65 + b"\r\n", 431, "more than 64 request headers"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "not supported"),
    (b"GET / HTTP/1.x\r\nHost: x\r\n\r\n", 400, "malformed HTTP version"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "exactly one Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "exactly one Host"),
    (GET_HEALTH + b"X-A: 1\r\n folded\r\n\r\n", 400, "line folding"),
    (GET_HEALTH + b"Bad Name: 1\r\n\r\n", 400, "malformed request header"),
    (GET_HEALTH + b"Content-Length : 1\r\n\r\n", 400, "malformed request header"),
    (GET_HEALTH + b"X-A: a\x00b\r\n\r\n", 400, "control character"),
    (GET_HEALTH + b"no colon here\r\n\r\n", 400, "malformed request header"),
    (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not implemented"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "must be a path"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed request line"),  # TLS hello
    (GET_HEALTH + b"Expect: 200-ok\r\n\r\n", 417, "unsupported Expect"),
])
def test_malformed_heads_get_one_answer(server, request_bytes, status, message):
    got, answer = one_answer(server, request_bytes)
    assert got == status and message in answer["error"]


def test_absolute_form_and_http10_are_understood(server):
    status, answer = one_answer(server, b"GET http://example/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and answer["status"] == "ok"
    status, answer = one_answer(server, b"GET /healthz HTTP/1.0\r\n\r\n")  # 1.0: one request, then close
    assert status == 200


def test_pipelined_requests_get_one_answer_each(server):
    request = GET_HEALTH + b"\r\n" + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + GET_HEALTH + b"Connection: close\r\n\r\n"
    assert [status for status, _ in parse_answers(all_answers(server, request))] == [200, 404, 200]
    # After a framing error the connection closes: the request behind it is never answered.
    request = GET_HEALTH + b"\r\n" + GET_HEALTH + b"Content-Length: +1\r\n\r\nx" + GET_HEALTH + b"\r\n"
    assert [status for status, _ in parse_answers(all_answers(server, request))] == [200, 400]


@pytest.mark.parametrize("headers, status, message", [
    (b"Content-Encoding: gzip\r\n", 415, "Content-Encoding 'gzip' is not accepted"),
    (b"Content-Type: multipart/mixed; boundary=x\r\n", 415, "multipart/mixed is not accepted"),
    (b"Content-Type: multipart/form-data\r\n", 400, "needs a boundary"),
    (b"Content-Type: multipart/form-data; boundary=\"" + b"b" * 71 + b"\"\r\n", 400, "needs a boundary"),
])
def test_unusable_upload_encodings(server, headers, status, message):
    got, answer = one_answer(server, POST_CAPTION + headers + b"Content-Length: 5\r\n\r\nhello")
    assert got == status and message in answer["error"]


def test_expect_100_continue_then_the_answer(server):
    data = PHOTOS[0].read_bytes()
    with open_connection(server, POST_CAPTION + b"Expect: 100-continue\r\nConnection: close\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode()) as sock:
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(data)
        [(status, answer)] = parse_answers(b"".join(iter(lambda: sock.recv(65536), b"")))
    assert status == 200 and "caption" in answer


# ----------------------------------------------------------------------------- capacity


@pytest.fixture
def small_server(captioner):
    limits = FAST.replace(max_in_flight=1, max_connections=3, head_seconds=5.0, body_seconds=3.0, idle_seconds=5.0)
    srv = http_server.make_server(captioner, "127.0.0.1", 0, quiet=True, limits=limits)
    with http_server.serving(srv):
        yield srv


def status_and_headers(server, request: bytes) -> tuple[int, http.client.HTTPMessage]:
    with open_connection(server, request) as sock:
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status, response.headers


def test_uploads_over_the_in_flight_cap_get_503(small_server):
    data = PHOTOS[0].read_bytes()
    upload = POST_CAPTION + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
    with open_connection(small_server, upload + data[:100]):  # holds the only upload slot
        deadline = time.monotonic() + 5
        while small_server.uploads.used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        status, headers = status_and_headers(small_server, upload + data)
        assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
        assert time.monotonic() - started < 1  # refused at once, not queued
    deadline = time.monotonic() + 5  # the slot frees when the stalled upload times out or closes
    while small_server.uploads.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status_and_headers(small_server, upload + data)[0] == 200


def test_connections_over_the_cap_get_503(small_server):
    held = [open_connection(small_server, b"GET / HTTP/1.1\r\n") for _ in range(3)]  # heads never finished
    try:
        deadline = time.monotonic() + 5
        while small_server.connections.used < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers = status_and_headers(small_server, GET_HEALTH + b"\r\n")
        assert status == 503 and headers["Retry-After"] == "1"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while small_server.connections.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status_and_headers(small_server, GET_HEALTH + b"Connection: close\r\n\r\n")[0] == 200


def test_many_abusive_clients_at_once_each_get_one_answer(server):
    """A burst of bad requests from 16 threads: every one answered exactly once, no leak of
    upload slots or connections afterwards."""
    requests = [GET_HEALTH + b"Content-Length: " + v + b"\r\n\r\n" for v in BAD_LENGTHS] * 3

    def one(request: bytes) -> int:
        [(status, _)] = parse_answers(all_answers(server, request))
        return status

    results: list[int] = []
    threads = [threading.Thread(target=lambda r=r: results.append(one(r))) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [400] * len(requests)
    deadline = time.monotonic() + 5
    while (server.connections.used or server.uploads.used) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections.used == 0 and server.uploads.used == 0
