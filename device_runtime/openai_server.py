"""An OpenAI-compatible HTTP server over a `DeviceRuntime` (aiohttp).

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (both with `"stream": true` as server-sent events), GET /health.
Extensions in the request: `mode`, `gamma`, `top_k`, `downlink`; in the response: a `dssd`
object with the speculative stats (see docs/device-api.md). Every error is a JSON body
{"error": {"message", "type", "param", "code"}} with a 4xx status for bad requests.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

from aiohttp import web

from device_runtime import defaults
from device_runtime.api import (
    MAX_CHOICES,
    AsyncTokenStream,
    Completion,
    DeviceRuntime,
    EdgeUnavailable,
    Piece,
    RequestError,
    RuntimeBusy,
    TokenLogprob,
)
from device_runtime.grammar import GrammarRequestError, parse_tool_call, response_format_grammar, structured
from device_runtime.transport import EdgeError
from dssd_common.loop_thread import ServerThread
from protocol.logprobs import MAX_TOP_LOGPROBS
from protocol.wire import ErrorCode, WireError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: up to the context
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number", type(None): "null"}


class ApiError(Exception):
    """An error response in OpenAI's format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def _api_error(exc: BaseException) -> ApiError:
    """Map a runtime/edge exception to the HTTP error it means."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(400, exc.message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, RuntimeBusy):
        return ApiError(429, str(exc), type="server_busy", code="queue_full")
    if isinstance(exc, EdgeError):
        if exc.code in (ErrorCode.LIMIT, ErrorCode.UNSUPPORTED):
            return ApiError(400, f"the edge refused the request: {exc.reason}", code="edge_refused")
        if exc.code in (ErrorCode.BUSY, ErrorCode.SHUTDOWN):
            return ApiError(503, str(exc), type="service_unavailable", code="edge_busy")
        return ApiError(502, str(exc), type="edge_error", code=ErrorCode(exc.code).name.lower()
                        if exc.code in ErrorCode._value2member_map_ else "edge_error")
    if isinstance(exc, WireError):
        return ApiError(502, f"the edge sent an invalid frame: {exc}", type="edge_error", code="bad_frame")
    if isinstance(exc, (EdgeUnavailable, ConnectionError, OSError)):
        return ApiError(503, f"the edge is unavailable: {exc}", type="service_unavailable",
                        code="edge_unavailable")
    log.error("internal error", exc_info=exc)
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def _type_name(v: object) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


class _Body:
    """Typed access to the request's JSON object: wrong types are 400 `invalid_type`."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def get(self, key: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
        v = self.data.get(key)
        if v is None:
            return default
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if not ok:
            raise ApiError(400, f"invalid type for '{key}': expected {what}, got {_type_name(v)}",
                           param=key, code="invalid_type")
        return v

    def int(self, key: str, default: Any = None) -> Any:
        return self.get(key, (int,), "an integer", default)

    def number(self, key: str, default: Any = None) -> Any:
        return self.get(key, (int, float), "a number", default)

    def bool(self, key: str, default: bool = False) -> bool:
        return self.get(key, (bool,), "a boolean", default)

    def str(self, key: str, default: Any = None) -> Any:
        return self.get(key, (str,), "a string", default)

    def unsupported(self, key: str, allowed: tuple, why: str) -> None:
        v = self.data.get(key)
        if v is not None and v not in allowed:
            raise ApiError(400, f"'{key}' is not supported: {why}", param=key, code="unsupported_parameter")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class OpenAIServer:
    """The HTTP app. `start()` binds it (port 0: any free port) on the current event loop."""

    def __init__(self, runtime: DeviceRuntime, *, host: str = "127.0.0.1", port: int = 8080,
                 model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.runtime = runtime
        self.host, self.port = host, port
        self.model_name = model_name or runtime.model_name
        self._aliases = {self.model_name, runtime.model_name, runtime.model_path.name}
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None

    # -- app ----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> int:
        # handler_cancellation: a client that hangs up cancels its request (and frees the slot)
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:  # 404 route, 405 method, 413 body size: OpenAI format too
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            msg = exc.text if exc.status != 413 else f"request body over {self.max_body_bytes} bytes"
            return ApiError(exc.status, msg or exc.reason, code=code).response()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            return _api_error(exc).response()

    # -- simple endpoints ---------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        rt = self.runtime
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dssd",
                "dssd": {"draft_model": str(rt.model_path.name), "edge": rt.edge_url, "n_ctx": rt.n_ctx,
                         "max_gamma": rt.max_gamma}}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self._aliases:
            raise self._unknown_model(name)
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format: counters since start and the current load."""
        lines = []
        for k, v in self.runtime.metrics().items():
            if k.startswith("requests_") and k not in ("requests_running", "requests_queued"):
                name, label = "dssd_requests_total", f'{{outcome="{k[len("requests_"):]}"}}'
            elif k.startswith("spec_decode_"):
                name, label = f"dssd_{k}_total", ""
            elif k in ("requests_running", "requests_queued"):
                name, label = f"dssd_{k}", ""
            else:
                name, label = f"dssd_{k}_total", ""
            lines.append(f"{name}{label} {v}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                        param="model", code="model_not_found")

    # -- request parsing ----------------------------------------------------------------

    async def _body(self, request: web.Request) -> _Body:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large") from None
        try:
            data = json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_type_name(data)}",
                           code="invalid_json")
        body = _Body(data)
        model = body.str("model")
        if model is not None and model not in self._aliases:
            raise self._unknown_model(model)
        return body

    def _options(self, body: _Body, *, chat: bool) -> dict[str, Any]:
        """Sampling and DSSD options shared by both endpoints, as DeviceRuntime keywords."""
        n = body.int("n", 1)
        if not 1 <= n <= MAX_CHOICES:
            raise ApiError(400, f"n must be in [1, {MAX_CHOICES}]", param="n", code="invalid_value")
        for key in ("presence_penalty", "frequency_penalty"):
            if body.number(key, 0) != 0:
                raise ApiError(400, f"'{key}' is not supported (it would change the target's distribution)",
                               param=key, code="unsupported_parameter")
        if body.get("logit_bias", (dict,), "an object", {}):
            raise ApiError(400, "'logit_bias' is not supported", param="logit_bias", code="unsupported_parameter")
        logprobs = None
        grammar = None
        if chat:
            max_tokens = body.int("max_completion_tokens", None)
            if max_tokens is None:
                max_tokens = body.int("max_tokens", None)
            top = body.int("top_logprobs", None)
            if body.bool("logprobs", False):
                logprobs = 0 if top is None else top
            elif top is not None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                               code="invalid_value")
            if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs",
                               code="invalid_value")
            try:
                grammar = structured(body.get("response_format", (dict,), "an object"),
                                     body.get("tools", (list,), "an array"), body.data.get("tool_choice")).grammar
            except GrammarRequestError as exc:
                raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
        else:
            max_tokens = body.int("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
            logprobs = body.int("logprobs", None)
            if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs",
                               code="invalid_value")
            body.unsupported("echo", (False,), "echo is not implemented")
            body.unsupported("best_of", (1,), "only best_of=1")
            body.unsupported("suffix", ("",), "insertion is not implemented")
            try:  # an extension here (vLLM has it too): JSON output for plain completions
                grammar = response_format_grammar(body.get("response_format", (dict,), "an object"))
            except GrammarRequestError as exc:
                raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
        stop = body.get("stop", (str, list), "a string or an array of strings")
        body.str("user")
        return dict(
            max_tokens=max_tokens,
            temperature=body.number("temperature", 1.0),
            top_p=body.number("top_p", 1.0),
            top_k=body.int("top_k", 0),
            seed=body.int("seed", None),
            stop=stop,
            mode=body.str("mode", defaults.MODE),
            gamma=body.get("gamma", (int, str), "an integer or 'auto'", "auto"),
            downlink=body.str("downlink", defaults.DOWNLINK),
            logprobs=logprobs,
            n=n,
            grammar=grammar,
        )

    @staticmethod
    def _prompt(body: _Body) -> Any:
        p = body.data.get("prompt")
        if p is None:
            raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # ["text"] or [[ids]]: one prompt
        elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            raise ApiError(400, "only one prompt per request is supported", param="prompt",
                           code="unsupported_parameter")
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise ApiError(400, "'prompt' must be a string, an array with one string, or an array of token ids",
                       param="prompt", code="invalid_type")

    # -- generation endpoints -----------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = self._prompt(body)
        opts = self._options(body, chat=False)
        return await self._generate(request, body, prompt=prompt, messages=None, opts=opts, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if body.data.get("messages") is None:
            raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
        messages = body.get("messages", (list,), "an array")
        opts = self._options(body, chat=True)
        tools = body.data.get("tools") if body.data.get("tool_choice") != "none" else None
        if tools:
            messages = _with_tools_prompt(messages, tools)
        return await self._generate(request, body, prompt=None, messages=messages, opts=opts, chat=True,
                                    tools=bool(tools))

    async def _generate(self, request: web.Request, body: _Body, *, prompt: Any, messages: Any,
                        opts: dict[str, Any], chat: bool, tools: bool = False) -> web.StreamResponse:
        stream_ = body.bool("stream", False)
        so = body.get("stream_options", (dict,), "an object", {})
        include_usage = so.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "invalid type for 'stream_options.include_usage': expected a boolean",
                           param="stream_options", code="invalid_type")
        try:
            # string prompts get the model's BOS, as llama.cpp's server does; chat templates add their own
            s = self.runtime.astream(prompt, messages=messages, add_bos=True, **opts)
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None
        try:
            await s.started()  # request errors (context length, edge limits, no edge) are still 4xx here
        except asyncio.CancelledError:
            s.cancel()
            raise
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        pieces = s.__aiter__()
        try:
            if stream_:
                # hold the headers until the first tokens: an edge that refuses or is gone is still
                # an HTTP error status, not an in-band event
                try:
                    first = await pieces.__anext__()
                except StopAsyncIteration:
                    first = None
                return await self._sse(request, s, pieces, first, rid, created, chat, include_usage, tools)
            parts: dict[int, list[str]] = {}
            async for p in pieces:
                parts.setdefault(p.index, []).append(p.text)
        except asyncio.CancelledError:
            s.cancel()
            raise
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None
        finally:
            await s.aclose()
        results = s.results
        assert results
        choices = []
        for res in results:
            text = "".join(parts.get(res.index, []))
            lps = _logprobs_json(res.logprobs, chat)
            call = parse_tool_call(text) if tools else None
            if call is not None:
                choices.append({"index": res.index, "message": {"role": "assistant", "content": None,
                                                                "tool_calls": [call]},
                                "logprobs": lps, "finish_reason": "tool_calls"})
            elif chat:
                choices.append({"index": res.index, "message": {"role": "assistant", "content": text},
                                "logprobs": lps, "finish_reason": _finish(res)})
            else:
                choices.append({"index": res.index, "text": text, "logprobs": lps, "finish_reason": _finish(res)})
        return web.json_response({
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(results),
            "dssd": _dssd(results),
        })

    async def _sse(self, request: web.Request, s: AsyncTokenStream, pieces: AsyncIterator[Piece],
                   first: Piece | None, rid: str, created: int, chat: bool, include_usage: bool,
                   tools: bool = False) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: Any, finish: str | None, index: int = 0, logprobs: Any = None,
                  **extra: Any) -> dict[str, Any]:
            if chat:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": [choice], **extra}

        async def send(data: Any) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await resp.write(f"data: {payload}\n\n".encode())

        try:
            opened: set[int] = set()

            held: dict[int, list[str]] = {}  # with tools: a choice's text, until it is known to be a call

            async def send_piece(piece: Piece) -> None:
                if tools:
                    held.setdefault(piece.index, []).append(piece.text)
                    return
                if chat and piece.index not in opened:
                    opened.add(piece.index)
                    await send(chunk({"role": "assistant", "content": ""}, None, piece.index))
                # tokens with logprobs are sent even when they add no text yet (mid-character)
                if piece.text or (piece.logprobs and piece.ids):
                    extra = {} if piece.verified else {"dssd": {"verified": False}}
                    await send(chunk({"content": piece.text} if chat else piece.text, None, piece.index,
                                     _logprobs_json(piece.logprobs, chat), **extra))

            if chat and first is None:
                opened.add(0)
                await send(chunk({"role": "assistant", "content": ""}, None))
            if first is not None:
                await send_piece(first)
                async for piece in pieces:
                    await send_piece(piece)
            results = s.results
            assert results
            for res in results:
                if chat and res.index not in opened:
                    await send(chunk({"role": "assistant", "content": ""}, None, res.index))
                finish = _finish(res)
                if tools:
                    text = "".join(held.get(res.index, []))
                    call = parse_tool_call(text)
                    if call is not None:
                        finish = "tool_calls"
                        await send(chunk({"tool_calls": [{"index": 0, **call}]}, None, res.index))
                    elif text:
                        await send(chunk({"content": text}, None, res.index))
                await send(chunk({} if chat else "", finish, res.index, dssd=res.stats_dict()))
            if include_usage:
                await send({"id": rid, "object": obj, "created": created, "model": self.model_name,
                            "choices": [], "usage": _usage(results), "dssd": _dssd(results)})
            await send("[DONE]")
        except (ConnectionResetError, asyncio.CancelledError):
            s.cancel()  # the client went away: stop generating
            raise
        except Exception as exc:  # noqa: BLE001  (headers are out: report in-band, as OpenAI does)
            s.cancel()
            try:
                await send(_api_error(exc).body())
                await send("[DONE]")
            except (ConnectionResetError, RuntimeError):
                pass
        await resp.write_eof()
        return resp


def _with_tools_prompt(messages: Any, tools: Any) -> Any:
    """The messages with the tools described in the system message: how the model learns
    what it may call and how a call is written (the grammar then holds it to that form)."""
    if not isinstance(messages, list):
        return messages
    listing = json.dumps([t.get("function", t) for t in tools if isinstance(t, dict)])
    note = ("You can call these functions: " + listing + "\nTo call one, answer with only "
            '{"name": <function name>, "arguments": <its arguments as JSON>}.')
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer") \
            and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + note}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _finish(res: Completion) -> str:
    return "length" if res.finish_reason == "length" else "stop"  # eos and stop strings are "stop"


def _usage(results: list[Completion]) -> dict[str, Any]:
    """The prompt counts once (its prefill is shared by the choices); completions add up."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    accepted = sum(r.stats.rounds.accepted_tokens for r in results)
    drafted = sum(r.stats.rounds.draft_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's own speculative-decoding counters (Predicted Outputs), filled from our drafts
        "completion_tokens_details": {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        },
    }


def _dssd(results: list[Completion]) -> dict[str, Any]:
    """The first choice's stats; with n > 1 also every choice's, under "choices"."""
    d = results[0].stats_dict()
    if len(results) > 1:
        d["choices"] = [r.stats_dict() for r in results]
    return d


#: What OpenAI reports for a logprob of -inf (JSON has no infinity).
_NEG_INF_LOGPROB = -9999.0


def _lp_value(v: float) -> float:
    return v if v > _NEG_INF_LOGPROB else _NEG_INF_LOGPROB


def _token_str(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _logprobs_json(lps: list[TokenLogprob | None] | None, chat: bool) -> Any:
    """OpenAI's logprobs object: chat's {"content": [...]} or completions' parallel arrays.
    A token whose target logprob is unknown (fallback) gets null."""
    if lps is None:
        return None
    if chat:
        content = []
        for e in lps:
            if e is None:
                content.append(None)
                continue
            content.append({"token": _token_str(e.token), "logprob": _lp_value(e.logprob), "bytes": list(e.token),
                            "top_logprobs": [{"token": _token_str(b), "logprob": _lp_value(v), "bytes": list(b)}
                                             for _, b, v in e.top]})
        return {"content": content, "refusal": None}
    tokens, values, tops, offsets, at = [], [], [], [], 0
    for e in lps:
        text = "" if e is None else _token_str(e.token)
        tokens.append(text)
        values.append(None if e is None else _lp_value(e.logprob))
        tops.append(None if e is None else {_token_str(b): _lp_value(v) for _, b, v in e.top})
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# -- running it ------------------------------------------------------------------------


async def serve_forever(runtime: DeviceRuntime, *, host: str, port: int, model_name: str | None = None,
                        ready: Any = None) -> None:
    server = OpenAIServer(runtime, host=host, port=port, model_name=model_name)
    bound = await server.start()
    if ready is not None:
        ready(server, bound)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


class OpenAIServerThread(ServerThread[OpenAIServer]):
    """Runs an `OpenAIServer` on its own event loop in a background thread (tests, embedding).

    `base_url` (http://HOST:PORT/v1) is valid inside the `with` block.
    """

    def __init__(self, runtime: DeviceRuntime, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str | None = None) -> None:
        super().__init__(OpenAIServer(runtime, host=host, port=port, model_name=model_name), name="openai-server")

    @property
    def base_url(self) -> str:
        return "" if self.port is None else f"http://{self.server.host}:{self.port}/v1"
