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
- The teacher's token distribution (engines/__init__.py). `score` posts prompt + completion as
  token ids to `/completions` with vLLM's `prompt_logprobs: 0` (the actual token's log-prob at
  every prompt position) and `max_tokens: 1` (vLLM's minimum; the token is discarded), and
  reads the completion's positions. A server that returns no prompt log-probs (hosted APIs,
  for one) is a one-line error naming the server: score with vLLM's server or the hf/vllm
  engines. `Sampling.top_logprobs = k` asks for `logprobs` (chat: `logprobs: true,
  top_logprobs: k + 1`; completions: `logprobs: k`) and vLLM's `return_tokens_as_token_ids`, so
  tokens come back as "token_id:123" and Completion.token_ids are set. One more than k on chat:
  vLLM's chat response lists the sampled token first among the `top_logprobs` it returns, so
  when the sampled token is not among the k best the k-th is cut off; of k + 1 returned the
  k most likely are exactly the top k (any server that returns the true top k + 1 is served
  right too). vLLM returns at most its `--max-logprobs` (default 20) per position.
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

from distill.engines import Completion, Request, Scored, ScoreRequest
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
        yield from self._stream(requests, self._complete)

    def score(self, requests: Iterable[ScoreRequest]) -> Iterator[Scored]:
        """Yield one Scored per request as responses arrive, from the server's prompt log-probs."""
        yield from self._stream(requests, self._score)

    def _stream(self, requests: Iterable[Any], handle: Any) -> Iterator[Any]:
        results: queue.Queue = queue.Queue()
        state: dict[str, Any] = {}
        thread = threading.Thread(target=self._run_loop, args=(iter(requests), results, state, handle), daemon=True)
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

    def _run_loop(self, requests: Iterator[Any], results: queue.Queue, state: dict[str, Any], handle: Any) -> None:
        async def main() -> None:
            state["loop"] = asyncio.get_running_loop()
            state["task"] = asyncio.current_task()
            await self._run_all(requests, results, handle)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass
        except BaseException as error:  # surfaced in the caller's thread
            results.put(error)
        results.put(_DONE)

    async def _run_all(self, requests: Iterator[Any], results: queue.Queue, handle: Any) -> None:
        import httpx

        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers()) as client:

            async def worker() -> None:
                # Workers share one iterator: each takes the next request when its last is done,
                # so exactly `max_in_flight` requests are open while work remains.
                for request in requests:
                    results.put(await handle(client, request))

            workers = [asyncio.create_task(worker()) for _ in range(self.max_in_flight)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()

    async def _complete(self, client: Any, request: Request) -> Completion:
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
        k = request.sampling.top_logprobs
        if k > 0:  # see the module docstring for k + 1 on chat
            body.update({"logprobs": True, "top_logprobs": k + 1} if chat else {"logprobs": k})
            body["return_tokens_as_token_ids"] = True
        try:
            result, error = await self._post(client, url, body, lambda data: _parse(request.key, data, chat, k))
        except _ServerLacks as lack:
            raise DistillError(f"the server at {self.base_url} (version {self.version}) {lack}; ask for top_logprobs from vLLM's server (`vllm serve`) or --engine vllm or hf") from None
        if error is not None:
            return Completion(request.key, "", "error", 0, 0, info={"error": error})
        return result

    async def _score(self, client: Any, request: ScoreRequest) -> Scored:
        if not request.prompt_ids:
            raise DistillError(f"score request '{request.key}': empty prompt_ids; the first completion token needs at least one token before it")
        url = f"{self.base_url}/completions"
        ids = [int(t) for t in request.prompt_ids] + [int(t) for t in request.completion_ids]
        body = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "n": 1, "prompt_logprobs": 0, **self.extra_body}
        try:
            result, error = await self._post(client, url, body, lambda data: _prompt_logprobs(request.key, data, ids, len(request.prompt_ids)))
        except _ServerLacks as lack:
            raise DistillError(f"the server at {self.base_url} (version {self.version}) {lack}; score with vLLM's server (`vllm serve`) or --engine vllm or hf") from None
        if error is not None:  # no Scored can stand for a failed one: the caller needs every score
            raise DistillError(f"score request '{request.key}': {url} {error}")
        return result

    async def _post(self, client: Any, url: str, body: dict[str, Any], parse: Any) -> tuple[Any, str | None]:
        """(parse(the answer's JSON), None), or (None, why) when the request failed for good: a 4xx
        other than those that stop the run, or no usable answer after `max_retries` retries."""
        import httpx

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
                        return parse(response.json()), None
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
                    return None, f"HTTP {status}: {_error_text(response)}"
            if attempt == self.max_retries:
                break
            self.retries += 1
            ceiling = min(self.backoff_max_s, self.backoff_s * 2**attempt)
            delay = random.uniform(0, ceiling)  # full jitter: clients that failed together spread out
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max_s))
            await asyncio.sleep(delay)
        return None, f"gave up after {self.max_retries + 1} attempts: {last_error}"


# --------------------------------------------------------------------------------------------
# helpers


def fold_reasoning(reasoning: str | None, content: str | None) -> str:
    """One assistant text from a server that split the reasoning out, in R1's layout."""
    content = content or ""
    if not reasoning:
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


class _ServerLacks(Exception):
    """The server answered without what was asked for (a feature it lacks, not a bad answer to retry)."""


def _prompt_logprobs(key: str, data: dict[str, Any], ids: list[int], start: int) -> Scored:
    # vLLM: choices[0].prompt_logprobs = [None, {"<id>": {"logprob": ..., "rank": ...}}, ...],
    # one per prompt token; with prompt_logprobs 0 each holds the actual token only.
    positions = data["choices"][0].get("prompt_logprobs")
    if positions is None:
        raise _ServerLacks("returned no prompt log-probs (vLLM's `prompt_logprobs` on /completions), which scoring needs")
    return Scored(key=key, logprobs=[float(positions[i][str(ids[i])]["logprob"]) for i in range(start, len(ids))])


def _parse(key: str, data: dict[str, Any], chat: bool, top_logprobs: int = 0) -> Completion:
    choice = data["choices"][0]
    if chat:
        message = choice["message"]
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        text = fold_reasoning(reasoning, message.get("content"))
    else:
        text = choice["text"] or ""
    usage = data.get("usage") or {}
    token_ids, tops = _token_logprobs(choice.get("logprobs"), chat, top_logprobs) if top_logprobs > 0 else (None, None)
    return Completion(
        key=key,
        text=text,
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        token_ids=token_ids,
        top_logprobs=tops,
    )


def _token_logprobs(logprobs: Any, chat: bool, k: int) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
    """The generated ids and each position's k most likely (ids, log-probs) from an answer's
    `logprobs` with tokens as "token_id:N". Chat: content = [{token, logprob, top_logprobs:
    [{token, logprob}]}]; completions: tokens = ["token_id:N"], top_logprobs = [{"token_id:N": lp}]."""
    if not logprobs:
        raise _ServerLacks("returned no token log-probs (`logprobs`), which top_logprobs needs")
    if chat:
        content = logprobs["content"]
        ids = [_token_id(entry["token"]) for entry in content]
        candidates = [[(float(t["logprob"]), _token_id(t["token"])) for t in entry["top_logprobs"]] for entry in content]
    else:
        ids = [_token_id(token) for token in logprobs["tokens"]]
        candidates = [[(float(v), _token_id(t)) for t, v in (entry or {}).items()] for entry in logprobs["top_logprobs"]]
    tops = []
    for position in candidates:
        best = sorted(set(position), reverse=True)[:k]  # most likely first; the extra one dropped
        tops.append(([token for _, token in best], [value for value, _ in best]))
    return ids, tops


def _token_id(token: str) -> int:
    """123 from vLLM's "token_id:123" (return_tokens_as_token_ids)."""
    if not token.startswith("token_id:"):
        raise _ServerLacks(f"returned token {token!r}, not 'token_id:N' (vLLM's return_tokens_as_token_ids), so its ids are unknown")
    return int(token[len("token_id:"):])


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
