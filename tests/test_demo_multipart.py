"""The demo's multipart/form-data parser does bounded work: at most 16 parts, 4 KiB of
headers per part, one linear scan; a 10 MB body of 194,000 empty parts is refused in
milliseconds, not parsed for minutes."""
from __future__ import annotations

import time

import pytest
from test_demo import PHOTOS, call, http_server, load_captioner, multipart

from demo import multipart as parser
from demo.errors import RequestError
from demo.limits import Limits

BOUNDARY = "b0undary"


def form(*parts: tuple[str, bytes], boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    body = preamble
    for name, data in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode() + epilogue


def field(body: bytes, **kwargs) -> bytes:
    return bytes(parser.form_field(body, BOUNDARY.encode(), "image", **kwargs))


def test_the_image_field_among_others():
    assert field(form(("title", b"a cat"), ("image", b"\x89PNG..."), ("x", b""))) == b"\x89PNG..."
    assert field(form(("image", b"data"), preamble=b"ignored\r\n", epilogue=b"trailing junk")) == b"data"
    # Content that merely looks like a boundary (no CRLF before it) stays in the field.
    assert field(form(("image", b"--b0undary inside"))) == b"--b0undary inside"


@pytest.mark.parametrize("content_type, boundary", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ('multipart/form-data; boundary="a b:c"', b"a b:c"),
    ('multipart/form-data; charset=utf-8; BOUNDARY="q\\"x"', None),  # a quote is not a boundary character
    ("multipart/form-data; boundary=", None),
    ("multipart/form-data; boundary=" + "x" * 71, None),
    ("multipart/form-data", None),
])
def test_boundary_from_content_type(content_type, boundary):
    if boundary is None:
        with pytest.raises(RequestError) as caught:
            parser.boundary_of(content_type)
        assert caught.value.status == 400
    else:
        assert parser.boundary_of(content_type) == boundary


@pytest.mark.parametrize("n_parts", [17, 1000, 194_000])
def test_too_many_parts_is_400_in_bounded_time(n_parts):
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n" * n_parts).encode()
    body += form(("image", b"data"))
    started = time.perf_counter()
    with pytest.raises(RequestError) as caught:
        field(body)
    assert time.perf_counter() - started < 0.5
    assert caught.value.status == 400 and "more than 16 parts" in caught.value.message


@pytest.mark.parametrize("body, message", [
    (b"no boundary anywhere", "never occurs"),
    (form(("image", b"x")).replace(b"--\r\n", b""), "does not end in CRLF"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\ndata".encode(), "no closing boundary"),
    (f"--{BOUNDARY}\r\nX-Long: {'a' * 5000}\r\n\r\ndata\r\n--{BOUNDARY}--".encode(), "longer than 4,096 bytes"),
    (f"--{BOUNDARY}\r\nno colon\r\n\r\ndata\r\n--{BOUNDARY}--".encode(), "has no colon"),
    (form(("photo", b"x")), "no field named 'image'"),
    (form(("image", b"x"), ("image", b"y")), "more than one field named 'image'"),
    (form(("image", b"x"), boundary="other"), "never occurs"),
])
def test_malformed_forms_are_400(body, message):
    with pytest.raises(RequestError) as caught:
        field(body)
    assert caught.value.status == 400 and message in caught.value.message


def test_part_without_headers_and_a_deadline():
    body = f"--{BOUNDARY}\r\n\r\nanonymous\r\n".encode() + form(("image", b"x"))
    assert field(body) == b"x"
    with pytest.raises(RequestError) as caught:
        field(body, deadline=time.monotonic() - 1)
    assert caught.value.status == 408


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def server(tiny_model_file):
    srv = http_server.make_server(load_captioner(tiny_model_file), "127.0.0.1", 0, quiet=True, limits=Limits())
    with http_server.serving(srv):
        yield srv


def test_ten_megabytes_of_tiny_parts_is_refused_fast(server):
    part = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n".encode()
    body = part * (10_000_000 // len(part)) + form(("image", PHOTOS[0].read_bytes()[:1000]))
    assert len(body) > 9_000_000 and body.count(b"--" + BOUNDARY.encode()) > 100_000
    started = time.perf_counter()
    status, _, answer = call(server, "POST", "/api/caption", body,
                             {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 400 and "more than 16 parts" in answer["error"]
    assert time.perf_counter() - started < 5  # mostly sending 10 MB over loopback


def test_multipart_upload_is_captioned(server):
    body, content_type = multipart("image", "photo.jpg", PHOTOS[1].read_bytes())
    status, _, answer = call(server, "POST", "/api/caption", body, {"Content-Type": content_type})
    assert status == 200 and "caption" in answer
