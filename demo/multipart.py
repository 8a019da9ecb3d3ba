"""multipart/form-data, parsed with bounded work: the one field the demo wants, or a 4xx.

Why not the `email` package: it builds a Message object per part, so a 10 MB body of 194,000
empty parts cost 92 s of CPU. Here the body is scanned once with `bytes.find` (linear), at
most `max_parts` parts are looked at, each part's headers are at most `max_part_head_bytes`,
and the field's bytes come back as a view of the body, not a copy.
"""
from __future__ import annotations

import re
import time
from http import HTTPStatus

from demo.errors import RequestError

# RFC 2046 boundary: 1 to 70 of these characters, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def malformed(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, f"malformed multipart/form-data body: {message}")


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """`type/subtype; key=value; key="quoted \\" value"` -> (lower-cased type, params);
    parameter names are lower-cased, the first of a repeated name wins."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(key, raw)
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or 400."""
    _, params = header_params(content_type)
    boundary = params.get("boundary", "")
    if not _BOUNDARY.fullmatch(boundary):
        raise RequestError(HTTPStatus.BAD_REQUEST, "multipart/form-data needs a boundary of 1 to 70 "
                                                   "characters in its Content-Type")
    return boundary.encode("ascii")


def form_field(body: bytes | bytearray, boundary: bytes, name: str, *, max_parts: int = 16,
               max_part_head_bytes: int = 4096, deadline: float | None = None) -> memoryview:
    """The content of the form field `name` (exactly one allowed) as a view of `body`."""
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = 0
    else:  # a preamble before the first boundary is allowed, and ignored
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise malformed("the boundary of its Content-Type never occurs")
        pos += 2
    view = memoryview(body)
    found: memoryview | None = None
    parts = 0
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break  # the closing delimiter; an epilogue after it is ignored
        while body.startswith((b" ", b"\t"), pos) and pos < len(body):  # transport padding
            pos += 1
        if not body.startswith(b"\r\n", pos):
            raise malformed("a boundary line does not end in CRLF")
        pos += 2
        parts += 1
        if parts > max_parts:
            raise malformed(f"more than {max_parts} parts")
        if deadline is not None and time.monotonic() > deadline:
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, "multipart/form-data body took too long to parse")
        if body.startswith(b"\r\n", pos):  # a part without headers
            head, start = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos, pos + max_part_head_bytes + 4)
            if end < 0:
                raise malformed(f"part headers unterminated or longer than {max_part_head_bytes:,} bytes")
            head, start = bytes(view[pos:end]), end + 4
        stop = body.find(b"\r\n" + delimiter, start)
        if stop < 0:
            raise malformed("no closing boundary")
        if _field_name(head) == name:
            if found is not None:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"multipart form has more than one field named {name!r}")
            found = view[start:stop]
        pos = stop + 2
    if found is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"multipart form has no field named {name!r}")
    return found


def _field_name(head: bytes) -> str | None:
    """The `name` parameter of a part's Content-Disposition: form-data header."""
    for line in head.split(b"\r\n") if head else []:
        key, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise malformed("a part header line has no colon")
        if key.strip().lower() == "content-disposition":
            kind, params = header_params(value)
            return params.get("name") if kind == "form-data" else None
    return None
