"""A local web demo for `captioner`, on the standard library's HTTP server alone.

    python demo/app.py [--model FILE] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 10]
                       [--memory-budget-mb 1536] [--max-in-flight 8] [--max-connections 64]
    python demo/app.py --model FILE --screenshot docs/demo-screenshot.png

`GET /` serves the page (demo/static/), `GET /healthz` the model and limits, and
`POST /api/caption` takes raw image bytes (or a multipart form field `image`) and answers
JSON: the caption, the n-best alternatives, the per-word attention weights when the model
has attention, and the time each stage took. Modules, one job each:

    app.py          options and start-up (this file)
    limits.py       every bound and its default
    http_server.py  connections, routing, uploads, answers
    framing.py      request head and body, bounded in bytes and time
    multipart.py    the `image` field of a multipart/form-data body, bounded
    admission.py    an upload's memory cost from its header; the shared memory budget
    service.py      the model, its lock, decoding settings, per-stage timings
    screenshot.py   the page in headless Chromium
    errors.py       the refusal every layer raises

Every option is checked, and the address bound, before the model loads: a bad option is a
one-line usage error (exit status 2). The demo does not call
`captioner.allocator.keep_freed_memory()`: it captions one small image per request, where
a kept heap buys little, and it must give memory back after a burst of large uploads
(`demo.admission.give_back_large_blocks` makes the opposite choice).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `demo` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.limits import MIB, RANGES, Limits

DEFAULT_IMAGE = Path(__file__).resolve().parent / "images" / "chelsea.jpg"
PROG = "demo/app.py"
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def host(text: str) -> str:
    """An IP address or a DNS host name; anything else is a usage error."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be an IP address or a host name, got {text[:80]!r}")
    return text


def bounded(low: float, high: float, integer: bool) -> Callable[[str], float]:
    """An option type: a plain decimal number in [low, high] (no nan, inf, sign or hex)."""
    pattern = re.compile(r"[0-9]{1,9}" if integer else r"[0-9]{1,9}(?:\.[0-9]{1,9})?|\.[0-9]{1,9}")

    def parse(text: str) -> float:
        value = (int(text) if integer else float(text)) if pattern.fullmatch(text) else None
        if value is None or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind} from {low:g} to {high:g}, got {text[:40]!r}")
        return value
    parse.__name__ = "integer" if integer else "number"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (not the whole usage text) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        error(f"{message} (see --help)")
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Limits()
    parser = Parser(prog=PROG, description="Local web demo for captioner.")
    parser.add_argument("--model", help="model file (.safetensors); default: the model shipped in the package")
    parser.add_argument("--host", type=host, default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=bounded(0, 65535, True), default=8000,
                        help="port (0 picks a free one; default 8000)")
    parser.add_argument("--max-upload-mb", type=bounded(*RANGES["max_upload_mb"], False),
                        default=defaults.max_upload_bytes / MIB, help="largest accepted upload in MB (default 10)")
    parser.add_argument("--memory-budget-mb", type=bounded(*RANGES["memory_budget_mb"], True),
                        default=defaults.memory_budget_bytes // MIB,
                        help="memory all image decodes may use at once, in MiB (default 1536)")
    parser.add_argument("--max-in-flight", type=bounded(*RANGES["max_in_flight"], True),
                        default=defaults.max_in_flight, help="uploads handled at once; more get 503 (default 8)")
    parser.add_argument("--max-connections", type=bounded(*RANGES["max_connections"], True),
                        default=defaults.max_connections, help="open connections; more get 503 (default 64)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    parser.add_argument("--screenshot", metavar="PNG", help="caption --image in headless Chromium, save a "
                        "screenshot of the page to PNG, and exit")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image for --screenshot")
    return parser.parse_args(argv)


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(max_upload_bytes=int(args.max_upload_mb * MIB), memory_budget_bytes=args.memory_budget_mb * MIB,
                  max_in_flight=args.max_in_flight, max_connections=args.max_connections)


def error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = limits_from(args)
    from demo.http_server import DemoServer  # after the options: --help stays instant

    server = None
    if args.screenshot:
        from demo.screenshot import browser_missing

        missing = browser_missing()
        if missing:
            error(f"--screenshot needs {missing}")
            return 1
    else:
        try:
            server = DemoServer((args.host, args.port), limits, quiet=args.quiet)
        except (OSError, OverflowError, UnicodeError) as exc:
            error(f"cannot listen on {args.host} port {args.port}: {getattr(exc, 'strerror', None) or exc}")
            return 2
    from captioner import Captioner
    from captioner.errors import CaptionerError, UsageError
    from demo.admission import give_back_large_blocks
    from demo.service import CaptionService

    give_back_large_blocks()  # a process-wide allocator choice, made by the entry point

    try:
        captioner = Captioner.load(args.model, device=args.device)
        captioner.encoder_runner()  # the ONNX Runtime encoder, if any, is ready before the first upload
    except (CaptionerError, OSError) as exc:
        error(exc)
        if server is not None:
            server.server_close()
        return 2 if isinstance(exc, UsageError) else 1
    if server is None:
        from demo.screenshot import take_screenshot
        print(f"{args.screenshot}: {take_screenshot(captioner, args.screenshot, args.image)}")
        return 0
    server.service = CaptionService(captioner, limits)
    server.service.warm_up()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: other machines can reach this demo", file=sys.stderr)
    print(f"captioner demo on {server.url} (model {captioner.source}); Ctrl+C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without unwinding the native libraries: at interpreter exit, torch's and oneDNN's
    # thread pools can abort the process ("terminate called without an active exception")
    # while a keep-alive connection's daemon thread is still alive, turning Ctrl+C into exit -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
