"""Any OpenAI-compatible endpoint: `vllm serve`, SGLang, or a hosted API.

    export OPENAI_API_KEY=...        # only when the server wants one; never in a recipe
    engine = OpenAIEngine("deepseek-ai/DeepSeek-R1", base_url="http://10.0.0.5:8000/v1", max_in_flight=256)

- Chat completions (`/chat/completions`) with the request's messages: the server applies the
  model's chat template. A request without messages goes to `/completions` with its prompt text.
- Async (httpx) with `max_in_flight` workers, so at most that many requests are open at once;
  completions are yielded as they arrive, in whatever order the server finishes them.
- Retries: 429, 408, 409 and 5xx answers, timeouts, refused and dropped connections are retried
  up to `max_retries` times with exponential backoff and full jitter (sleep ~ U(0, min(cap,
  base * 2^attempt))), honouring a Retry-After header. Other 4xx answers are not retried: 401,
  403 and 404 stop the run (wrong key, model or URL); a 400 (e.g. prompt too long) fails only
  that sample. A sample that still fails comes back with finish_reason "error" and is not
  written, so rerunning the command retries it.
- A run-wide breaker: `max_connection_failures` connection failures in a row over all requests
  (refused, reset or dropped connections: no answer at all, unlike a 5xx) mean the server is
  gone, and the run stops at once with one line saying so; what finished is kept. Without it a
  dead server cost every remaining request all its retries (minutes, not seconds).
- Servers that split the reasoning out (`reasoning_content`, or `reasoning`) have it folded
  back as "<think>\\n{reasoning}\\n</think>\\n\\n{content}", R1's own layout.
- The API key is read from the environment variable named by `api_key_env` (default
  OPENAI_API_KEY); it never appears in configs, records or logs.
- Before any work, `GET {base_url}/models` checks the server is up, the key accepted and the
  model served, so a typo fails in a second and not after the first timeout.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
from typing import Any, Iterable, Iterator

from distill.engines import Completion, Request
from distill.errors import DistillError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
RETRY_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401, 403, 404}
_DONE = object()


class OpenAIEngine:
    name = "openai"
    tokenizer = None  # the server renders the chat template

    def __init__(
        self,
        model: str | None,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_in_flight: int = 64,
        timeout_s: float = 3600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 8,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        check_server: bool = True,
        max_connection_failures: int = 8,
        extra_body: dict[str, Any] | None = None,
    ):
        if not model:
            raise DistillError("the openai engine needs --model: the model name the server serves")
        if max_in_flight < 1:
            raise DistillError(f"openai.max_in_flight must be at least 1, got {max_in_flight}")
        self.model_name = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = dict(extra_body or {})
        self.max_connection_failures = max_connection_failures
        self.retries = 0  # retried attempts over the engine's life, for metrics
        self._failures = 0  # connection failures in a row, over all requests (the breaker)
        self._version: str | None = None
        if check_server:
            self.check_server()

    @property
    def version(self) -> str:
        return self._version or "unknown"

    # ----------------------------------------------------------------------------------------

    def check_server(self) -> None:
        """Fail before any work when the server is down, rejects the key or lacks the model."""
        import httpx

        try:
            response = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=self.connect_timeout_s)
        except httpx.HTTPError as error:
            raise DistillError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} ({type(error).__name__}: {error}); "
                "start it (e.g. `vllm serve MODEL`) or set openai.base_url=http://HOST:PORT/v1"
            ) from None
        if response.status_code in (401, 403):
            raise DistillError(f"{self.base_url} rejected the API key (HTTP {response.status_code}); export {self.api_key_env}=<key>")
        if response.status_code == 200:
            try:
                served = [m.get("id") for m in response.json().get("data", [])]
            except (ValueError, AttributeError):
                served = []
            if served and self.model_name not in served:
                raise DistillError(f"{self.base_url} does not serve model '{self.model_name}'; it serves: {', '.join(map(str, served))}")
        # `vllm serve` and SGLang answer GET /version at the server root; hosted APIs may not.
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        try:
            answer = httpx.get(f"{root}/version", headers=self._headers(), timeout=self.connect_timeout_s)
            if answer.status_code == 200:
                self._version = str(answer.json().get("version") or "unknown")
        except (httpx.HTTPError, ValueError, AttributeError):
            pass

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request as responses arrive (an event loop runs in a thread)."""
        results: queue.Queue = queue.Queue()
        state: dict[str, Any] = {}
        thread = threading.Thread(target=self._run_loop, args=(iter(requests), results, state), daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            loop, task = state.get("loop"), state.get("task")
            if thread.is_alive() and loop is not None and task is not None:
                loop.call_soon_threadsafe(task.cancel)  # the caller stopped early: abandon the rest
            thread.join(timeout=30)

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _run_loop(self, requests: Iterator[Request], results: queue.Queue, state: dict[str, Any]) -> None:
        async def main() -> None:
            state["loop"] = asyncio.get_running_loop()
            state["task"] = asyncio.current_task()
            await self._run_all(requests, results)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass
        except BaseException as error:  # surfaced in the caller's thread
            results.put(error)
        results.put(_DONE)

    async def _run_all(self, requests: Iterator[Request], results: queue.Queue) -> None:
        import httpx

        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers()) as client:

            async def worker() -> None:
                # Workers share one iterator: each takes the next request when its last is done,
                # so exactly `max_in_flight` requests are open while work remains.
                for request in requests:
                    results.put(await self._complete(client, request))

            workers = [asyncio.create_task(worker()) for _ in range(self.max_in_flight)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()

    async def _complete(self, client: Any, request: Request) -> Completion:
        import httpx

        chat = bool(request.messages)
        url = f"{self.base_url}/chat/completions" if chat else f"{self.base_url}/completions"
        body: dict[str, Any] = {
            "model": self.model_name,
            "temperature": request.sampling.temperature,
            "top_p": request.sampling.top_p,
            "max_tokens": request.sampling.max_tokens,
            "seed": request.seed,
            "n": 1,
            **self.extra_body,
        }
        if request.sampling.stop:
            body["stop"] = list(request.sampling.stop)
        if chat:
            body["messages"] = [dict(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt
        last_error = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = await client.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as error:  # timeouts, refused, dropped
                last_error = f"{type(error).__name__}: {error}"
                if isinstance(error, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)):
                    self._failures += 1  # no answer at all (a slow answer, ReadTimeout, is not counted)
                    if self._failures >= self.max_connection_failures:
                        raise DistillError(
                            f"the server at {self.base_url} stopped answering ({self._failures} connection failures in a row, "
                            f"last: {last_error}); finished samples are kept: rerun the same command once it is back"
                        ) from None
            else:
                self._failures = 0  # it answered: the server is there
                status = response.status_code
                if status == 200:
                    try:
                        return _parse(request.key, response.json(), chat)
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
                        last_error = f"malformed response ({type(error).__name__}: {error})"
                elif status in FATAL_STATUS:
                    raise DistillError(
                        f"{url} answered HTTP {status} ({_error_text(response)}); "
                        f"check the model name, base_url and the key in ${self.api_key_env}"
                    )
                elif status in RETRY_STATUS or status >= 500:
                    last_error = f"HTTP {status} ({_error_text(response)})"
                    retry_after = _retry_after(response)
                else:  # another 4xx: this request is at fault, retrying will not help
                    return Completion(request.key, "", "error", 0, 0, info={"error": f"HTTP {status}: {_error_text(response)}"})
            if attempt == self.max_retries:
                break
            self.retries += 1
            ceiling = min(self.backoff_max_s, self.backoff_s * 2**attempt)
            delay = random.uniform(0, ceiling)  # full jitter: clients that failed together spread out
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max_s))
            await asyncio.sleep(delay)
        return Completion(request.key, "", "error", 0, 0, info={"error": f"gave up after {self.max_retries + 1} attempts: {last_error}"})


# --------------------------------------------------------------------------------------------
# helpers


def fold_reasoning(reasoning: str | None, content: str | None) -> str:
    """One assistant text from a server that split the reasoning out, in R1's layout."""
    content = content or ""
    if not reasoning:
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


def _parse(key: str, data: dict[str, Any], chat: bool) -> Completion:
    choice = data["choices"][0]
    if chat:
        message = choice["message"]
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        text = fold_reasoning(reasoning, message.get("content"))
    else:
        text = choice["text"] or ""
    usage = data.get("usage") or {}
    return Completion(
        key=key,
        text=text,
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_text(response: Any, limit: int = 160) -> str:
    try:
        data = response.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
