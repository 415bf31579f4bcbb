"""The device runtime as a library: `DeviceRuntime`.

    from device_runtime import DeviceRuntime

    with DeviceRuntime("draft.gguf", "ws://edge:8765") as rt:
        out = rt.generate(messages=[{"role": "user", "content": "Why is the sky blue?"}],
                          temperature=0, max_tokens=64)
        print(out.text, out.stats.tokens_per_s)
        for piece in rt.stream("The three primary colors are", max_tokens=32):
            print(piece.text, end="", flush=True)

Every llama.cpp call and every edge connection lives on one private event loop in a
background thread (the *engine*). The sync methods block on it; the async methods
(`agenerate`, `astream`) await it from any other event loop without blocking that loop.
A drafter is one llama.cpp context and can run one generation at a time: the runtime
keeps `parallel` slots (drafter + edge connection each, one edge session per slot) and
queues requests FIFO for a free slot. Requests never share a slot.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from device_runtime.drafter import LlamaDrafter
from device_runtime import defaults
from device_runtime.session import DeviceClient, FailoverPolicy, GenerationConfig, GenerationStats
from device_runtime.transport import parse_edge_urls
from dssd_common.loop_thread import LoopThread
from protocol.affinity import check_key, new_key
from protocol.downlink import DOWNLINKS
from protocol.constraints import ConstraintError, GrammarSpec
from protocol.logprobs import MAX_TOP_LOGPROBS, OFF as LOGPROBS_OFF
from protocol.modes import MODES
from protocol.sampling import SamplingParams, choice_seed
from protocol.wire import MAX_SEED

try:  # a dropped connection surfaces from websockets' send() as ConnectionClosed
    from websockets.exceptions import ConnectionClosed as _WsClosed
except ImportError:  # pragma: no cover
    _WsClosed = ConnectionError  # type: ignore[misc,assignment]

__all__ = [
    "DeviceRuntime",
    "Completion",
    "Piece",
    "TokenLogprob",
    "TokenStream",
    "AsyncTokenStream",
    "RequestError",
    "ContextLengthError",
    "RuntimeBusy",
    "EdgeUnavailable",
]


# -- errors ----------------------------------------------------------------------------


class RequestError(ValueError):
    """The runtime refuses this request before generating anything (HTTP 400 in the server).

    `param` names the offending argument (OpenAI's `param`), `code` a machine-readable code.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthError(RequestError):
    """Prompt (+ max_tokens) does not fit the draft's or the edge's context."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class RuntimeBusy(RuntimeError):
    """Too many requests are queued already (HTTP 429 in the server)."""


class EdgeUnavailable(ConnectionError):
    """The edge cannot be reached (HTTP 503 in the server)."""


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of one emitted token (raw log-softmax of its logits,
    before temperature / top-k / top-p; see protocol.logprobs), with the top alternatives
    asked for, as (id, token bytes, logprob), best first."""

    id: int
    token: bytes
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """Tokens committed in one step and the text they add (may be "" mid-character)."""

    text: str
    ids: list[int]
    verified: bool = True  # False: produced by the draft alone while the edge was lost
    #: with `logprobs=`: one entry per id (None where the target's is unknown: fallback)
    logprobs: list[TokenLogprob | None] | None = None
    index: int = 0  # the choice (0..n-1) these tokens belong to


@dataclass
class Completion:
    """One finished generation."""

    text: str
    ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    prompt_tokens: int
    stats: GenerationStats
    seed: int
    gamma: int | None  # None: adaptive ("auto")
    mode: str
    queue_s: float = 0.0  # time spent waiting for a free slot
    target_model: str = ""  # the edge's model name ("" in device-only mode)
    #: per token: verified by the target (False only for fallback tokens; see `fallback`)
    verified: list[bool] = field(default_factory=list)
    #: with `logprobs=`: the target's logprob of each token (None where unknown)
    logprobs: list[TokenLogprob | None] | None = None
    index: int = 0  # the choice (0..n-1); a request with n > 1 has one Completion per choice

    @property
    def exact(self) -> bool:
        """True when every token was verified by the target (no fallback)."""
        return all(self.verified)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def stats_dict(self) -> dict[str, Any]:
        """The speculative stats as a JSON-able dict (the server's `dssd` extension object)."""
        d = self.stats.as_dict()
        d.update(
            mode=self.mode,
            seed=self.seed,
            gamma="auto" if self.gamma is None else self.gamma,
            finish_reason=self.finish_reason,
            queue_s=round(self.queue_s, 6),
            target_model=self.target_model,
            exact=self.exact,
        )
        if not self.exact:
            d["verified"] = list(self.verified)
        for k in ("wall_s", "ttft_s"):
            if isinstance(d.get(k), float):
                d[k] = round(d[k], 6)
        return d


@dataclass(frozen=True)
class _Spec:
    """A validated request, ready for the engine."""

    prompt: Any  # str | list[int] | None
    messages: list[dict[str, str]] | None
    add_bos: bool
    max_tokens: int | None
    sampling: SamplingParams
    seed: int
    stop: tuple[str, ...]
    mode: str
    gamma: int | None  # None: adaptive
    downlink: str
    logprobs: int = LOGPROBS_OFF
    n: int = 1
    grammar: GrammarSpec | None = None
    t_submit: float = field(default_factory=time.perf_counter)


# -- validation (shared with the HTTP server) ------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def normalize_messages(messages: object) -> list[dict[str, str]]:
    """Chat messages as {"role", "content"} string dicts; OpenAI text content parts are joined."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of message objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"{where}.role must be a non-empty string", param=f"{where}.role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        content = m.get("content")
        calls = m.get("tool_calls")
        if role == "assistant" and not content and isinstance(calls, list) and calls:
            content = _calls_text(calls, where)  # the model's own call, as it wrote it
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(
                        f"{where}.content[{j}]: only text content parts are supported",
                        param=f"{where}.content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or an array of text parts",
                               param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _calls_text(calls: list, where: str) -> str:
    """An assistant message's tool calls as the JSON text a constrained call is written in
    (device_runtime.grammar): {"name": ..., "arguments": {...}}, one per line."""
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        try:
            out.append(json.dumps({"name": fn["name"], "arguments": json.loads(fn.get("arguments") or "{}")}))
        except (TypeError, KeyError, ValueError):
            raise RequestError(f"{where}.tool_calls: each needs a function name and JSON arguments",
                               param=f"{where}.tool_calls") from None
    return "\n".join(out)


def _check_options(
    *, max_tokens: object, temperature: object, top_k: object, top_p: object, seed: object,
    stop: object, mode: object, gamma: object, downlink: object, max_gamma: int,
    logprobs: object = None, n: object = 1,
) -> tuple[SamplingParams, int, tuple[str, ...]]:
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise RequestError("max_tokens must be an integer >= 1", param="max_tokens")
    if not _is_number(temperature) or not (0.0 <= float(temperature) < float("inf")):
        raise RequestError("temperature must be a finite number >= 0 (0 = greedy)", param="temperature")
    if not _is_int(top_k) or top_k < 0:
        raise RequestError("top_k must be an integer >= 0 (0 disables it)", param="top_k")
    if not _is_number(top_p) or not (0.0 < float(top_p) <= 1.0):
        raise RequestError("top_p must be a number in (0, 1]", param="top_p")
    if seed is None:
        seed = secrets.randbits(63)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be an integer in [0, {MAX_SEED}]", param="seed")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or an array of non-empty strings", param="stop")
    if len(stop) > 16:
        raise RequestError("at most 16 stop strings", param="stop")
    if not isinstance(mode, str) or mode not in MODES:
        raise RequestError(f"mode must be one of {', '.join(MODES)}", param="mode")
    if gamma is not None and gamma != "auto" and (not _is_int(gamma) or not 0 <= gamma <= max_gamma):
        raise RequestError(f"gamma must be 'auto' or an integer in [0, {max_gamma}]", param="gamma")
    if not isinstance(downlink, str) or downlink not in DOWNLINKS:
        raise RequestError(f"downlink must be one of {', '.join(DOWNLINKS)}", param="downlink")
    if logprobs is not None:
        if not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be None or the alternatives per token, 0..{MAX_TOP_LOGPROBS}",
                               param="logprobs")
        if mode == "device-only":
            raise RequestError("logprobs are the target's, and device-only mode has no target", param="logprobs")
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"n must be an integer in [1, {MAX_CHOICES}]", param="n")
    sampling = SamplingParams(float(temperature), int(top_k), float(top_p))
    return sampling, int(seed), tuple(stop)


#: Most choices per request (`n`): they run one after another in one slot.
MAX_CHOICES = 16


# -- the runtime -----------------------------------------------------------------------


class _Slot:
    def __init__(self, drafter: LlamaDrafter, edge_url: str | None, name: str, auth_token: str,
                 ssl_context: "ssl.SSLContext | None", **client: Any) -> None:
        self.drafter = drafter
        self.client = DeviceClient(drafter, edge_url, client_name=name, auth_token=auth_token,
                                   ssl_context=ssl_context, **client)

    async def reset(self) -> None:
        """Drop the edge connection (after an error or a cancel mid-request); reopened lazily."""
        try:
            await asyncio.wait_for(self.client.close(), timeout=10)
        except BaseException:  # noqa: BLE001  (a dead link is what we are discarding)
            self.client._link = None


Sink = Callable[[tuple], None]


class DeviceRuntime:
    """A draft model plus an edge connection, usable from sync and async Python code.

    model_path: the draft GGUF. edge_url: ws://HOST:PORT, or None for device-only use.
    parallel: number of slots (each loads its own llama.cpp context); requests beyond
    that wait FIFO, at most `max_queue` of them. n_ctx, n_threads, max_gamma,
    f32_kv_cache and n_gpu_layers go to `LlamaDrafter`. `drafters=` passes ready drafters instead of a path
    (they are not closed by the runtime). `auth_token` is presented to the edge in the
    Hello; a wss:// edge is verified against `ca_file` (PEM) or `ssl_context` (default:
    the system's CAs). Several edge URLs (a sequence, or comma-separated) are replicas
    to move to when one is lost, busy or draining (`failover`); `session_key` is the
    affinity key a load balancer hashes on, one per runtime (default: random).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        edge_url: str | Sequence[str] | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        max_gamma: int = 16,
        parallel: int = 1,
        f32_kv_cache: bool = False,
        max_queue: int = 64,
        client_name: str = "dssd-device-api",
        drafters: Sequence[LlamaDrafter] | None = None,
        model_name: str | None = None,
        fallback: bool = False,
        n_gpu_layers: int = 0,
        auth_token: str = "",
        ca_file: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        session_key: str | None = None,
        failover: FailoverPolicy = FailoverPolicy(),
    ) -> None:
        if ca_file is not None and ssl_context is not None:
            raise ValueError("pass ca_file or ssl_context, not both")
        self.session_key = check_key(session_key) if session_key else new_key()  # one per device: all slots
        if ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=str(ca_file))
        #: Keep generating with the draft alone when the edge is lost (pieces flagged
        #: verified=False); off by default so an API answer is always the target's.
        self.fallback = fallback
        if drafters:
            self._drafters = list(drafters)
            self._own_drafters = False
        else:
            if model_path is None:
                raise ValueError("pass model_path (a draft GGUF) or drafters=")
            if parallel < 1:
                raise ValueError("parallel must be >= 1")
            self._drafters = []
            try:
                for _ in range(parallel):
                    self._drafters.append(LlamaDrafter(model_path, n_ctx=n_ctx, n_threads=n_threads,
                                                       max_gamma=max_gamma, f32_kv_cache=f32_kv_cache,
                                                       n_gpu_layers=n_gpu_layers))
            except BaseException:
                for d in self._drafters:
                    d.close()
                raise
            self._own_drafters = True
        first = self._drafters[0]
        self.edge_url = ",".join(parse_edge_urls(edge_url)) or None
        self.model_path = Path(first.path)
        self.model_name = model_name or self.model_path.stem
        self.n_ctx = min(d.n_ctx for d in self._drafters)
        self.n_vocab = first.n_vocab
        #: real tokens (protocol.vocab): ids from here on are padding rows no tokenizer produces
        self.n_real_tokens = first.n_real_tokens
        # the drafter's buffers hold max_gamma + 1 rows; draft() accepts gamma up to that
        self.max_gamma = min(d.max_gamma for d in self._drafters)
        self.max_queue = max_queue
        self._slots = [_Slot(d, self.edge_url, client_name, auth_token, ssl_context, session_key=self.session_key,
                             failover=failover) for d in self._drafters]
        self._pending: set[concurrent.futures.Future] = set()
        self._running = 0
        self._counters = dict.fromkeys((
            "requests_ok", "requests_failed", "requests_cancelled", "prompt_tokens", "generation_tokens",
            "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
            "bytes_up", "bytes_down"), 0)
        self._lock = threading.Lock()
        self._closed = False
        self._engine = LoopThread("dssd-engine")
        self._engine.start()
        self._free: asyncio.Queue[_Slot] = self._call(self._make_queue())

    async def _make_queue(self) -> "asyncio.Queue[_Slot]":
        q: asyncio.Queue[_Slot] = asyncio.Queue()
        for s in self._slots:
            q.put_nowait(s)
        return q

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> "DeviceRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "DeviceRuntime":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """Cancel running and queued requests, close the edge connections and the drafters."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        for f in pending:
            f.cancel()
        try:
            self._call(self._shutdown(), timeout=30)
        except Exception:  # noqa: BLE001
            pass
        self._engine.stop(timeout=30)
        if self._own_drafters:
            for d in self._drafters:
                d.close()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._slots:
            await s.reset()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the engine loop and wait for it (not from the engine thread)."""
        if self._engine.in_loop_thread():
            coro.close()
            raise RuntimeError("DeviceRuntime's blocking methods cannot be called from its own callbacks")
        return self._engine.run(coro, timeout)

    # -- helpers ------------------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        """Counters since start (vLLM's spec_decode_* names where they exist), plus load gauges."""
        with self._lock:
            m = dict(self._counters)
            m["requests_running"] = self._running
            m["requests_queued"] = len(self._pending) - self._running
        return m

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._counters[k] += v

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._call(self._on_engine(lambda: self._drafters[0].tokenize(text, add_bos=add_bos)))

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text the GGUF's chat template makes of `messages`."""
        msgs = normalize_messages(messages)
        return self._call(self._on_engine(lambda: self._chat_prompt(msgs)))

    @staticmethod
    async def _on_engine(fn: Callable[[], Any]) -> Any:
        return fn()

    def _chat_prompt(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._drafters[0].chat_prompt(messages)
        except ValueError as exc:  # no template, or the template's raise_exception()
            raise RequestError(str(exc), param="messages") from None
        except Exception as exc:  # jinja2 errors: a message list the template cannot render
            raise RequestError(f"the chat template cannot format these messages: {exc}",
                               param="messages") from None

    # -- requests -----------------------------------------------------------------------

    def _spec(
        self, prompt: Any, messages: Any, *, add_bos: bool, max_tokens: object, temperature: object,
        top_k: object, top_p: object, seed: object, stop: object, mode: object, gamma: object,
        downlink: object, logprobs: object = None, n: object = 1, grammar: GrammarSpec | None = None,
    ) -> _Spec:
        if (prompt is None) == (messages is None):
            raise RequestError("pass exactly one of prompt and messages", param="prompt")
        if prompt is not None:
            if isinstance(prompt, (list, tuple)):
                if not prompt or not all(_is_int(t) for t in prompt):
                    raise RequestError("a token prompt must be a non-empty array of integers", param="prompt")
                if not all(0 <= t < self.n_real_tokens for t in prompt):
                    raise RequestError(f"prompt token ids must be in [0, {self.n_real_tokens})", param="prompt")
                prompt = [int(t) for t in prompt]
            elif not isinstance(prompt, str):
                raise RequestError("prompt must be a string or an array of token ids", param="prompt")
        msgs = normalize_messages(messages) if messages is not None else None
        sampling, seed_, stop_ = _check_options(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=stop, mode=mode, gamma=gamma, downlink=downlink, max_gamma=self.max_gamma,
            logprobs=logprobs, n=n,
        )
        if grammar is not None:
            try:
                grammar.check()
            except ConstraintError as exc:
                raise RequestError(str(exc), param="grammar") from None
        if mode != "device-only" and not self.edge_url:
            raise RequestError(f"mode {mode!r} needs an edge and this runtime has none; use device-only",
                               param="mode")
        return _Spec(prompt, msgs, bool(add_bos), max_tokens, sampling, seed_, stop_, mode,  # type: ignore[arg-type]
                     defaults.parse_gamma(gamma), downlink,  # type: ignore[arg-type]
                     LOGPROBS_OFF if logprobs is None else int(logprobs), int(n), grammar)  # type: ignore[arg-type]

    def _submit(self, spec: _Spec, sink: Sink) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("this DeviceRuntime is closed")
            if len(self._pending) >= len(self._slots) + self.max_queue:
                raise RuntimeBusy(f"{len(self._pending)} requests are running or queued; try again later")
            fut = self._engine.submit(self._execute(spec, sink))
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _prompt_ids(self, spec: _Spec) -> tuple[list[int], str]:
        param = "prompt" if spec.messages is None else "messages"
        if spec.messages is not None:
            ids = self._drafters[0].tokenize(self._chat_prompt(spec.messages), add_bos=False)
        elif isinstance(spec.prompt, str):
            ids = self._drafters[0].tokenize(spec.prompt, add_bos=spec.add_bos)
        else:
            ids = list(spec.prompt)
        if not ids:
            raise RequestError("the prompt is empty", param=param)
        return ids, param

    @staticmethod
    def _fit(n_prompt: int, max_tokens: int | None, n_ctx: int, cap: int | None, who: str, param: str) -> int:
        """max_new_tokens for this request, or ContextLengthError/RequestError."""
        if n_prompt + 1 > n_ctx:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens; the {who} context is {n_ctx} tokens "
                f"(room for at least one new token is needed)", param=param)
        room = n_ctx - n_prompt
        if max_tokens is None:
            return min(room, cap) if cap else room
        if max_tokens > room:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the {who} "
                f"context of {n_ctx} tokens", param=param)
        if cap and max_tokens > cap:
            raise RequestError(f"max_tokens must be at most {cap} (the edge's limit)", param="max_tokens")
        return max_tokens

    async def _execute(self, spec: _Spec, sink: Sink) -> None:
        """Engine side of one request: validate, wait for a slot, generate, report to `sink`."""
        try:
            prompt_ids, param = self._prompt_ids(spec)
            max_new = self._fit(len(prompt_ids), spec.max_tokens, self.n_ctx, None, "draft model's", param)
            slot = await self._free.get()
            with self._lock:
                self._running += 1
            try:
                queue_s = time.perf_counter() - spec.t_submit
                target = ""
                if spec.mode != "device-only":
                    try:
                        link = await slot.client.connect(retry=True)
                    except (OSError, ConnectionError, _WsClosed, asyncio.TimeoutError) as exc:
                        await slot.reset()
                        raise EdgeUnavailable(f"cannot reach the edge at {self.edge_url}: {exc}") from None
                    w = link.welcome
                    target = w.model
                    max_new = self._fit(len(prompt_ids), spec.max_tokens, min(self.n_ctx, w.max_context),
                                        w.max_new_tokens, "edge's" if w.max_context < self.n_ctx else
                                        "draft model's", param)
                sink(("started", {"prompt_tokens": len(prompt_ids), "max_tokens": max_new,
                                  "queue_s": queue_s}))
                # n choices one after another in this slot: the drafter's KV cache and the edge
                # session's keep the prompt, so only the first choice pays for its prefill
                done = []
                for index in range(spec.n):
                    config = GenerationConfig(mode=spec.mode, max_new_tokens=max_new, sampling=spec.sampling,
                                              gamma=spec.gamma, seed=choice_seed(spec.seed, index),
                                              stop=spec.stop, downlink=spec.downlink, fallback=self.fallback,
                                              logprobs=spec.logprobs, grammar=spec.grammar)
                    done.append(await self._choice(slot, spec, config, prompt_ids, index, queue_s, target, sink))
                sink(("done", done))
            finally:
                with self._lock:
                    self._running -= 1
                self._free.put_nowait(slot)
        except asyncio.CancelledError:
            self._count(requests_cancelled=1)
            sink(("error", RuntimeError("the request was cancelled (stream cancelled or runtime closed)")))
            raise
        except BaseException as exc:  # noqa: BLE001  (reported to the caller through the sink)
            self._count(requests_failed=1)
            sink(("error", exc))

    async def _choice(self, slot: _Slot, spec: _Spec, config: GenerationConfig, prompt_ids: list[int],
                      index: int, queue_s: float, target: str, sink: Sink) -> Completion:
        """One choice of a request on its slot: generate, stream its pieces, count it."""
        emitted = False
        detok = slot.drafter.detokenize

        def entry(tok: int, e: Any) -> TokenLogprob | None:
            if e is None:
                return None
            lp, top = e
            return TokenLogprob(tok, detok([tok]), lp, [(i, detok([i]), v) for i, v in top])

        def on_tokens(ids: list[int], text: str, verified: bool, lps: list | None = None) -> None:
            nonlocal emitted
            emitted = True
            ids = [int(t) for t in ids]
            sink(("piece", Piece(text, ids, verified, None if lps is None else
                                 [entry(t, e) for t, e in zip(ids, lps)], index)))

        for attempt in (0, 1):
            try:
                result = await slot.client.generate(prompt_ids, config, on_tokens)
                break
            except BaseException as exc:
                # the edge session is mid-request (or dead): never reuse it
                await slot.reset()
                stale = isinstance(exc, (ConnectionError, _WsClosed)) and not isinstance(exc, EdgeUnavailable)
                if emitted or attempt or not stale or spec.mode == "device-only":
                    if stale:
                        raise EdgeUnavailable(f"lost the edge connection: {exc}") from None
                    raise
                # a connection that died while idle: retry once on a fresh one
        r = result.stats.rounds
        self._count(requests_ok=int(index == 0), prompt_tokens=len(prompt_ids) if index == 0 else 0,
                    generation_tokens=len(result.ids),
                    spec_decode_num_drafts=r.rounds, spec_decode_num_draft_tokens=r.draft_tokens,
                    spec_decode_num_accepted_tokens=r.accepted_tokens,
                    bytes_up=result.stats.bytes_up, bytes_down=result.stats.bytes_down)
        lps = None if result.logprobs is None else [entry(t, e) for t, e in zip(result.ids, result.logprobs)]
        return Completion(
            text=result.text, ids=list(result.ids), finish_reason=result.finish_reason,
            prompt_tokens=len(prompt_ids), stats=result.stats, seed=config.seed,
            gamma=spec.gamma, mode=spec.mode, queue_s=queue_s, target_model=target,
            verified=list(result.verified), logprobs=lps, index=index,
        )

    # -- public generation API ----------------------------------------------------------

    def stream(
        self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
        max_tokens: int | None = defaults.MAX_NEW_TOKENS, temperature: float = defaults.TEMPERATURE,
        top_k: int = defaults.TOP_K, top_p: float = defaults.TOP_P,
        seed: int | None = None, stop: str | Sequence[str] | None = None, mode: str = defaults.MODE,
        gamma: int | str | None = "auto", downlink: str = defaults.DOWNLINK, add_bos: bool = True,
        logprobs: int | None = None, n: int = 1, grammar: GrammarSpec | None = None,
    ) -> "TokenStream":
        """Start a generation; iterate the result for `Piece`s as tokens are committed.

        After iteration, `.result` holds the `Completion` (`.results`: one per choice, for
        n > 1; each `Piece.index` says its choice). `logprobs=k` (0..20) attaches the
        target's logprob of each token and its k best alternatives to pieces and results.
        `grammar=` (a `protocol.constraints.GrammarSpec`, e.g. `json_schema_spec(schema, 0)`)
        constrains the output exactly (both sides mask with it).
        Leaving the loop early (or `.cancel()`) stops the generation.
        """
        spec = self._spec(prompt, messages, add_bos=add_bos, max_tokens=max_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop=stop, mode=mode, gamma=gamma,
                          downlink=downlink, logprobs=logprobs, n=n, grammar=grammar)
        q: queue.Queue = queue.Queue()
        return TokenStream(self._submit(spec, q.put), q, self._engine.thread)

    def generate(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> Completion:
        """Generate to the end; same arguments as `stream`. Returns a `Completion`."""
        s = self.stream(prompt, **kwargs)
        for _ in s:
            pass
        assert s.result is not None
        return s.result

    def astream(
        self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
        max_tokens: int | None = defaults.MAX_NEW_TOKENS, temperature: float = defaults.TEMPERATURE,
        top_k: int = defaults.TOP_K, top_p: float = defaults.TOP_P,
        seed: int | None = None, stop: str | Sequence[str] | None = None, mode: str = defaults.MODE,
        gamma: int | str | None = "auto", downlink: str = defaults.DOWNLINK, add_bos: bool = True,
        logprobs: int | None = None, n: int = 1, grammar: GrammarSpec | None = None,
    ) -> "AsyncTokenStream":
        """Async `stream`: `async for piece in rt.astream(...)`. Call from a running loop."""
        spec = self._spec(prompt, messages, add_bos=add_bos, max_tokens=max_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop=stop, mode=mode, gamma=gamma,
                          downlink=downlink, logprobs=logprobs, n=n, grammar=grammar)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev: tuple) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the consumer's loop is gone
                pass

        return AsyncTokenStream(self._submit(spec, sink), q)

    async def agenerate(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> Completion:
        """Async `generate`."""
        s = self.astream(prompt, **kwargs)
        async for _ in s:
            pass
        assert s.result is not None
        return s.result


class _StreamEvents:
    """What both streams do with the engine's events, so the sync and async ones agree.

    The engine reports ("started", info), ("piece", Piece), ("done", Completion) or
    ("error", exception) through a queue; only how the queue is read differs.
    """

    def __init__(self, fut: concurrent.futures.Future) -> None:
        self._fut = fut
        self.result: Completion | None = None
        self.results: list[Completion] = []  # one per choice (n)
        self.info: dict[str, Any] | None = None
        self._finished = False

    def _handle(self, event: tuple) -> Piece | None:
        """Apply one event: the piece to hand out, else None; a request's error is raised."""
        kind, payload = event
        if kind == "started":
            self.info = payload
        elif kind == "piece":
            return payload
        elif kind == "done":
            self.results, self._finished = payload, True
            self.result = payload[0]
        else:
            self._finished = True
            raise payload
        return None

    def cancel(self) -> None:
        self._finished = True
        self._fut.cancel()


class TokenStream(_StreamEvents):
    """Iterator of `Piece`s for one request; `.result` is the `Completion` once finished."""

    def __init__(self, fut: concurrent.futures.Future, q: "queue.Queue[tuple]", engine: threading.Thread) -> None:
        super().__init__(fut)
        self._q = q
        self._engine = engine
        self.info = {}  # never None for the sync stream: it has no started() to wait on

    def __iter__(self) -> Iterator[Piece]:
        if threading.current_thread() is self._engine:
            raise RuntimeError("cannot iterate a TokenStream from the runtime's own callbacks")
        try:
            while not self._finished:
                piece = self._handle(self._q.get())
                if piece is not None:
                    yield piece
        finally:
            if not self._finished:
                self.cancel()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.cancel()


class AsyncTokenStream(_StreamEvents):
    """Async iterator of `Piece`s; `await started()` waits for a slot and raises request errors."""

    def __init__(self, fut: concurrent.futures.Future, q: "asyncio.Queue[tuple]") -> None:
        super().__init__(fut)
        self._q = q
        self._buffer: list[Piece] = []

    async def _next(self) -> tuple:
        try:
            return await self._q.get()
        except BaseException:
            self.cancel()
            raise

    async def started(self) -> dict[str, Any]:
        """Wait until the request holds a slot and its limits are checked; raise its error if any.

        Returns {"prompt_tokens", "max_tokens", "queue_s"}.
        """
        while self.info is None:
            if self._finished:
                raise RuntimeError("the stream has finished")
            piece = self._handle(await self._next())
            if piece is not None:
                self._buffer.append(piece)
        return self.info

    async def __aiter__(self) -> AsyncIterator[Piece]:
        try:
            while self._buffer:
                yield self._buffer.pop(0)
            while not self._finished:
                piece = self._handle(await self._next())
                if piece is not None:
                    yield piece
        finally:
            if not self._finished:
                self.cancel()

    async def aclose(self) -> None:
        if not self._finished:
            self.cancel()

    async def __aenter__(self) -> "AsyncTokenStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
