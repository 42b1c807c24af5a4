"""Fake Anthropic / OpenAI-compatible / PostHog servers on 127.0.0.1 that speak the real wire protocols."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import re
import signal
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs

from aiohttp import web

__all__ = ["ToolCall", "Recorded", "FakeUpstream", "FakePostHog", "free_port"]


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # keys lower-cased so assertions don't depend on client casing
    body: dict | None


Responder = Callable[[str, dict], "str | ToolCall"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_WORD_RE = re.compile(r"\s*\S+")


def _pieces(text: str) -> list[str]:
    # Each piece keeps its leading whitespace, so "".join(pieces) == text and
    # truncation/streaming never alter the spacing the responder chose.
    pieces = _WORD_RE.findall(text)
    if pieces:
        tail = len(text) - len(text.rstrip())
        if tail:
            pieces[-1] += text[-tail:]
    return pieces


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _hex(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- token counting


def _block_text_words(block: Any) -> int:
    if isinstance(block, str):
        return _words(block)
    if not isinstance(block, dict):
        return 0
    t = block.get("type")
    if t == "text":
        return _words(block.get("text"))
    if t == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block_text_words(b) for b in content)
        return _words(content)
    if t == "tool_use":
        return _words(_dumps(block.get("input", {})))
    if t == "thinking":
        return _words(block.get("thinking"))
    return 0


def _anthropic_blocks(body: dict) -> list[tuple[str, Any]]:
    """System then message blocks, in the order Anthropic's prompt cache prefixes them."""
    out: list[tuple[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        out.append(("system", system))
    elif isinstance(system, list):
        out.extend(("system", b) for b in system)
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        role = msg.get("role", "")
        content = msg.get("content")
        if isinstance(content, list):
            out.extend((role, b) for b in content)
        else:
            out.append((role, content))
    return out


def _anthropic_input_tokens(body: dict) -> tuple[int, int, str | None]:
    """(total words, words up to the last cache_control block, cache key of that prefix)."""
    blocks = _anthropic_blocks(body)
    total = 0
    prefix_words = 0
    last_cc = -1
    for i, (_, block) in enumerate(blocks):
        total += _block_text_words(block)
        if isinstance(block, dict) and block.get("cache_control"):
            last_cc = i
            prefix_words = total
    if last_cc < 0:
        return total, 0, None
    key = json.dumps([body.get("model"), blocks[: last_cc + 1]], sort_keys=True)
    return total, prefix_words, key


def _openai_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _openai_input_tokens(body: dict) -> int:
    total = 0
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        total += _words(_openai_text(msg.get("content")))
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                total += _words(fn.get("arguments"))
    return total


def _last_user_text(fmt: str, body: dict) -> str:
    for msg in reversed(body.get("messages") or ()):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if fmt == "openai":
                return _openai_text(content)
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
            return ""
    return ""


def echo_responder(fmt: str, body: dict) -> str:
    return "echo: " + _last_user_text(fmt, body)


# ---------------------------------------------------------------- error bodies

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_ERROR_MESSAGES = {
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "The requested resource could not be found.",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of request tokens has exceeded your per-minute rate limit.",
    500: "Internal server error",
    503: "Service unavailable",
    504: "Request timed out",
    529: "Overloaded",
}
_OPENAI_ERRORS = {  # status -> (type, code, default message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(obj).encode(), status=status, content_type="application/json", headers=headers)


def _anthropic_error(status: int, message: str | None = None, *, err_type: str | None = None,
                     retry_after: float | None = None) -> web.Response:
    req_id = "req_" + _hex()
    if err_type is None:
        err_type = _ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    headers = {"request-id": req_id}
    if retry_after is not None:
        headers["retry-after"] = _fmt_num(retry_after)
    body = {"type": "error", "error": {"type": err_type, "message": message or _ANTHROPIC_ERROR_MESSAGES.get(status, "Error")},
            "request_id": req_id}
    return _json_response(body, status, headers)


def _openai_error(status: int, message: str | None = None, *, err_type: str | None = None, code: str | None = None,
                  param: str | None = None, retry_after: float | None = None) -> web.Response:
    d_type, d_code, d_msg = _OPENAI_ERRORS.get(status) or (
        ("server_error", None, "Server error") if status >= 500 else ("invalid_request_error", None, "Request error"))
    headers = {"x-request-id": "req_" + _hex(32)}
    if retry_after is not None:
        headers["retry-after"] = _fmt_num(retry_after)
    body = {"error": {"message": message or d_msg, "type": err_type or d_type, "param": param,
                      "code": code if code is not None else d_code}}
    return _json_response(body, status, headers)


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# ---------------------------------------------------------------- threaded aiohttp server


class _ThreadedServer:
    """An aiohttp app in a daemon thread with its own loop, so it coexists with TestClient/uvicorn threads."""

    _name = "fake-server"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def _make_app(self) -> web.Application:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self):
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        async def setup() -> None:
            # handler_cancellation: a client that gave up (timeout tests) cancels
            # its stalled handler instead of leaving it sleeping until shutdown.
            runner = web.AppRunner(self._make_app(), access_log=None, handler_cancellation=True,
                                   shutdown_timeout=0.25)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
            await site.start()
            self._runner = runner
            self._port = runner.addresses[0][1]

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # surface bind errors in the caller's thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    if self._runner is not None:
                        loop.run_until_complete(self._runner.cleanup())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name=f"{self._name}:{self._port}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self._runner = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------- failure injection


@dataclass
class _Rule:
    kind: str  # "fail" | "stall" | "drop" | "cut_body" | "garble" | "bad_event"
    times: int
    model: str | None
    status: int = 0
    retry_after: float | None = None
    message: str | None = None
    seconds: float = 0.0
    after_chunks: int = 1
    raw: bytes = b""
    content_type: str = "application/json"


# ---------------------------------------------------------------- FakeUpstream


class FakeUpstream(_ThreadedServer):
    """One aiohttp server on 127.0.0.1 serving both the Anthropic Messages API and the OpenAI Chat Completions API."""

    _name = "fake-upstream"

    def __init__(self, *, responder: Responder | None = None, api_keys: set[str] | None = None, port: int = 0,
                 chunk_delay: float = 0.0, words_per_chunk: int = 1, models: list[str] | None = None,
                 record: bool = True) -> None:
        super().__init__(port)
        self.responder: Responder = responder or echo_responder
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.chunk_delay = chunk_delay
        self.words_per_chunk = max(1, int(words_per_chunk))
        self.models: list[str] = list(models) if models is not None else ["fake-model"]
        self.max_context: int | None = None
        self.requests: list[Recorded] = []
        # Off for long benchmark runs, where keeping every request would grow without bound.
        self.record = record
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._seen_models: dict[str, None] = {}
        self._cache_prefixes: set[str] = set()

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    # -- failure injection

    def fail(self, status: int, *, times: int = 1, model: str | None = None, retry_after: float | None = None,
             message: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("fail", times, model, status=status, retry_after=retry_after, message=message))

    def stall(self, seconds: float, *, times: int = 1, model: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("stall", times, model, seconds=seconds))

    def drop(self, *, times: int = 1, model: str | None = None, after_chunks: int = 1) -> None:
        with self._lock:
            self._rules.append(_Rule("drop", times, model, after_chunks=after_chunks))

    def cut_body(self, *, times: int = 1, model: str | None = None) -> None:
        """Whole answers: the headers and half the body, then the connection closes. Streams are answered."""
        with self._lock:
            self._rules.append(_Rule("cut_body", times, model))

    def garble(self, raw: bytes, *, content_type: str = "application/json", times: int = 1,
               model: str | None = None) -> None:
        """Answer 200 with `raw` as the whole body (JSON of the wrong shape, an HTML page, broken JSON),
        streaming requests included."""
        with self._lock:
            self._rules.append(_Rule("garble", times, model, raw=raw, content_type=content_type))

    def bad_event(self, line: bytes, *, times: int = 1, model: str | None = None, after_chunks: int = 1) -> None:
        """In a streamed answer, send `line` (say b"data: {this is not json") after `after_chunks` deltas,
        then carry on as if nothing happened."""
        with self._lock:
            self._rules.append(_Rule("bad_event", times, model, raw=line, after_chunks=after_chunks))

    def reset(self) -> None:
        """Clear injected failures, recorded requests, the prompt cache and the models seen."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()
            self._cache_prefixes.clear()
            self._seen_models.clear()

    def _take(self, kinds: tuple[str, ...], model: str) -> _Rule | None:
        if not self._rules:  # lock-free fast path for the benchmark
            return None
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.kind in kinds and (rule.model is None or rule.model == model):
                    rule.times -= 1
                    if rule.times <= 0:
                        del self._rules[i]
                    return rule
        return None

    async def _inject(self, model: str) -> _Rule | None:
        stall = self._take(("stall",), model)
        if stall is not None:
            await asyncio.sleep(stall.seconds)
        return self._take(("fail", "drop", "cut_body", "garble", "bad_event"), model)

    # -- plumbing

    async def _record(self, request: web.Request) -> dict | None:
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else None
        if self.record:
            rec = Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
            with self._lock:
                self.requests.append(rec)
        return body

    def _authorized(self, request: web.Request, *, allow_x_api_key: bool, allow_bearer: bool) -> tuple[bool, str | None]:
        if self.api_keys is None:
            return True, None
        key = request.headers.get("x-api-key") if allow_x_api_key else None
        if key is None and allow_bearer:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        return key in self.api_keys, key

    def _see_model(self, model: str) -> None:
        if model not in self._seen_models:
            self._seen_models[model] = None

    def _answer(self, fmt: str, body: dict) -> str | ToolCall:
        answer = self.responder(fmt, body)
        if not isinstance(answer, (str, ToolCall)):
            raise TypeError(f"responder must return str or ToolCall, got {type(answer).__name__}")
        return answer

    @staticmethod
    def _abort(request: web.Request) -> None:
        # close() (not abort()) so whatever was already written is flushed first;
        # aiohttp then fails to write the terminator and treats it as a client
        # disconnect, which it logs only at debug level.
        transport = request.transport
        if transport is not None:
            transport.close()

    async def _half(self, request: web.Request, whole: web.Response) -> web.StreamResponse:
        body = whole.body
        assert isinstance(body, bytes)
        resp = web.StreamResponse(status=whole.status, headers=whole.headers)
        resp.content_length = len(body)  # promised whole, so the cut is visible to the reader
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        self._abort(request)
        return resp

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self._anthropic_count_tokens)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        anthropic_style = "anthropic-version" in request.headers or "x-api-key" in request.headers
        ok, key = self._authorized(request, allow_x_api_key=True, allow_bearer=True)
        if not ok:
            if anthropic_style:
                return _anthropic_error(401, "invalid x-api-key" if key else "x-api-key header is required")
            return _openai_error(401, f"Incorrect API key provided: {key}." if key else
                                 "You didn't provide an API key.")
        ids = list(dict.fromkeys([*self.models, *self._seen_models]))
        if anthropic_style:
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in ids]
            return _json_response({"data": data, "has_more": False, "first_id": ids[0] if ids else None,
                                   "last_id": ids[-1] if ids else None})
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in ids]
        return _json_response({"object": "list", "data": data})

    # -- Anthropic Messages API

    def _anthropic_validate(self, body: dict | None) -> str | None:
        if body is None:
            return "There was an error parsing the body of your request: expected a JSON object"
        if not isinstance(body.get("model"), str):
            return "model: Field required" if "model" not in body else "model: Input should be a valid string"
        if not _is_int(body.get("max_tokens")):
            return "max_tokens: Field required" if "max_tokens" not in body else "max_tokens: Input should be a valid integer"
        if not isinstance(body.get("messages"), list):
            return "messages: Field required" if "messages" not in body else "messages: Input should be a valid list"
        return None

    async def _anthropic_preflight(self, request: web.Request) -> tuple[dict | None, web.Response | None]:
        body = await self._record(request)
        ok, key = self._authorized(request, allow_x_api_key=True, allow_bearer=True)
        if not ok:
            if not key:
                return None, _anthropic_error(401, "x-api-key header is required")
            via_header = "x-api-key" in request.headers
            return None, _anthropic_error(401, "invalid x-api-key" if via_header else "Invalid bearer token")
        return body, None

    async def _anthropic_count_tokens(self, request: web.Request) -> web.Response:
        body, err = await self._anthropic_preflight(request)
        if err is not None:
            return err
        if body is None or not isinstance(body.get("messages"), list) or not isinstance(body.get("model"), str):
            return _anthropic_error(400, "messages: Field required")
        rule = await self._inject(body["model"])
        if rule is not None and rule.kind == "fail":
            return _anthropic_error(rule.status, rule.message, retry_after=rule.retry_after)
        total, _, _ = _anthropic_input_tokens(body)
        return _json_response({"input_tokens": total})

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._anthropic_preflight(request)
        if err is not None:
            return err
        problem = self._anthropic_validate(body)
        if problem is not None:
            return _anthropic_error(400, problem)
        assert body is not None
        model: str = body["model"]
        self._see_model(model)
        stream = body.get("stream") is True

        rule = await self._inject(model)
        if rule is not None and rule.kind == "fail":
            return _anthropic_error(rule.status, rule.message, retry_after=rule.retry_after)
        if rule is not None and rule.kind == "garble":
            return web.Response(body=rule.raw, status=200, content_type=rule.content_type)
        if rule is not None and rule.kind == "bad_event" and not stream:
            rule = None
        half = rule is not None and rule.kind == "cut_body"
        if half:
            rule = None
        if rule is not None and not stream:
            self._abort(request)
            return web.Response()

        total, prefix_words, cache_key = _anthropic_input_tokens(body)
        if self.max_context is not None and total > self.max_context:
            return _anthropic_error(400, f"prompt is too long: {total} tokens > {self.max_context} maximum")
        cache_creation = cache_read = 0
        if cache_key is not None:
            with self._lock:
                hit = cache_key in self._cache_prefixes
                self._cache_prefixes.add(cache_key)
            if hit:
                cache_read = prefix_words
            else:
                cache_creation = prefix_words
        input_tokens = total - prefix_words

        answer = self._answer("anthropic", body)
        max_tokens: int = body["max_tokens"]
        msg_id = "msg_" + _hex()
        headers = {"request-id": "req_" + _hex()}

        if isinstance(answer, ToolCall):
            tool_id = "toolu_" + _hex()
            args_json = _dumps(answer.arguments)
            output_tokens = _words(answer.name) + _words(args_json)
            stop_reason = "tool_use"
            pieces = _pieces(args_json)
        else:
            pieces = _pieces(answer)
            stop_reason = "end_turn"
            if len(pieces) > max_tokens:
                pieces = pieces[:max_tokens]
                answer = "".join(pieces)
                stop_reason = "max_tokens"
            output_tokens = len(pieces)

        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "cache_creation_input_tokens": cache_creation, "cache_read_input_tokens": cache_read}

        if not stream:
            if isinstance(answer, ToolCall):
                content = [{"type": "tool_use", "id": tool_id, "name": answer.name, "input": answer.arguments}]
            else:
                content = [{"type": "text", "text": answer}]
            whole = _json_response({"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                    "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                                    "usage": usage}, headers=headers)
            return await self._half(request, whole) if half else whole

        def ev(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _dumps(data).encode() + b"\n\n"

        start_usage = dict(usage, output_tokens=1)
        if isinstance(answer, ToolCall):
            block = {"type": "tool_use", "id": tool_id, "name": answer.name, "input": {}}
            delta_type, delta_key = "input_json_delta", "partial_json"
        else:
            block = {"type": "text", "text": ""}
            delta_type, delta_key = "text_delta", "text"
        preamble = (
            ev("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
            + ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            + ev("ping", {"type": "ping"})
        )
        k = self.words_per_chunk
        deltas = [
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": delta_type, delta_key: "".join(pieces[i:i + k])}})
            for i in range(0, len(pieces), k)
        ]
        epilogue = (
            ev("content_block_stop", {"type": "content_block_stop", "index": 0})
            + ev("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                   "usage": {"output_tokens": output_tokens}})
            + ev("message_stop", {"type": "message_stop"})
        )
        return await self._stream(request, headers, preamble, deltas, epilogue, rule)

    async def _stream(self, request: web.Request, headers: dict[str, str], preamble: bytes, deltas: list[bytes],
                      epilogue: bytes, drop: _Rule | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)
        delay = self.chunk_delay
        if drop is not None and drop.kind == "bad_event":
            at = min(drop.after_chunks, len(deltas))
            deltas = [*deltas[:at], drop.raw.rstrip(b"\n") + b"\n\n", *deltas[at:]]
            drop = None
        if drop is None and not delay:
            # One write: nothing to pace, and it keeps the "direct" baseline cheap.
            await resp.write(preamble + b"".join(deltas) + epilogue)
            await resp.write_eof()
            return resp
        await resp.write(preamble)
        if drop is not None and drop.after_chunks <= 0:
            self._abort(request)
            return resp
        for i, chunk in enumerate(deltas):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(chunk)
            if drop is not None and i + 1 >= drop.after_chunks:
                self._abort(request)
                return resp
        if drop is not None:
            self._abort(request)
            return resp
        await resp.write(epilogue)
        await resp.write_eof()
        return resp

    # -- OpenAI Chat Completions API

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        ok, key = self._authorized(request, allow_x_api_key=False, allow_bearer=True)
        if not ok:
            if key:
                return _openai_error(401, f"Incorrect API key provided: {key}. You can find your API key at "
                                          "https://platform.openai.com/account/api-keys.")
            return _openai_error(401, "You didn't provide an API key. You need to provide your API key in an "
                                      "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if body is None:
            return _openai_error(400, "We could not parse the JSON body of your request. (HINT: This likely means "
                                      "you aren't using your HTTP library correctly.)")
        if not isinstance(body.get("model"), str):
            return _openai_error(400, "you must provide a model parameter", param="model")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _openai_error(400, "Missing required parameter: 'messages'." if "messages" not in body else
                                 "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                                 param="messages", code="missing_required_parameter" if "messages" not in body
                                 else "empty_array")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and not _is_int(max_tokens):
            return _openai_error(400, "Invalid type for 'max_tokens': expected an integer.", param="max_tokens",
                                 code="invalid_type")
        model: str = body["model"]
        self._see_model(model)
        stream = body.get("stream") is True

        rule = await self._inject(model)
        if rule is not None and rule.kind == "fail":
            return _openai_error(rule.status, rule.message, retry_after=rule.retry_after)
        if rule is not None and rule.kind == "garble":
            return web.Response(body=rule.raw, status=200, content_type=rule.content_type)
        if rule is not None and rule.kind == "bad_event" and not stream:
            rule = None
        half = rule is not None and rule.kind == "cut_body"
        if half:
            rule = None
        if rule is not None and not stream:
            self._abort(request)
            return web.Response()

        prompt_tokens = _openai_input_tokens(body)
        if self.max_context is not None and prompt_tokens > self.max_context:
            return _openai_error(
                400, f"This model's maximum context length is {self.max_context} tokens. However, your messages "
                     f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages", code="context_length_exceeded")

        answer = self._answer("openai", body)
        cid = "chatcmpl-" + _hex(29)
        created = int(time.time())
        headers = {"x-request-id": "req_" + _hex(32), "openai-processing-ms": "0"}

        if isinstance(answer, ToolCall):
            call_id = "call_" + _hex()
            args_json = _dumps(answer.arguments)
            completion_tokens = _words(answer.name) + _words(args_json)
            finish_reason = "tool_calls"
            pieces = _pieces(args_json)
        else:
            pieces = _pieces(answer)
            finish_reason = "stop"
            if max_tokens is not None and len(pieces) > max_tokens:
                pieces = pieces[:max_tokens]
                answer = "".join(pieces)
                finish_reason = "length"
            completion_tokens = len(pieces)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

        if not stream:
            if isinstance(answer, ToolCall):
                message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": answer.name, "arguments": args_json}}]}
            else:
                message = {"role": "assistant", "content": answer, "refusal": None}
            whole = _json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                                                 "logprobs": None}],
                                    "usage": usage, "system_fingerprint": None}, headers=headers)
            return await self._half(request, whole) if half else whole

        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None}
        if include_usage:
            head["usage"] = None  # real API sends usage: null on every chunk but the last

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            obj = dict(head, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            return b"data: " + _dumps(obj).encode() + b"\n\n"

        k = self.words_per_chunk
        parts = ["".join(pieces[i:i + k]) for i in range(0, len(pieces), k)]
        if isinstance(answer, ToolCall):
            # As OpenAI does: the first chunk carries the role and the call header, then argument fragments.
            preamble = chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": answer.name, "arguments": ""}}]})
            deltas = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in parts]
        else:
            preamble = chunk({"role": "assistant", "content": "", "refusal": None})
            deltas = [chunk({"content": p}) for p in parts]
        epilogue = chunk({}, finish_reason)
        if include_usage:
            epilogue += b"data: " + _dumps(dict(head, choices=[], usage=usage)).encode() + b"\n\n"
        epilogue += b"data: [DONE]\n\n"
        return await self._stream(request, headers, preamble, deltas, epilogue, rule)


# ---------------------------------------------------------------- FakePostHog

_PH_EVENT_PATHS = {"/batch", "/capture", "/e", "/i/v0/e", "/i/v0/ai/batch", "/track", "/engage",
                   "/i/v1/analytics/events"}


class FakePostHog(_ThreadedServer):
    """A PostHog capture endpoint on 127.0.0.1 that records what the official SDK really sent."""

    _name = "fake-posthog"

    def __init__(self, *, port: int = 0) -> None:
        super().__init__(port)
        self.events: list[dict] = []
        self.requests: list[Recorded] = []  # every request, including flags/unknown paths
        self._cond = threading.Condition()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def reset(self) -> None:
        with self._cond:
            self.events.clear()
            self.requests.clear()

    def wait_for(self, n: int, timeout: float = 5) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"FakePostHog got {len(self.events)} events, wanted {n}: "
                                       f"{[e.get('event') for e in self.events]}")
                self._cond.wait(left)
            return list(self.events)

    @staticmethod
    def _decode(request: web.Request, raw: bytes) -> Any:
        # aiohttp already inflates bodies sent with Content-Encoding, so sniff the
        # magic bytes instead of trusting the header (posthog-js-style
        # ?compression=gzip-js bodies arrive still compressed).
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:1] == b"\x78" and request.headers.get("content-encoding", "").lower() == "deflate":
            raw = zlib.decompress(raw)
        if not raw:
            return None
        if request.content_type == "application/x-www-form-urlencoded":
            data = parse_qs(raw.decode()).get("data", [""])[0]
            try:
                return json.loads(data)
            except ValueError:
                return json.loads(base64.b64decode(data + "=" * (-len(data) % 4)))
        return json.loads(raw)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read() if request.can_read_body else b""
        path = request.path.rstrip("/") or "/"
        try:
            payload = self._decode(request, raw)
        except Exception:
            payload = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._cond:
            self.requests.append(Recorded(request.path, headers, payload if isinstance(payload, dict) else None))

        if path in _PH_EVENT_PATHS and request.method == "POST":
            if payload is None:
                return _json_response({"type": "validation_error", "code": "invalid_payload",
                                       "detail": "Malformed request data"}, 400)
            events = self._events_of(payload, request)
            with self._cond:
                self.events.extend(events)
                self._cond.notify_all()
            if path == "/i/v1/analytics/events":
                return _json_response({"results": {e.get("uuid", ""): {"result": "ok"} for e in events}})
            return _json_response({"status": 1})
        if path in ("/flags", "/decide"):
            return _json_response({"flags": {}, "featureFlags": {}, "featureFlagPayloads": {},
                                   "errorsWhileComputingFlags": False, "quotaLimited": [],
                                   "requestId": str(uuid.uuid4())})
        if path in ("/flags/definitions", "/api/feature_flag/local_evaluation"):
            return _json_response({"flags": [], "group_type_mapping": {}, "cohorts": {}})
        return _json_response({})

    @staticmethod
    def _events_of(payload: Any, request: web.Request) -> list[dict]:
        api_key = None
        if isinstance(payload, dict):
            api_key = payload.get("api_key") or payload.get("token")
            items = payload.get("batch") if "batch" in payload else [payload]
        else:
            items = payload
        if api_key is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                api_key = auth[7:].strip()
        out = []
        for item in items or ():
            if isinstance(item, dict):
                event = dict(item)
                event.setdefault("properties", {})
                if api_key is not None:
                    event.setdefault("api_key", api_key)  # lets tests assert which project key was used
                out.append(event)
        return out


# ---------------------------------------------------------------- CLI

# The upstream faults the gateway handles, by the name the CLI and bench/chaos.py give them.
FAULTS = ("500", "503", "429", "stall", "stall-mid", "cut", "cut-body", "wrong-shape", "html", "bad-json",
          "bad-event")
_FOREVER = 1 << 62


def inject_fault(fake: FakeUpstream, fault: str, *, model: str | None = None, retry_after: float = 1.0,
                 stall: float = 5.0) -> None:
    """Make every request (for `model`, if given) meet `fault`, for as long as the fake runs."""
    kw: dict[str, Any] = {"times": _FOREVER, "model": model}
    if fault in ("500", "503", "429"):
        fake.fail(int(fault), retry_after=retry_after if fault == "429" else None, **kw)
    elif fault == "stall":
        fake.stall(stall, **kw)
    elif fault == "stall-mid":  # streams pause `stall` s after their first delta; whole answers are intact
        if model is not None:
            raise ValueError("stall-mid applies to every model")
        fake.chunk_delay = stall
    elif fault == "cut":  # whole answers: closed before any byte; streams: after the first delta
        fake.drop(after_chunks=1, **kw)
    elif fault == "cut-body":  # whole answers: closed halfway through the body; streams are answered
        fake.cut_body(**kw)
    elif fault == "wrong-shape":
        fake.garble(b'{"result": "ok", "items": [1, 2, 3]}', **kw)
    elif fault == "html":
        fake.garble(b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html",
                    **kw)
    elif fault == "bad-json":
        fake.garble(b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "hal', **kw)
    elif fault == "bad-event":  # streams only: whole answers come back intact
        fake.bad_event(b"data: {this is not json", after_chunks=1, **kw)
    else:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a FakeUpstream in the foreground.")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--words-per-chunk", type=int, default=1)
    parser.add_argument("--api-key", action="append", help="require this key (repeatable); default: no auth")
    parser.add_argument("--fault", choices=sorted(FAULTS), help="answer every request with this fault (bench/chaos.py)")
    parser.add_argument("--fault-model", help="only requests for this model get the fault; default: all")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the retry-after of --fault 429")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds --fault stall waits before answering")
    args = parser.parse_args(argv)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    fake = FakeUpstream(port=args.port, chunk_delay=args.chunk_delay, words_per_chunk=args.words_per_chunk,
                        api_keys=set(args.api_key) if args.api_key else None, record=False)
    if args.fault:
        inject_fault(fake, args.fault, model=args.fault_model, retry_after=args.retry_after, stall=args.stall)
    fake.start()
    print(f"FakeUpstream listening on {fake.url} (OpenAI base {fake.openai_url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
