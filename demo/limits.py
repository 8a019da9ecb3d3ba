"""Every bound the demo enforces, in one place, with the range each may be set to.

The HTTP layer, the multipart parser and the captioning service read their limits from one
`Limits` object, and demo/app.py derives its option ranges from `RANGES`, so the documented
defaults, the command line and the code cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MIB = 1024 * 1024

# option field -> (lowest, highest) accepted, both inclusive.
RANGES: dict[str, tuple[float, float]] = {
    "max_upload_mb": (0.01, 64),       # above 64 MB no photo is plausible; bodies are held in memory
    "memory_budget_mb": (256, 65536),  # the reserve for ordinary photos alone is 128 MiB
    "max_in_flight": (1, 64),
    "max_connections": (2, 1024),
}


@dataclass(frozen=True)
class Limits:
    """Bounds in bytes, counts and seconds. Defaults suit a laptop; see docs/reliability.md.

    Memory: every upload is admitted against `memory_budget_bytes`, shared by all requests,
    with its decode cost computed from the image header before any pixel is decoded. The last
    `reserve_bytes` of the budget only admit ordinary images (cost <= `small_image_bytes`),
    so a burst of huge images never keeps a normal photo waiting; one image may therefore
    cost at most `memory_budget_bytes - reserve_bytes` (more is refused with 413).
    """

    max_upload_bytes: int = 10 * MIB
    memory_budget_bytes: int = 1536 * MIB
    reserve_bytes: int = 128 * MIB
    small_image_bytes: int = 64 * MIB
    max_in_flight: int = 8            # uploads being read, parsed, decoded or captioned
    max_connections: int = 64         # open connections (each holds one thread)
    idle_seconds: float = 15.0        # keep-alive wait for the next request
    head_seconds: float = 10.0        # request line and headers, from their first byte
    body_seconds: float = 30.0        # the whole body, from the end of the headers
    write_seconds: float = 10.0       # sending one answer
    decode_seconds: float = 10.0      # one image through load_image
    admission_seconds: float = 60.0   # waiting for decode memory before 503
    drain_bytes: int = 16 * MIB       # unread body discarded before closing, so the client reads our answer
    drain_seconds: float = 2.0
    max_request_line: int = 8 * 1024
    max_head_bytes: int = 16 * 1024   # request line and all headers together
    max_headers: int = 64
    max_parts: int = 16               # multipart/form-data parts per upload
    multipart_seconds: float = 2.0    # parsing one multipart body (linear, so far below this)
    max_part_head_bytes: int = 4 * 1024
    multipart_allowance: int = 16 * 1024  # boundaries and part headers around the file

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"limit {field.name} must be a positive finite number, got {value!r}")
        if self.reserve_bytes + self.small_image_bytes > self.memory_budget_bytes:
            raise ValueError("limit memory_budget_bytes must exceed reserve_bytes + small_image_bytes")
        if self.small_image_bytes > self.reserve_bytes:
            raise ValueError("limit small_image_bytes must not exceed reserve_bytes")

    @property
    def largest_image_bytes(self) -> int:
        """The decode cost above which one image is refused (413) however idle the server is."""
        return self.memory_budget_bytes - self.reserve_bytes

    def replace(self, **changes: float) -> Limits:
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, float]:
        """What /healthz reports, so a client can size its uploads."""
        return {"max_upload_bytes": self.max_upload_bytes, "memory_budget_bytes": self.memory_budget_bytes,
                "largest_image_bytes": self.largest_image_bytes, "max_in_flight": self.max_in_flight,
                "max_connections": self.max_connections, "body_seconds": self.body_seconds,
                "max_parts": self.max_parts}
