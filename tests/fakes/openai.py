"""The OpenAI Chat Completions API of FakeUpstream: token counts, error bodies and the /v1/chat/completions route."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tests.fakes.server import ToolCall, _dumps, _fmt_num, _hex, _is_int, _json_response, _pieces, _words


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



_OPENAI_ERRORS = {  # status -> (type, code, default message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}



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



class OpenAIRoutes:
    """The OpenAI route; FakeUpstream brings the recording, auth, fault rules and streaming it calls."""

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

        reply, rule, half = await self._meet_fault(request, model, stream, _openai_error)
        if reply is not None:
            return reply

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
