"""The demo's HTTP server: connections, routing, uploads and answers.

Built on `http.server.ThreadingHTTPServer` (one thread per connection) with the request
head and body read by demo/framing.py under deadlines. The rules it keeps:

* every request gets exactly one complete answer, JSON `{"error": "..."}` for every refusal;
  bad input never produces a traceback, a bug produces a 500 and a traceback in the log only;
* an answer sent without reading the request's body closes the connection (the body's bytes
  would be read as the next request), after discarding a bounded amount of the body so the
  client gets to read the answer instead of a reset;
* at most `max_connections` connections and `max_in_flight` uploads at once; beyond them a
  503 with Retry-After, so a flood costs the server a bounded number of threads and bodies.
"""
from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from demo import multipart
from demo.errors import RequestError, busy
from demo.framing import Reader, RequestHead, Timeout, read_head
from demo.limits import MIB, Limits

if TYPE_CHECKING:  # the service imports torch: not needed to bind, or to refuse a bad request
    from demo.service import CaptionService

STATIC_DIR = Path(__file__).resolve().parent / "static"
# path -> (file under demo/static, content type): the only files the server will ever send.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Connections refused over the cap still get a 503, from a short-lived thread; past this
# many refusals at once they are simply closed.
MAX_REFUSALS = 64


class Slots:
    """A counter that refuses instead of waiting: at most `size` holders at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


class DemoServer(ThreadingHTTPServer):
    """The listening socket, the caps on connections and uploads, and the service (attached
    once the model is loaded, so a bad --host or --port fails before the model loads)."""

    daemon_threads = True       # a stuck client never keeps the process alive
    request_queue_size = 64     # the default backlog of 5 drops bursts of connections

    def __init__(self, address: tuple[str, int], limits: Limits, service: CaptionService | None = None,
                 quiet: bool = False) -> None:
        self.limits = limits
        self.service = service
        self.quiet = quiet
        self.connections = Slots(limits.max_connections)
        self.refusals = Slots(MAX_REFUSALS)
        self.uploads = Slots(limits.max_in_flight)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, DemoHandler)

    def server_bind(self) -> None:
        """Bind without http.server's reverse DNS lookup of the host (slow or hanging offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if self.connections.try_acquire():
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.connections.release()
                raise
        elif self.refusals.try_acquire():
            threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
        else:
            self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 for a connection over the cap, then a short linger so the client reads it."""
        body = json.dumps({"error": f"server busy: {self.limits.max_connections} connections open; "
                                    "retry shortly"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and request.recv(65536):
                pass
        except OSError:
            pass
        finally:
            request.close()
            self.refusals.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The handler answers every error itself; what reaches here is a connection that
        broke, worth one log line, not a traceback."""
        print(f"demo: connection from {client_address} failed: {sys.exc_info()[1]!r}", file=sys.stderr)


class DemoHandler(BaseHTTPRequestHandler):
    """Routes each request to a small method; every answer, error or not, is complete."""

    server: DemoServer
    protocol_version = "HTTP/1.1"
    server_version = "captioner-demo"

    ROUTES: ClassVar[dict[str, dict[str, str]]] = {
        "/": {"GET": "get_static", "HEAD": "get_static"},
        "/static/app.js": {"GET": "get_static", "HEAD": "get_static"},
        "/static/style.css": {"GET": "get_static", "HEAD": "get_static"},
        "/healthz": {"GET": "get_health", "HEAD": "get_health"},
        "/api/caption": {"POST": "post_caption"},
    }

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def setup(self) -> None:
        super().setup()
        self.limits = self.server.limits
        self.reader = Reader(self.rfile, self.connection)
        self.linger = False

    def handle(self) -> None:
        try:
            while self.handle_one_request():
                pass
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading our answer
        finally:
            if self.linger:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
                self.reader.discard(self.limits.drain_bytes, self.limits.drain_seconds)

    def handle_one_request(self) -> bool:
        """Answer one request; whether the connection stays open for another."""
        self.command, self.requestline, self.request_version = None, "", "HTTP/1.1"
        self.answered, self.unread, self.close_connection = False, 0, True
        if not self.reader.wait_for_request(self.limits.idle_seconds):
            return False
        try:
            self.reader.request_line = ""
            head = read_head(self.reader, self.limits)
            self.command, self.request_version = head.method, head.version
            self.requestline = f"{head.method} {head.target} {head.version}"
            self.close_connection, self.unread = not head.keep_alive, head.length
            self.dispatch(head)
        except RequestError as exc:
            self.requestline = self.requestline or self.reader.request_line  # for the access log
            self.refuse(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:  # noqa: BLE001 - a bug must not reach the client
            self.log_error("internal error on %r\n%s", self.requestline, traceback.format_exc())
            self.refuse(RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)",
                                     close=True))
        return not self.close_connection

    def dispatch(self, head: RequestHead) -> None:
        """404 for unknown paths, 405 (with Allow) for known paths, else the route's method."""
        route = self.ROUTES.get(head.path)
        if route is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {head.path[:200]}")
        if head.method not in route:
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED,
                               f"{head.method} is not allowed on {head.path}; use {', '.join(route)}",
                               headers={"Allow": ", ".join(route)})
        getattr(self, route[head.method])(head)

    # ---- routes ---------------------------------------------------------------------------
    def get_static(self, head: RequestHead) -> None:
        name, content_type = STATIC_FILES[head.path]
        self.respond(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), content_type)

    def get_health(self, head: RequestHead) -> None:
        service = self.server.service
        if service is None:
            raise busy("the model is still loading")
        self.send_json(HTTPStatus.OK, {"status": "ok", **service.info(),
                                       "max_upload_bytes": self.limits.max_upload_bytes,
                                       "limits": self.limits.summary(),
                                       "load": {"uploads_in_flight": self.server.uploads.used, **service.state()}})

    def post_caption(self, head: RequestHead) -> None:
        service = self.server.service
        if service is None:
            raise busy("the model is still loading")
        decoding = service.decoding_from_query(head.query)
        boundary = self.check_upload(head)
        if not self.server.uploads.try_acquire():
            raise busy(f"server busy: {self.limits.max_in_flight} uploads in progress; retry shortly")
        try:
            if head.expect_continue:
                self.connection.settimeout(self.limits.write_seconds)
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = self.read_body(head)
            data = body if boundary is None else multipart.form_field(
                body, boundary, "image", max_parts=self.limits.max_parts,
                max_part_head_bytes=self.limits.max_part_head_bytes,
                deadline=time.monotonic() + self.limits.multipart_seconds)
            if len(data) > self.limits.max_upload_bytes:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self.too_large(len(data)))
            answer = service.caption(data, decoding)
        finally:
            self.server.uploads.release()
        self.send_json(HTTPStatus.OK, answer)

    # ---- uploads --------------------------------------------------------------------------
    def check_upload(self, head: RequestHead) -> bytes | None:
        """Refuse an upload from its headers alone; its multipart boundary, if any."""
        if "Content-Length" not in head.headers:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the image with a Content-Length header")
        encoding = head.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"Content-Encoding {encoding[:40]!r} is not accepted; send the image file as it is")
        if head.length == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "empty upload: no image data received")
        content_type = head.headers.get_content_type()
        boundary = None
        if content_type.startswith("multipart/"):
            if content_type != "multipart/form-data":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                   f"{content_type[:60]} is not accepted; send the image bytes or multipart/form-data")
            boundary = multipart.boundary_of(head.headers.get("Content-Type", ""))
        allowance = self.limits.multipart_allowance if boundary else 0
        if head.length > self.limits.max_upload_bytes + allowance:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self.too_large(head.length))
        return boundary

    def too_large(self, size: int) -> str:
        limit = self.limits.max_upload_bytes
        return f"upload too large: {size / MIB:.2f} MB; the limit is {limit / MIB:g} MB ({limit:,} bytes)"

    def read_body(self, head: RequestHead) -> bytearray:
        """The whole body within `body_seconds`: 408 when it does not arrive in time."""
        try:
            body = self.reader.read_body(head.length, time.monotonic() + self.limits.body_seconds)
        except Timeout:
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"request body not received within "
                                                           f"{self.limits.body_seconds:g} s", close=True) from None
        except EOFError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"upload ended early ({exc})", close=True) from None
        self.unread = 0
        return body

    # ---- answers --------------------------------------------------------------------------
    def refuse(self, exc: RequestError) -> None:
        if exc.close:
            self.close_connection = True
        self.send_json(exc.status, {"error": exc.message}, exc.headers)

    def send_json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.respond(status, body, "application/json", extra)

    def respond(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        """Send the one answer of this request (a second is a bug: logged, never sent)."""
        if self.answered:
            self.log_error("second answer (%d) to %r suppressed", status, self.requestline)
            return
        self.answered = True
        if self.unread:
            self.close_connection = True  # the body's bytes would be read as the next request
        if self.close_connection:
            self.linger = True  # the client may still be sending: see handle()
        self.connection.settimeout(self.limits.write_seconds)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own error path, should it ever run: JSON like every other answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def log_error(self, format: str, *args: Any) -> None:
        super().log_message(format, *args)  # errors are logged even when quiet


def make_server(captioner: Any, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int | None = None,
                quiet: bool = False, limits: Limits | None = None) -> DemoServer:
    """Bind the demo server (port 0 picks a free port); call `serve_forever()` to run it."""
    from demo.service import CaptionService

    limits = limits or Limits()
    if max_upload_bytes is not None:
        limits = limits.replace(max_upload_bytes=max_upload_bytes)
    return DemoServer((host, port), limits, CaptionService(captioner, limits), quiet=quiet)


@contextlib.contextmanager
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
