"""The Anthropic Messages API of FakeUpstream: token counts, error bodies and the /v1/messages routes."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.fakes.server import ToolCall, _dumps, _fmt_num, _hex, _is_int, _json_response, _pieces, _words


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



class AnthropicRoutes:
    """The Anthropic routes; FakeUpstream brings the recording, auth, fault rules and streaming they call."""

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

        reply, rule, half = await self._meet_fault(request, model, stream, _anthropic_error)
        if reply is not None:
            return reply

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
