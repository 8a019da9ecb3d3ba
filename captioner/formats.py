"""How results are written as text: reversible escaping of names, and strict JSON lines.

Text output is one line per image, `NAME<TAB>caption`, so a file name must never break the
line or the column, nor drive a terminal. `escape_name` writes every character that could
(backslash, TAB, line breaks of any kind including U+0085/U+2028/U+2029, other control and
format characters, bytes that are not UTF-8) as a backslash escape, and `unescape_name`
turns the text back into the exact name:

    \\\\  backslash          \\t \\n \\r  TAB, LF, CR
    \\xHH  a byte of a name that is not valid UTF-8 (e.g. Latin-1 bytes on Linux)
    \\uHHHH / \\UHHHHHHHH  any other control, format or separator character

JSON lines carry names as JSON strings (undecodable bytes as their `\\udcHH` surrogates, which
`os.fsencode` turns back into the bytes) and never NaN or infinity (they become null).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

__all__ = ["escape_name", "json_line", "unescape_name"]

_SIMPLE = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNSIMPLE = {v: k for k, v in _SIMPLE.items()}


def _escape_char(ch: str) -> str:
    if ch in _SIMPLE:
        return _SIMPLE[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return ch


def escape_name(name: str) -> str:
    """`name` with every character that could break a line, a column or a terminal escaped."""
    if name.isprintable() and "\\" not in name:
        return name  # the common case, unchanged
    return "".join(_escape_char(ch) for ch in name)


_ESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def unescape_name(text: str) -> str:
    """Inverse of `escape_name`."""
    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in _UNSIMPLE:
            return _UNSIMPLE[token]
        if token[1] == "x":
            return chr(0xDC00 + int(token[2:], 16))
        return chr(int(token[2:], 16))

    return _ESCAPE.sub(one, text)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_line(obj: dict[str, Any]) -> str:
    """One JSON object on one line: non-ASCII as is unless a name has undecodable bytes (then
    \\u escapes keep the line valid UTF-8), and NaN or infinity as null, never `NaN`."""
    obj = _json_safe(obj)
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(obj, allow_nan=False)
    return line
