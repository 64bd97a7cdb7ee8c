"""A scripted OpenAI-compatible chat server on 127.0.0.1, for the judge tests and benchmarks.

The ``reply`` callable sees each request's JSON and its 0-based arrival number and returns a
:class:`Reply`: a status, headers, the answer text (wrapped as a chat completion) or a raw body,
a delay before answering, a stall (no answer until the client gives up; bounded by
``stall_limit_s`` so the server's threads always end), a slow drip (headers at once, then the body
one byte every ``drip_s`` seconds, as a hung proxy or a hostile server does) or a reset (the
connection is closed with a TCP RST instead of an answer).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    stall: bool = False
    drip_s: float = 0.0
    reset: bool = False


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog (5) drops bursts of connections


class JudgeServer:
    """A loopback chat server in a background thread; use as a context manager."""

    def __init__(self, reply: Callable[[dict[str, Any], int], Reply], stall_limit_s: float = 5.0):
        self.reply, self.stall_limit_s = reply, stall_limit_s
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    number = len(server.requests)
                    server.requests.append(payload)
                    server.headers.append(dict(self.headers))
                    server.arrivals.append(time.perf_counter())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True

                def release() -> None:
                    """Stop counting this request as in flight (once), before its answer goes out: the client
                    may send its next request the moment it has read the answer, before this thread returns."""
                    nonlocal counted
                    if counted:
                        counted = False
                        with server._lock:
                            server.in_flight -= 1

                try:
                    reply = server.reply(payload, number)
                    if reply.stall:
                        server._closing.wait(server.stall_limit_s)
                        return
                    if reply.reset:
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.rfile.close()  # the socket closes (with an RST) only once its files are closed
                        self.connection.close()
                        return
                    time.sleep(reply.delay_s)
                    body = reply.body if reply.body is not None else completion(reply.content or "")
                    release()
                    self.send_response(reply.status)
                    for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for chunk in [body[i:i + 1] for i in range(len(body))] if reply.drip_s else [body]:
                        self.wfile.write(chunk)  # unbuffered: each byte is sent at once
                        if reply.drip_s and server._closing.wait(reply.drip_s):
                            return
                except OSError:  # the client went away (broken pipe, reset)
                    pass
                finally:
                    release()

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
