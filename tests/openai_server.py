"""A loopback server speaking the subset of vLLM's and SGLang's HTTP APIs that RemoteEngine uses.

Sampling is an :class:`rl.engine.hf.HFEngine` over the model it is given, so a remote result can be
compared with the in-process engine's for the same seed. ``faults`` scripts failures: each entry
answers one request (in arrival order) with that HTTP status, or drops the connection (``"drop"``),
before the server answers normally. Every request's path and body is recorded.

Endpoints: ``/v1/completions`` (vLLM), ``/generate`` (SGLang), ``/update_weights_from_disk``
(SGLang), ``/pause``, ``/resume``, ``/reset_prefix_cache`` and ``/collective_rpc`` with method
``visenv_load_weights`` (vLLM dev mode).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rl.engine import GenerationRequest
from rl.engine.hf import HFEngine
from rl.engine.remote import load_weights

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "seed", "stop_token_ids", "ignore_eos",
                     "logprobs", "return_token_ids", "skip_special_tokens"}
"""The fields of vLLM's ``CompletionRequest`` the server accepts (others are a 400, as a typo would be)."""
SAMPLING_FIELDS = {"max_new_tokens", "temperature", "stop_token_ids", "sampling_seed", "ignore_eos", "no_stop_trim",
                   "skip_special_tokens"}
"""The fields of SGLang's ``SamplingParams`` the server accepts."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class OpenAIServer:
    """The loopback server in a background thread; use as a context manager (``url`` is its root)."""

    def __init__(self, model, faults: list[int | str] | None = None):
        self.engine = HFEngine(model)
        self.faults = list(faults or [])
        self.calls: list[tuple[str, Any]] = []
        self.paused = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                with server._lock:
                    server.calls.append((self.path, body))
                    fault = server.faults.pop(0) if server.faults else None
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                status, answer = (fault, {"error": "scripted fault"}) if fault else server.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, path: str, body: Any) -> tuple[int, Any]:
        route = path.split("?")[0]
        if route == "/v1/completions":
            unknown = set(body) - COMPLETION_FIELDS
            if unknown or not isinstance(body.get("prompt"), list) or body.get("logprobs") != 0:
                return 400, {"error": f"unsupported request: unknown fields {sorted(unknown)}"}
            result = self._sample(body["prompt"], body["max_tokens"], body["temperature"], body["seed"],
                                  body["stop_token_ids"])
            return 200, {"object": "text_completion", "choices": [{
                "index": 0, "text": "", "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                "logprobs": {"tokens": [f"token_id:{t}" for t in result.token_ids],
                             "token_logprobs": result.logprobs, "top_logprobs": None, "text_offset": []}}]}
        if route == "/generate":
            params = body["sampling_params"]
            if set(params) - SAMPLING_FIELDS or not body.get("return_logprob"):
                return 400, {"error": "unsupported sampling params"}
            result = self._sample(body["input_ids"], params["max_new_tokens"], params["temperature"],
                                  params["sampling_seed"], params["stop_token_ids"])
            reason = ({"type": "stop", "matched": result.token_ids[-1]} if result.finish_reason == "stop"
                      else {"type": "length", "length": len(result.token_ids)})
            return 200, {"text": "", "output_ids": result.token_ids, "meta_info": {
                "finish_reason": reason, "output_token_logprobs": [[lp, t, None] for t, lp in
                                                                   zip(result.token_ids, result.logprobs)]}}
        if route == "/update_weights_from_disk":
            self.engine.update_weights(load_weights(body["model_path"]), int(body["weight_version"]))
            return 200, {"success": True, "message": "Succeeded to update model weights."}
        if route == "/collective_rpc" and body.get("method") == "visenv_load_weights":
            if not self.paused:
                return 409, {"error": "load weights while paused"}
            self.engine.update_weights(load_weights(body["args"][0]), self.engine.version + 1)
            return 200, {"results": [None]}
        if route in ("/pause", "/resume"):
            self.paused = route == "/pause"
            return 200, {"status": "paused" if self.paused else "resumed"}
        if route == "/reset_prefix_cache":
            return 200, {}
        return 404, {"error": f"no route {route}"}

    def _sample(self, prompt, max_tokens, temperature, seed, stop_token_ids):
        return self.engine.generate_many([GenerationRequest(prompt, max_tokens, temperature, seed, stop_token_ids)])[0]

    def __enter__(self) -> "OpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.engine.close()
