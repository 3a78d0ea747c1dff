"""A small OpenAI-compatible server for tests, on 127.0.0.1 (not a test module).

Answers GET /v1/models, GET /version, POST /v1/chat/completions and /v1/completions. The text
of a completion is a function of the request (messages and seed), so tests can predict it.
Misbehaves on purpose, on the FIRST attempt of a request, by its seed:
    seed % 4 == 1 -> 429 Too Many Requests (Retry-After: 0)
    seed % 4 == 2 -> 500 Internal Server Error
    seed % 4 == 3 -> the connection is dropped without an answer
Even seeds get their reasoning split out into `reasoning_content` (as `vllm serve
--reasoning-parser deepseek_r1` does); odd seeds get the whole text in `content`, whose
reasoning opens without `<think>` (the server's template prefilled it). A request whose last
message is "always fail" always gets 503. Requests with another Bearer key than `api_key` get 401. The server stops itself
after `lifetime_s` in case a test forgets to.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    def __init__(self, model: str = "teacher", api_key: str | None = None, delay_s: float = 0.05, lifetime_s: float = 60.0):
        self.model = model
        self.api_key = api_key
        self.delay_s = delay_s
        self.attempts: dict[int, int] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.stopper = threading.Timer(lifetime_s, self.stop)
        self.stopper.daemon = True

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        self.stopper.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopper.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def reply(body: dict) -> tuple[str, str]:
        """(reasoning, answer) the server generates for a request."""
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        return f"thinking about {prompt[:20]!r} with seed {body.get('seed', 0)}", f"The answer is \\boxed{{{body.get('seed', 0) % 7}}}."

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self._send(401, {"error": {"message": "invalid api key"}})
                return False

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                elif self.path == "/version":
                    self._send(200, {"version": "fake-1.0"})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if not self._authorised():
                    return
                seed = int(body.get("seed", 0))  # a scoring request has none
                with server.lock:
                    server.bodies.append(body)
                    attempt = server.attempts[seed] = server.attempts.get(seed, 0) + 1
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay_s)
                    if body.get("messages", [{}])[-1].get("content") == "always fail":
                        return self._send(503, {"error": {"message": "overloaded"}})
                    if attempt == 1 and seed % 4 == 1:
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                    if attempt == 1 and seed % 4 == 2:
                        return self._send(500, {"error": {"message": "boom"}})
                    if attempt == 1 and seed % 4 == 3:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)  # dropped: no status line at all
                        return
                    reasoning, answer = server.reply(body)
                    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
                    if self.path == "/v1/completions":
                        choice = {"index": 0, "text": f"{reasoning}\n</think>\n\n{answer}", "finish_reason": "stop"}
                    elif seed % 2 == 0:
                        choice = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "\n\n" + answer, "reasoning_content": "\n" + reasoning + "\n"}}
                    else:
                        choice = {"index": 0, "finish_reason": "length",
                                  "message": {"role": "assistant", "content": f"{reasoning}\n</think>\n\n{answer}"}}
                    self._send(200, {"id": "x", "object": "chat.completion", "model": server.model, "choices": [choice], "usage": usage})
                finally:
                    with server.lock:
                        server.in_flight -= 1

        return Handler


def closed_port_url() -> str:
    """A base URL nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
