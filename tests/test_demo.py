"""The web demo's HTTP API, in-process on a free loopback port, with the tiny real-format model:
good and bad uploads, the size limit (checked before the body is read), routing errors, and a
concurrent load test whose every answer must equal the single-threaded one. The helpers here
are shared by the other tests/test_demo_*.py files."""
from __future__ import annotations

import functools
import http.client
import json
import socket
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from captioner import Captioner

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "demo" / "images").glob("*.jpg"))
LIMIT = 200_000  # bytes; every demo photo is under it


if str(REPO) not in sys.path:  # demo/ is a package beside captioner/, not an installed one
    sys.path.insert(0, str(REPO))

from demo import http_server


@functools.cache
def load_captioner(path: Path) -> Captioner:
    """One tiny model per test run, shared by the demo test files (loading costs seconds)."""
    return Captioner.load(path, device="cpu")


@pytest.fixture(scope="module")
def captioner(tiny_model_file) -> Captioner:
    return load_captioner(tiny_model_file)


@pytest.fixture(scope="module")
def server(captioner):
    srv = http_server.make_server(captioner, "127.0.0.1", 0, max_upload_bytes=LIMIT, quiet=True)
    with http_server.serving(srv):
        yield srv


def call(server, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, dict]:
    """One request on a fresh connection -> (status, headers, parsed JSON body)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        if method == "HEAD":
            assert raw == b""
            return response.status, response.headers, {}
        payload = json.loads(raw) if content_type.startswith("application/json") else {"_text": raw.decode()}
        return response.status, response.headers, payload
    finally:
        conn.close()


def caption(server, image: bytes, query: str = "") -> tuple[int, dict]:
    status, _, payload = call(server, "POST", f"/api/caption{query}", image)
    return status, payload


def without_timings(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timings_ms"}


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def raw_exchange(server, request: bytes, timeout: float = 10) -> tuple[int, dict]:
    """Send hand-written request bytes on a socket -> (status, JSON body): for what
    http.client will not send (lies about Content-Length, Expect, bad request lines)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())


def all_answers(server, request: bytes, timeout: float = 10, half_close: bool = False) -> bytes:
    """Every byte the server sends back for `request` until it closes the connection."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def parse_answers(data: bytes) -> list[tuple[int, dict]]:
    """Split raw response bytes into (status, JSON body) pairs; fails on anything malformed."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        fields = dict(line.split(": ", 1) for line in lines[1:])
        length = int(fields["Content-Length"])
        body, data = rest[:length], rest[length:]
        assert len(body) == length, "truncated response body"
        assert fields["Content-Type"] == "application/json"
        answers.append((int(status), json.loads(body)))
    return answers


# ------------------------------------------------------------------------------------- pages


def test_page_and_health(server):
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'type="file"' in page["_text"] and "/static/app.js" in page["_text"]
    assert "http" not in page["_text"].split("<body>")[1]  # nothing fetched from elsewhere
    for asset in ("/static/app.js", "/static/style.css"):
        assert call(server, "GET", asset)[0] == 200
    status, _, health = call(server, "GET", "/healthz")
    assert status == 200
    assert {k: health[k] for k in ("status", "attention", "device", "max_upload_bytes", "beam_size", "n_best",
                                   "max_beam_size")} == {
        "status": "ok", "attention": True, "device": "cpu", "max_upload_bytes": LIMIT, "beam_size": 3,
        "n_best": 1, "max_beam_size": 10}  # the tiny model stores no tuned decoding
    assert health["model"].endswith(".safetensors")
    assert health["limits"]["max_upload_bytes"] == LIMIT and health["limits"]["max_parts"] == 16
    assert health["load"]["uploads_in_flight"] == 0 and health["load"]["decode_bytes_in_use"] == 0
    status, headers, _ = call(server, "HEAD", "/healthz")
    assert status == 200 and int(headers["Content-Length"]) > 0


# ----------------------------------------------------------------------------- good uploads


def test_demo_photo_is_captioned_with_timings_and_attention(server, captioner):
    photo = REPO / "demo" / "images" / "chelsea.jpg"
    status, answer = caption(server, photo.read_bytes(), "?beam_size=3&n_best=3")
    assert status == 200, answer
    assert answer["caption"] and answer["words"] == answer["caption"].split()
    assert len(answer["alternatives"]) == 3
    assert answer["alternatives"][0]["caption"] == answer["caption"]
    assert [a["score"] for a in answer["alternatives"]] == sorted((a["score"] for a in answer["alternatives"]),
                                                                   reverse=True)
    h, w = answer["grid_shape"]
    assert len(answer["attention"]) in (len(answer["words"]), len(answer["words"]) + 1)
    assert all(len(step) == h * w and abs(sum(step) - 1) < 1e-3 for step in answer["attention"])
    assert answer["view_box"] == [0.0, 0.0, 1.0, 1.0]  # EfficientNet-Lite0 squashes
    timings = answer["timings_ms"]
    assert set(timings) == {"decode", "queue", "encoder", "search", "total"}
    assert timings["total"] >= timings["decode"] + timings["encoder"] + timings["search"] > 0
    # The server's staged pipeline gives exactly the library's answer for the same file.
    [expected] = captioner.caption(photo, beam_size=3, n_best=3)
    assert answer["caption"] == expected.caption
    assert answer["log_prob"] == pytest.approx(expected.log_prob, abs=1e-3)


def test_multipart_field_image_equals_raw_body(server):
    data = PHOTOS[0].read_bytes()
    body, content_type = multipart("image", PHOTOS[0].name, data)
    status, _, answer = call(server, "POST", "/api/caption", body, {"Content-Type": content_type})
    assert status == 200, answer
    assert without_timings(answer) == without_timings(caption(server, data)[1])


# ------------------------------------------------------------------------------ bad uploads


@pytest.mark.parametrize("data, reason", [
    (b"just some notes, not a picture\n", "not an image file"),
    (PHOTOS[0].read_bytes()[:5000], "truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt PNG"),
])
def test_non_image_is_400_with_the_reason(server, data, reason):
    status, answer = caption(server, data)
    assert status == 400
    assert reason in answer["error"]
    assert "captioner-upload" not in answer["error"]  # the reason, not the temporary file's name


def test_empty_body_and_missing_form_field_are_400(server):
    status, answer = caption(server, b"")
    assert status == 400 and "empty" in answer["error"]
    body, content_type = multipart("photo", "x.jpg", PHOTOS[0].read_bytes())
    status, _, answer = call(server, "POST", "/api/caption", body, {"Content-Type": content_type})
    assert status == 400 and "'image'" in answer["error"]


@pytest.mark.parametrize("query, message", [
    ("?beam_size=0", "decoding beam_size must be between 1 and 10 in this demo, got 0"),
    ("?beam_size=11", "decoding beam_size must be between 1 and 10 in this demo, got 11"),
    ("?beam_size=x", "decoding beam_size must be an integer, got 'x'"),
    ("?beam_size=%EF%BC%95", "decoding beam_size must be an integer"),  # a full-width digit
    ("?beam_size=-1", "decoding beam_size must be an integer, got '-1'"),
    ("?beam_size=2&n_best=3", "n_best 3 needs beam_size >= 3 (beam_size is 2)"),  # DecodingConfig's own line
    ("?n_best=5", "n_best 5 needs beam_size >= 5 (beam_size is 3)"),
    ("?beam=3", "unknown query parameter 'beam' (accepted: beam_size, n_best)"),
    ("?beam_size=2&beam_size=3", "beam_size given more than once"),
])
def test_bad_parameters_are_400(server, query, message):
    status, answer = caption(server, PHOTOS[0].read_bytes(), query)
    assert status == 400 and message in answer["error"]


def test_over_limit_upload_is_413(server):
    status, answer = caption(server, b"\xff" * (LIMIT + 1))
    assert status == 413 and "too large" in answer["error"]
    body, content_type = multipart("image", "big.jpg", b"\xff" * (LIMIT + 1))  # file over, body within allowance
    status, _, answer = call(server, "POST", "/api/caption", body, {"Content-Type": content_type})
    assert status == 413 and "too large" in answer["error"]


def test_size_is_checked_before_reading_the_body(server):
    """A 1 GB Content-Length with no body at all: a server that read first would hang."""
    started = time.perf_counter()
    status, answer = raw_exchange(server, b"POST /api/caption HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413 and "too large" in answer["error"]
    assert time.perf_counter() - started < 5


def test_expect_100_continue_is_refused_up_front(server):
    """curl sends `Expect: 100-continue` for big files: answer 413 instead of 100."""
    status, answer = raw_exchange(server, b"POST /api/caption HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                          b"Content-Length: 999999999\r\n\r\n")
    assert status == 413 and "too large" in answer["error"]  # the first status line, not 100


def test_chunked_upload_is_411(server):
    status, answer = raw_exchange(server, b"POST /api/caption HTTP/1.1\r\nHost: x\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in answer["error"]
    status, answer = raw_exchange(server, b"POST /api/caption HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in answer["error"]


# ------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/caption", 405), ("PUT", "/api/caption", 405), ("POST", "/", 405),
    ("DELETE", "/healthz", 405), ("GET", "/nope", 404), ("POST", "/api/captions", 404),
    ("GET", "/static/../app.py", 404), ("GET", "/demo/app.py", 404),
])
def test_wrong_method_or_path(server, method, path, status):
    got, headers, answer = call(server, method, path, b"x" if method in ("POST", "PUT") else None)
    assert got == status and answer["error"]
    if status == 405:
        assert headers["Allow"]


def test_malformed_requests_get_json_errors(server):
    assert raw_exchange(server, b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 501
    # A request line with no version (HTTP/0.9 style) gets a complete HTTP/1.1 400, then a close.
    [(status, answer)] = parse_answers(all_answers(server, b"GARBAGE\r\n\r\n"))
    assert status == 400 and "malformed request line" in answer["error"]


def test_a_bug_is_500_without_traceback(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(server.service, "caption", broken)
    status, answer = caption(server, PHOTOS[0].read_bytes())
    assert status == 500
    assert answer == {"error": "internal error (see the server log)"}


# ------------------------------------------------------------------------------- load test


@pytest.mark.slow
def test_concurrent_load_every_answer_right(server, record_property):
    """8 client threads, 48 requests over the 4 demo photos (beam 2): every request is
    answered 200 with exactly the single-threaded answer for its photo."""
    query = "?beam_size=2&n_best=2"
    photos = [p.read_bytes() for p in PHOTOS]
    expected = []
    for data in photos:
        status, answer = caption(server, data, query)
        assert status == 200, answer
        expected.append(without_timings(answer))

    def one(i: int) -> tuple[int, bool, float]:
        started = time.perf_counter()
        status, answer = caption(server, photos[i % len(photos)], query)
        return status, without_timings(answer) == expected[i % len(photos)], time.perf_counter() - started

    n_requests, n_threads = 48, 8
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        results = list(pool.map(one, range(n_requests), timeout=120))
    wall = time.perf_counter() - started

    assert [s for s, _, _ in results] == [200] * n_requests
    assert sum(not same for _, same, _ in results) == 0, "some answers differ from the single-threaded ones"
    latencies = sorted(t * 1000 for _, _, t in results)
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * (n_requests - 1))]
    print(f"\ndemo load test: {n_requests} requests, {n_threads} threads, {wall:.1f} s wall, "
          f"{n_requests / wall:.1f} req/s, latency p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    for key, value in (("p50_ms", round(p50, 1)), ("p95_ms", round(p95, 1)),
                       ("requests_per_s", round(n_requests / wall, 2))):
        record_property(key, value)
    assert wall < 120
