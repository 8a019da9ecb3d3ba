"""A local web demo for `captioner`, built on the standard library's HTTP server alone.

    python demo/app.py [--model FILE] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 10]
    python demo/app.py --model FILE --screenshot docs/demo-screenshot.png

No demo framework (Gradio, Flask): `http.server.ThreadingHTTPServer` serves one page
(demo/static/), `GET /healthz`, and `POST /api/caption`, which takes raw image bytes (or a
multipart form field `image`) and answers JSON: the caption, the n-best alternatives, the
per-word attention weights when the model has attention, and the time each stage took.

Safety, because an upload endpoint is an attack surface even on a laptop:
* binds 127.0.0.1 unless told otherwise;
* the size limit is checked from Content-Length before a byte of the body is read (413), and
  the read itself never exceeds the limit;
* uploads go through `captioner.images.load_image` (decompression-bomb limit, strict decoding,
  only well-fuzzed formats), so a bad file is a 400 with a one-line reason;
* every error is JSON `{"error": "..."}`; tracebacks go to the server log only.

The model is loaded once; one lock serializes the network (encoder + search) so concurrent
requests are always answered correctly, while image decoding runs in parallel outside it.
"""
from __future__ import annotations

import argparse
import email.parser
import io
import email.policy
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image

from captioner import Captioner
from captioner.images import ImageLoadError, load_image
from captioner.modelfile import ModelFileError

DEMO_DIR = Path(__file__).resolve().parent
STATIC_DIR = DEMO_DIR / "static"
DEFAULT_IMAGE = DEMO_DIR / "images" / "chelsea.jpg"
MIB = 1024 * 1024
MAX_BEAM = 10
# A multipart body carries a few hundred bytes of boundaries and headers around the file.
MULTIPART_ALLOWANCE = 16 * 1024
# After refusing an over-size body we still read (and discard) up to this much of it, so the
# client gets to read our 413 instead of a connection reset; beyond it we just hang up.
DRAIN_LIMIT = 64 * MIB
DRAIN_SECONDS = 5.0
# Uploads decoded at the same time (each may need a few hundred MB; see CaptionService).
DECODE_SLOTS = 4

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium, headless, with everything that would phone home switched off.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# path -> (file under demo/static, content type): the only files the server will ever send.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


class RequestError(Exception):
    """A request we refuse, with the status and the one-line reason the page shows."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------ captioning


def decode_upload(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Uploaded bytes -> RGB image with every protection of `load_image`, or RequestError(400).

    `load_image` takes paths only (it checks the file's size and type through the file
    system), so the bytes go through a private temporary file rather than a second, weaker
    decoding path. The reason reported is `ImageLoadError.reason`, without the temp name.
    """
    if not data:
        raise RequestError(HTTPStatus.BAD_REQUEST, "empty upload: no image data received")
    with tempfile.NamedTemporaryFile(prefix="captioner-upload-", suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name, draft_size=draft_size)
        except ImageLoadError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, exc.reason) from None


def view_box(preprocessing: Any, width: int, height: int) -> list[float]:
    """The part of the image the encoder saw, as fractions [x0, y0, x1, y1].

    The attention grid covers exactly this region, so the page draws heatmaps over it: the
    whole image when squashed, the centre square when the model crops.
    """
    if preprocessing.resize == "squash":
        return [0.0, 0.0, 1.0, 1.0]
    side = min(width, height) * preprocessing.size / (preprocessing.resize_size or preprocessing.size)
    fx, fy = side / width, side / height
    return [round((1 - fx) / 2, 4), round((1 - fy) / 2, 4), round((1 + fx) / 2, 4), round((1 + fy) / 2, 4)]


def elapsed_ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 1)


class CaptionService:
    """The model, loaded once, plus the lock that makes it safe to share between threads.

    Decoding and preprocessing run in the request's own thread (Pillow releases the GIL), at
    most DECODE_SLOTS at once: a 10 MB PNG may legally hold ~89 megapixels (~270 MB decoded),
    so unbounded parallel decoding could exhaust memory. The encoder and the search hold
    `lock`, so requests never interleave inside the network: torch's own intra-op threads
    already use every core for one image, so serializing costs little throughput and buys
    certainty.
    """

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.lock = threading.Lock()
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.attention = bool(captioner.decoder.config.attention)

    def info(self) -> dict[str, Any]:
        """What the page shows about the model."""
        return {"model": Path(self.captioner.source).name or "(in memory)", "attention": self.attention,
                "device": str(self.captioner.device), **self.captioner.search_defaults}

    def warm_up(self) -> None:
        """Caption a blank image once, so the first visitor's timings are not the cold start's
        (lazy initialization in torch and Pillow costs a few hundred milliseconds)."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="PNG")
        self.caption(buffer.getvalue())

    def caption(self, data: bytes, beam_size: int | None = None, n_best: int = 1) -> dict[str, Any]:
        """Caption uploaded bytes; the JSON answer with timings in milliseconds."""
        c = self.captioner
        start = time.perf_counter()
        with self.decode_slots:
            image = decode_upload(data, c.preprocessing.draft_size)
            batch = c.preprocess(image).unsqueeze(0).to(c.device)  # [1, 3, size, size]
        decoded = time.perf_counter()
        with self.lock:
            locked = time.perf_counter()
            with torch.inference_mode():
                features = c.encoder(batch)
            encoded = time.perf_counter()
            out = c.decode_features(features.grid, features.pooled, beam_size=beam_size, n_best=n_best,
                                    return_attention=self.attention)
            searched = time.perf_counter()
        beam_size, _ = c.search_settings(beam_size)
        result = c._result("upload", out, 0)
        done = time.perf_counter()
        return {
            "caption": result.caption,
            "log_prob": round(result.log_prob, 4),
            "score": round(result.score, 4),
            "words": result.words,
            "alternatives": [{"caption": a.caption, "log_prob": round(a.log_prob, 4), "score": round(a.score, 4)}
                             for a in result.alternatives],
            "attention": (None if result.attention is None
                          else [[round(w, 5) for w in step] for step in result.attention]),
            "grid_shape": list(result.grid_shape) if result.grid_shape else None,
            "view_box": view_box(c.preprocessing, *image.size),
            "beam_size": beam_size,
            "n_best": n_best,
            "timings_ms": {"decode": elapsed_ms(start, decoded), "queue": elapsed_ms(decoded, locked),
                           "encoder": elapsed_ms(locked, encoded), "search": elapsed_ms(encoded, searched),
                           "total": elapsed_ms(start, done)},
        }


# ---------------------------------------------------------------------------- HTTP parsing


def int_param(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    """A bounded integer query parameter, or RequestError(400) saying what is allowed."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer from {low} to {high}")
    return value


def image_from_multipart(content_type: str, body: bytes) -> bytes:
    """The bytes of form field `image` in a multipart/form-data body (the `email` parser,
    since `cgi` left the standard library)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            return part.get_payload(decode=True) or b""
    raise RequestError(HTTPStatus.BAD_REQUEST, "multipart form has no field named 'image'")


class DemoServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the service and the upload limit for its handlers."""

    daemon_threads = True       # a stuck client never keeps the process alive
    request_queue_size = 64     # the default backlog of 5 drops bursts of connections

    def __init__(self, address: tuple[str, int], service: CaptionService, max_upload_bytes: int,
                 quiet: bool = False) -> None:
        self.service = service
        self.max_upload_bytes = max_upload_bytes
        self.quiet = quiet
        super().__init__(address, DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    """Routes a request to a small method; every answer, error or not, is complete JSON/HTML."""

    server: DemoServer
    protocol_version = "HTTP/1.1"   # keep-alive for the page; Content-Length on every answer
    server_version = "captioner-demo"
    timeout = 30                    # a stalled upload cannot hold its thread forever

    ROUTES: dict[str, dict[str, str]] = {
        "/": {"GET": "get_static"},
        "/static/app.js": {"GET": "get_static"},
        "/static/style.css": {"GET": "get_static"},
        "/healthz": {"GET": "get_health"},
        "/api/caption": {"POST": "post_caption"},
    }

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self.dispatch("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self.dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self.dispatch("OPTIONS")

    def dispatch(self, method: str) -> None:
        """404 for unknown paths, 405 (with Allow) for known paths, else the route's method."""
        self.body_pending = (self.headers.get("Content-Length", "0").strip() not in ("", "0")
                             or "Transfer-Encoding" in self.headers)
        path = urlsplit(self.path).path
        route = self.ROUTES.get(path)
        try:
            if route is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
            if method not in route:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED,
                                   f"{method} is not allowed on {path}; use {', '.join(route)}")
            getattr(self, route[method])(path)
        except RequestError as exc:
            allow = {"Allow": ", ".join(route)} if exc.status == HTTPStatus.METHOD_NOT_ALLOWED and route else None
            self.send_json(exc.status, {"error": exc.message}, allow)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True       # the client went away; nothing to answer
        except Exception:                      # noqa: BLE001: a bug must not reach the client
            traceback.print_exc()
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the server log)"})

    # ---- routes ---------------------------------------------------------------------------
    def get_static(self, path: str) -> None:
        name, content_type = STATIC_FILES[path]
        self.send_bytes(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), content_type)

    def get_health(self, path: str) -> None:
        self.send_json(HTTPStatus.OK, {"status": "ok", **self.server.service.info(),
                                       "max_upload_bytes": self.server.max_upload_bytes})

    def post_caption(self, path: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        default_beam = min(self.server.service.captioner.search_defaults["beam_size"], MAX_BEAM)
        beam_size = int_param(query, "beam_size", default_beam, 1, MAX_BEAM)
        n_best = int_param(query, "n_best", 1, 1, beam_size)
        data = self.read_upload()
        self.send_json(HTTPStatus.OK, self.server.service.caption(data, beam_size=beam_size, n_best=n_best))

    # ---- uploads --------------------------------------------------------------------------
    def declared_length(self) -> int:
        """Content-Length as sent (0 when absent), or RequestError for a body we cannot size."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked uploads are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length", "0")
        if not raw.strip().isdigit():
            raise RequestError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        return int(raw)

    def check_length(self) -> tuple[int, bool]:
        """(body length, is multipart), refusing an over-size upload before reading a byte."""
        length = self.declared_length()
        multipart = self.headers.get_content_type() == "multipart/form-data"
        if length > self.server.max_upload_bytes + (MULTIPART_ALLOWANCE if multipart else 0):
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self.too_large(length))
        return length, multipart

    def too_large(self, size: int) -> str:
        limit = self.server.max_upload_bytes
        return f"upload too large: {size / MIB:.2f} MB; the limit is {limit / MIB:g} MB ({limit:,} bytes)"

    def read_upload(self) -> bytes:
        """The image bytes of this request: the raw body, or the multipart field `image`."""
        length, multipart = self.check_length()
        body = self.rfile.read(length) if length else b""   # exactly Content-Length, already capped
        self.body_pending = False
        if len(body) < length:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "upload ended early (fewer bytes than Content-Length)")
        data = image_from_multipart(self.headers["Content-Type"], body) if multipart else body
        if len(data) > self.server.max_upload_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self.too_large(len(data)))
        return data

    def handle_expect_100(self) -> bool:
        """Answer `Expect: 100-continue` (curl does this for large files) with the refusal
        itself when the declared size is over the limit, so the body is never sent."""
        if self.command == "POST" and urlsplit(self.path).path == "/api/caption":
            try:
                self.check_length()
            except RequestError as exc:
                self.body_pending = False       # nothing was sent, so nothing to drain
                self.close_connection = True
                self.send_json(exc.status, {"error": exc.message})
                return False
        return super().handle_expect_100()

    def finish_unread_body(self) -> None:
        """After answering without reading the body: close the connection (its bytes would be
        parsed as the next request), but first read and discard a modest body, bounded in
        bytes and time, because closing a socket with unread input resets it and the client
        (a browser mid-upload) would lose our answer. A huge or stalled body is not waited for."""
        if not getattr(self, "body_pending", False):
            return
        self.body_pending = False
        self.close_connection = True
        try:
            remaining = self.declared_length()
        except RequestError:
            return
        if remaining > DRAIN_LIMIT:
            return
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            self.connection.settimeout(1.0)
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(remaining, 256 * 1024))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    # ---- answers --------------------------------------------------------------------------
    def send_json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_bytes(status, body, "application/json", extra)

    def send_bytes(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        if getattr(self, "body_pending", False):
            self.close_connection = True        # see finish_unread_body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        self.finish_unread_body()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, unknown method) as JSON too."""
        self.close_connection = True
        try:
            self.send_json(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(captioner: Captioner, host: str = "127.0.0.1", port: int = 8000,
                max_upload_bytes: int = 10 * MIB, quiet: bool = False) -> DemoServer:
    """Bind the demo server (port 0 picks a free port); call `serve_forever()` to run it."""
    return DemoServer((host, port), CaptionService(captioner), max_upload_bytes, quiet=quiet)


@contextmanager
def serving(server: DemoServer) -> Iterator[str]:
    """Run `server` in a background thread for the duration of a `with` block; yields its URL."""
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------ screenshot


@contextmanager
def chromium_page(width: int = 1100, height: int = 900) -> Iterator[Any]:
    """A page in Debian's headless Chromium, driven by Playwright (which downloads nothing)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def caption_in_page(page: Any, url: str, image: str | os.PathLike[str], timeout_ms: int = 60_000) -> str:
    """Open the demo, upload `image` through the file input, and return the caption shown."""
    page.goto(url)
    page.wait_for_selector("#app[data-ready='true']", timeout=timeout_ms)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result:not([hidden])", timeout=timeout_ms)
    return page.inner_text("#caption")


def take_screenshot(captioner: Captioner, out: str | os.PathLike[str], image: str | os.PathLike[str]) -> str:
    """Caption `image` in the real page and save a PNG of it; returns the caption."""
    server = make_server(captioner, "127.0.0.1", 0, quiet=True)
    server.service.warm_up()
    with serving(server) as url, chromium_page() as page:
        caption = caption_in_page(page, url, image)
        if page.is_visible("#next"):  # attention models: show the second word's heatmap
            page.click("#next")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
    return caption


# ------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo/app.py", description="Local web demo for captioner.")
    parser.add_argument("--model", help="model file (.safetensors); default: the model shipped in the package")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--screenshot", metavar="PNG", help="caption --image in headless Chromium, save a "
                        "screenshot of the page to PNG, and exit")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image for --screenshot")
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        captioner = Captioner.load(args.model, device=args.device)
    except (ModelFileError, OSError, ValueError) as exc:
        print(f"demo/app.py: error: {exc}", file=sys.stderr)
        return 1
    if args.screenshot:
        caption = take_screenshot(captioner, args.screenshot, args.image)
        print(f"{args.screenshot}: {caption}")
        return 0
    server = make_server(captioner, args.host, args.port, int(args.max_upload_mb * MIB))
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
    sys.exit(main())
