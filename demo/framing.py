"""HTTP/1.1 request framing with every input bounded in bytes and in time.

Why not `http.server`'s own parsing: it allows 64 KiB lines and 100 headers with no deadline
for the whole head, leaves Content-Length to `int()` (which accepts "+5", " 5", "٥" and raises
on 5,000 digits), and times out per recv only, so a client sending a byte every few seconds
holds a thread for ever. Here the head and the body each have a deadline, Content-Length is
1 to 15 ASCII digits and nothing else, and a request whose length is ambiguous (both
Content-Length and Transfer-Encoding, differing Content-Lengths) is refused rather than
guessed at, since guessing wrong desynchronizes the connection (request smuggling).
"""
from __future__ import annotations

import io
import re
import socket
import time
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from urllib.parse import urlsplit

from demo.errors import RequestError
from demo.limits import Limits

# Methods HTTP defines; anything else is 501, these are 404/405 when not routed.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_LENGTH = re.compile(r" ?([0-9]{1,15})")  # the conventional single space, then digits only
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than TAB
_EMPTY_LINES = 4  # blank lines tolerated before a request line (RFC 9112 section 2.2)


class Timeout(Exception):
    """A deadline passed while waiting for the client."""


class Reader:
    """The connection's buffered input, read under deadlines.

    Each wait sets the socket timeout to the time left and reads at most once from the
    socket, so a deadline holds however slowly the bytes arrive."""

    def __init__(self, rfile: io.BufferedReader, sock: socket.socket) -> None:
        self.rfile = rfile
        self.sock = sock
        self.request_line = ""  # of the request being read, printable, for the log

    def _peek(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout
        self.sock.settimeout(left)
        try:
            return self.rfile.peek(1)
        except TimeoutError:
            raise Timeout from None

    def wait_for_request(self, idle_seconds: float) -> bool:
        """Whether a request starts within `idle_seconds` (False: closed, reset or idle)."""
        try:
            return bool(self._peek(time.monotonic() + idle_seconds))
        except (Timeout, OSError):
            return False

    def readline(self, limit: int, deadline: float) -> bytes:
        """One line (with its LF), at most `limit` bytes (the caller checks for the LF);
        shorter without an LF when the client stops sending."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            buffered = self._peek(deadline)
            if not buffered:
                break
            end = buffered.find(b"\n", 0, limit - size)
            take = end + 1 if end >= 0 else min(len(buffered), limit - size)
            parts.append(self.rfile.read(take))
            size += take
            if end >= 0:
                break
        return b"".join(parts)

    def read_body(self, length: int, deadline: float) -> bytearray:
        """Exactly `length` bytes, or Timeout / EOFError (the client stopped early)."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout
            self.sock.settimeout(left)
            try:
                n = self.rfile.readinto1(view[got:got + (1 << 20)])
            except TimeoutError:
                raise Timeout from None
            if not n:
                raise EOFError(f"got {got:,} of {length:,} bytes")
            got += n
        return body

    def discard(self, limit: int, seconds: float) -> None:
        """Read and drop what the client still sends, bounded in bytes and time: closing a
        socket with unread input resets it, and the client would lose the answer."""
        deadline = time.monotonic() + seconds
        try:
            while limit > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                chunk = self.rfile.read1(min(limit, 1 << 16))
                if not chunk:
                    return
                limit -= len(chunk)
        except (OSError, ValueError):
            return


@dataclass
class RequestHead:
    """A parsed request line and header block, with the body's framing decided."""

    method: str
    target: str
    version: str            # "HTTP/1.0" or "HTTP/1.1"
    headers: Message        # case-insensitive lookup; get_content_type() works
    length: int             # body bytes that follow (0: none)
    keep_alive: bool
    expect_continue: bool

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


def bad(message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> RequestError:
    """A framing error: the connection's next bytes cannot be trusted, so it closes."""
    return RequestError(status, message, close=True)


def read_head(reader: Reader, limits: Limits) -> RequestHead:
    """Read and check one request head (the caller saw its first byte arrive)."""
    deadline = time.monotonic() + limits.head_seconds
    try:
        line = b""
        for _ in range(_EMPTY_LINES + 1):
            line = reader.readline(limits.max_request_line + 1, deadline)
            if line not in (b"\r\n", b"\n"):
                break
        if len(line) > limits.max_request_line:
            raise bad(f"request line longer than {limits.max_request_line:,} bytes", HTTPStatus.REQUEST_URI_TOO_LONG)
        if not line.endswith(b"\n"):
            raise bad("incomplete request line")
        reader.request_line = line.decode("latin-1").rstrip("\r\n")[:200]
        method, target, version = parse_request_line(line)
        lines: list[bytes] = []
        size = len(line)
        while True:
            field = reader.readline(limits.max_head_bytes - size + 1, deadline)
            size += len(field)
            if size > limits.max_head_bytes:
                raise bad(f"request headers larger than {limits.max_head_bytes:,} bytes",
                          HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if not field.endswith(b"\n"):
                raise bad("incomplete request headers")
            if field in (b"\r\n", b"\n"):
                break
            if len(lines) == limits.max_headers:
                raise bad(f"more than {limits.max_headers} request headers",
                          HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            lines.append(field)
    except Timeout:
        raise bad(f"request headers not received within {limits.head_seconds:g} s",
                  HTTPStatus.REQUEST_TIMEOUT) from None
    return make_head(method, target, version, parse_fields(lines))


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """`METHOD SP target SP HTTP/x.y` -> its parts, or 400 / 501 / 505."""
    text = line.decode("latin-1").rstrip("\r\n")
    words = text.split(" ")
    if len(words) != 3 or not all(words) or _BAD_VALUE.search(text) or "\t" in text:
        raise bad("malformed request line (expected: METHOD /path HTTP/1.1)")
    method, target, version = words
    if not _TOKEN.fullmatch(method):
        raise bad("malformed request method")
    match = _VERSION.fullmatch(version)
    if not match:
        raise bad("malformed HTTP version in the request line")
    if match.group(1) != "1":
        raise bad(f"HTTP version {version[5:]} is not supported; use HTTP/1.1",
                  HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    if method not in METHODS:
        raise RequestError(HTTPStatus.NOT_IMPLEMENTED, f"method {method[:32]} is not implemented", close=True)
    if target.startswith(("http://", "https://")):  # absolute form: only its path matters here
        split = urlsplit(target)
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    if not target.startswith("/"):
        raise bad("request target must be a path starting with /")
    return method, target, f"HTTP/1.{min(int(match.group(2)), 1)}"


def parse_fields(lines: list[bytes]) -> list[tuple[str, str]]:
    """Header lines -> (name, raw value) pairs; the value keeps its whitespace."""
    fields = []
    for raw in lines:
        text = raw.decode("latin-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):
            raise bad("obsolete line folding in the request headers")
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise bad("malformed request header line")
        if _BAD_VALUE.search(value):
            raise bad(f"control character in request header {name[:64]}")
        fields.append((name, value))
    return fields


def content_length(values: list[str]) -> int:
    """Strict Content-Length: digits only, at most 15 of them, all copies equal."""
    lengths = set()
    for value in values:
        match = _LENGTH.fullmatch(value)
        if not match:
            raise bad(f"invalid Content-Length {value.strip()[:20]!r}: expected 1 to 15 ASCII digits")
        lengths.add(int(match.group(1)))
    if len(lengths) > 1:
        raise bad("conflicting Content-Length headers")
    return lengths.pop()


def make_head(method: str, target: str, version: str, fields: list[tuple[str, str]]) -> RequestHead:
    """Decide the body's framing and the connection's fate from the header fields."""
    headers = Message()
    for name, value in fields:
        headers[name] = value.strip(" \t")
    if version == "HTTP/1.1" and len(headers.get_all("Host", [])) != 1:
        raise bad("an HTTP/1.1 request needs exactly one Host header")
    lengths = [value for name, value in fields if name.lower() == "content-length"]
    if "Transfer-Encoding" in headers:
        if lengths:
            raise bad("both Transfer-Encoding and Content-Length given; the body length is ambiguous")
        raise bad("Transfer-Encoding (chunked) bodies are not accepted; send Content-Length",
                  HTTPStatus.LENGTH_REQUIRED)
    length = content_length(lengths) if lengths else 0
    connection = {token.strip().lower() for value in headers.get_all("Connection", []) for token in value.split(",")}
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    expect = headers.get("Expect")
    if expect is not None and expect.lower() != "100-continue":
        raise RequestError(HTTPStatus.EXPECTATION_FAILED, f"unsupported Expect {expect[:40]!r}", close=True)
    return RequestHead(method, target, version, headers, length, keep_alive,
                       expect is not None and version == "HTTP/1.1")
