"""A real OpenAI-compatible images server on 127.0.0.1, scripted to fail, for the real-backend tests.

``POST /v1/images/generations`` answers ``{"data": [{"b64_json": <PNG>}, ...]}`` with ``n`` PNGs
of the requested ``size``. Each request first takes the next step of :attr:`ImageServer.script`:
"ok", "500", "503", "429" (with ``Retry-After: 0``), "400" (a content-policy refusal), "stall" (no answer
for ``stall_seconds``), or "garbage" (200 with a body that is not JSON). Requests are bounded by
the tests; every stall ends by itself.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


class ImageServer:
    """The server, its script and what it saw.

    Attributes:
        script: steps to play, one per request; "ok" when empty.
        requests: the JSON payloads received, in order.
        max_in_flight: the most requests handled at once.
        delay: seconds every "ok" answer takes (to observe concurrency).
        stall_seconds: how long a "stall" lasts.
    """

    def __init__(self) -> None:
        self.script: collections.deque[str] = collections.deque()
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.stall_seconds = 2.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_step(self, payload: dict) -> str:
        with self._lock:
            self.requests.append(payload)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.popleft() if self.script else "ok"

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _release(self) -> None:
                """The request stops counting as in flight (once), before its answer goes out: the client may
                send its next request the moment it has read this answer, before this thread returns."""
                if self._counted:
                    self._counted = False
                    server._done()

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self._release()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                step = server._next_step(payload)
                self._counted = True
                try:
                    self._play(step, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): expected for stalls
                finally:
                    self._release()

            def _play(self, step: str, payload: dict) -> None:
                if self.path != "/v1/images/generations":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if step == "stall":
                    time.sleep(server.stall_seconds)
                    return self._send(200, b'{"data": []}')
                if step in ("500", "503", "429"):
                    headers = {"Retry-After": "0"} if step == "429" else {}
                    return self._send(int(step), b'{"error": {"message": "busy"}}', headers)
                if step == "400":
                    return self._send(400, json.dumps({"error": {"message": "prompt rejected by the safety system"}}).encode())
                if step == "garbage":
                    return self._send(200, b"<html>oops</html>")
                time.sleep(server.delay)
                width, height = (int(v) for v in payload["size"].split("x"))
                seed = payload.get("seed", len(server.requests))
                images = [{"b64_json": base64.b64encode(_png(width, height, seed + i)).decode()}
                          for i in range(payload.get("n", 1))]
                self._send(200, json.dumps({"created": 0, "data": images}).encode())

        return Handler


def _png(width: int, height: int, seed: int) -> bytes:
    colour = np.random.default_rng(seed).integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(colour, (height, width, 3)).copy()).save(buffer, format="PNG")
    return buffer.getvalue()
