"""``difflo serve``: a local web page over a checkpoint (Python's ``http.server``, no web framework).

Routes (JSON unless noted)::

    GET  /                           the page (static/index.html, app.js, style.css; no external URL)
    GET  /api/info                   model, classes, samplers that fit it, defaults, limits
    POST /api/sample                 {classes, n, w, sampler, steps, seed, fast}    -> {id, ...}
    POST /api/edit                   {technique, image, mask, class, strength, ...} -> {id, ...}
    POST /api/upload                 {image: data URL} -> the image as the model sees it, or 400
    GET  /api/jobs/ID                status, progress, trajectory steps, result (files, command)
    POST /api/jobs/ID/cancel
    GET  /api/jobs/ID/files/NAME     grid.png, samples.npz, trajectory.png, figure.png, raw.npz, ...
    GET  /api/jobs/ID/frames/K.png   trajectory step K: x_t (top) and predicted x0 (bottom)

A bad request is HTTP 400 ``{"error": "..."}``; the page shows the message. Every response has a
Content-Security-Policy that allows this origin only, so the page cannot reach the network.

Under load: the listen backlog (128) takes a burst of connects; a client that goes away early (reset,
broken pipe) or stalls (a lying Content-Length, an idle socket: dropped after ``Handler.timeout``
seconds) costs one line on stderr, ``difflo serve: client HOST:PORT went away (...)``, never a traceback.
"""
from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from ..errors import DiffloError
from .app import App, LIMITS
from .jobs import Busy

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
FILE_TYPES = {".png": "image/png", ".npz": "application/octet-stream"}
CSP = "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'"
MAX_BODY = LIMITS["upload_bytes"] * 3          # two base64 images plus the fields
GONE = (ConnectionError, TimeoutError)          # reset, broken pipe, aborted; socket timeouts
JOB = re.compile(r"^/api/jobs/([0-9a-f]{16})(?:/(cancel|files/([A-Za-z0-9_.-]+)|frames/(\d+)\.png))?$")


def _static(name: str) -> bytes:
    return resources.files("difflo.serve").joinpath("static", name).read_bytes()


def _log_gone(client_address, why: str) -> None:
    sys.stderr.write(f"difflo serve: client {client_address[0]}:{client_address[1]} went away ({why})\n")


class Handler(BaseHTTPRequestHandler):
    app: App                    # set on the subclass made by make_server
    quiet: bool = False
    timeout = 30.0              # seconds a socket may stall (reading or writing) before it is dropped
    server_version = "difflo"
    sys_version = ""

    # ------------------------------------------------------------------ clients that go away
    def handle_one_request(self):
        try:
            super().handle_one_request()
        except GONE as e:
            self.close_connection = True
            self._gone(type(e).__name__)

    def _gone(self, why: str) -> None:
        if not self.quiet:
            _log_gone(self.client_address, why)

    # ------------------------------------------------------------------ responses
    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": message})

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def log_error(self, fmt, *args):
        if fmt.startswith("Request timed out"):    # http.server catches socket timeouts itself
            return self._gone(f"timed out after {self.timeout:g} s")
        self.log_message(fmt, *args)

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            name, ctype = STATIC[path]
            return self._send(200, _static(name), ctype)
        if path == "/api/info":
            return self._json(200, self.app.info())
        m = JOB.match(path)
        if not m or m.group(2) == "cancel":
            return self._error(404, f"no such page: {path}")
        job = self.app.queue.get(m.group(1))
        if job is None:
            return self._error(404, "no such job (finished jobs are kept for a while, then dropped)")
        if m.group(3):
            name = m.group(3)
            files = (job.result or {}).get("files", {})
            if name not in files.values() or not (job.dir / name).is_file():
                return self._error(404, f"job {job.id} has no file {name}")
            ctype = FILE_TYPES.get(name[name.rfind("."):], "application/octet-stream")
            return self._send(200, (job.dir / name).read_bytes(), ctype,
                              {"Content-Disposition": f'inline; filename="{name}"'})
        if m.group(4) is not None:
            png = self.app.frame_png(job, int(m.group(4)))
            if png is None:
                return self._error(404, f"job {job.id} has no trajectory frame {m.group(4)}")
            return self._send(200, png, "image/png")
        return self._json(200, self.app.job_json(job))

    do_HEAD = do_GET

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        m = JOB.match(path)
        if m and m.group(2) == "cancel":
            job = self.app.queue.get(m.group(1))
            if job is None:
                return self._error(404, "no such job")
            job.cancel()
            return self._json(200, self.app.job_json(job))
        routes = {"/api/sample": self.app.submit_sample, "/api/edit": self.app.submit_edit,
                  "/api/upload": self.app.upload}
        if path not in routes:
            return self._error(404, f"no such API: POST {path}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:                                  # a negative one would read until the socket closes
            return self._error(400, "bad Content-Length")
        if length > MAX_BODY:
            return self._error(413, f"request too large ({length >> 20} MB); images are limited to "
                                    f"{LIMITS['upload_bytes'] >> 20} MB")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "the request body is not valid JSON")
        try:
            out = routes[path](body)
        except Busy as e:
            return self._error(503, str(e))
        except DiffloError as e:                       # RequestError and any other user error
            return self._error(400, str(e))
        if path == "/api/upload":
            return self._json(200, out)
        return self._json(202, self.app.job_json(out))


class Server(ThreadingHTTPServer):
    request_queue_size = 128    # listen backlog: a burst of connects waits instead of being dropped
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Backstop for a client that goes away outside a request (the handler catches the rest).
        e = sys.exc_info()[1]
        if not isinstance(e, GONE):
            return super().handle_error(request, client_address)        # a bug: its traceback
        if not self.RequestHandlerClass.quiet:
            _log_gone(client_address, type(e).__name__)


def make_server(app: App, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False) -> Server:
    handler = type("DiffloHandler", (Handler,), {"app": app, "quiet": quiet})
    try:
        return Server((host, port), handler)
    except OSError as e:
        raise DiffloError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


def serve_in_thread(ckpt, host: str = "127.0.0.1", port: int = 0, **app_kw):
    """Start a server in a background thread (for tests and scripts): (url, app, httpd); stop with
    ``httpd.shutdown(); app.close()``."""
    app = App(ckpt, **app_kw)
    httpd = make_server(app, host, port, quiet=True)
    threading.Thread(target=httpd.serve_forever, name="difflo-serve", daemon=True).start()
    h, p = httpd.server_address[:2]
    return f"http://{h}:{p}", app, httpd
