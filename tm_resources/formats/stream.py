"""Stream translators between the two formats' events, and a whole answer's text as events."""

from __future__ import annotations

import time
import uuid

from tm_resources.formats._common import _dumps
from tm_resources.formats.accumulate import _merge_anthropic_usage
from tm_resources.formats.stops import _finish_from_anthropic, _stop_from_openai
from tm_resources.formats.usage import (
    Usage,
    usage_from_anthropic,
    usage_from_openai,
    usage_to_anthropic,
    usage_to_openai,
)


def anthropic_text_message(text: str, *, model: str, id: str) -> dict:
    """A whole Anthropic answer made of `text` alone, with no tokens used (a cached answer)."""
    return {"id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}


def anthropic_text_events(text: str, *, model: str, id: str, usage: Usage | None = None,
                          piece_chars: int = 64) -> list[tuple[str, dict]]:
    """The Anthropic stream events of `anthropic_text_message` (with `usage` when tokens were used),
    its text in pieces of about `piece_chars` (cut after a space where there is one)."""
    head = anthropic_text_message("", model=model, id=id)
    head.update(content=[], stop_reason=None)
    if usage is not None:
        head["usage"] = {**usage_to_anthropic(usage), "output_tokens": 0}
    events: list[tuple[str, dict]] = [
        ("message_start", {"type": "message_start", "message": head}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    ]
    start = 0
    while start < len(text):
        end = min(len(text), start + piece_chars)
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space + 1 if space > start else end
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": text[start:end]}}))
        start = end
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": usage.output_tokens if usage is not None else 0}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


class AnthropicToOpenAIStream:
    """Anthropic upstream stream events -> OpenAI chat.completion.chunk dicts."""

    __slots__ = ("model", "id", "include_usage", "created", "usage", "stop_reason",
                 "_started", "_done", "_tools", "_head")

    def __init__(self, *, model: str, id: str, include_usage: bool) -> None:
        self.model = model
        self.id = id
        self.include_usage = include_usage
        self.created = int(time.time())
        self.usage = Usage()
        self.stop_reason: str | None = None
        self._started = False
        self._done = False
        self._tools: dict[int | None, int] = {}  # Anthropic block index (as sent) -> OpenAI tool_calls index
        self._head = {"id": id, "object": "chat.completion.chunk", "created": self.created, "model": model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        c = dict(self._head)
        c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return c

    def _delta(self, delta: dict) -> list[dict]:
        if self._started:
            return [self._chunk(delta)]
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""}), self._chunk(delta)]

    def feed(self, event_type: str, data: dict) -> list[dict]:
        if self._done:
            return []
        if event_type == "content_block_delta":
            d = data.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                t = d.get("text")
                return self._delta({"content": t}) if t else []
            if dt == "input_json_delta":
                pj = d.get("partial_json")
                k = self._tools.get(data.get("index"))
                if not pj or k is None:
                    return []
                return self._delta({"tool_calls": [{"index": k, "function": {"arguments": pj}}]})
            return []  # thinking, signature and citation deltas have no OpenAI counterpart
        if event_type == "content_block_start":
            b = data.get("content_block") or {}
            bt = b.get("type")
            if bt == "tool_use":
                k = self._tools[data.get("index")] = len(self._tools)
                return self._delta({"tool_calls": [{
                    "index": k,
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": ""},
                }]})
            if bt == "text" and b.get("text"):
                return self._delta({"content": b["text"]})
            return []
        if event_type == "message_start":
            self.usage = usage_from_anthropic((data.get("message") or {}).get("usage"))
            if self._started:
                return []
            self._started = True
            return [self._chunk({"role": "assistant", "content": ""})]
        if event_type == "message_delta":
            sr = (data.get("delta") or {}).get("stop_reason")
            if sr:
                self.stop_reason = sr
            u = data.get("usage")
            if u:
                _merge_anthropic_usage(self.usage, u)
            return []
        if event_type == "message_stop":
            return self.finish()
        if event_type == "error":
            # The OpenAI SDK raises on a stream chunk with an "error" key.
            self._done = True
            err = data.get("error") or {}
            return [{"error": {
                "message": err.get("message") or "upstream stream error",
                "type": err.get("type") or "api_error",
                "param": None,
                "code": None,
            }}]
        return []  # ping, content_block_stop

    def finish(self) -> list[dict]:
        if self._done:
            return []
        self._done = True
        out = [] if self._started else [self._chunk({"role": "assistant", "content": ""})]
        self._started = True
        out.append(self._chunk({}, _finish_from_anthropic(self.stop_reason, bool(self._tools))))
        if self.include_usage:
            c = dict(self._head)
            c["choices"] = []
            c["usage"] = usage_to_openai(self.usage)
            out.append(c)
        return out


class OpenAIToAnthropicStream:
    """OpenAI upstream chat.completion.chunk dicts -> Anthropic (event, data) pairs."""

    __slots__ = ("model", "id", "usage", "finish_reason", "_started", "_done",
                 "_block", "_block_type", "_next_index", "_tools")

    def __init__(self, *, model: str, id: str) -> None:
        self.model = model
        self.id = id
        self.usage = Usage()
        self.finish_reason: str | None = None
        self._started = False
        self._done = False
        self._block = -1  # index of the open content block, -1 when none
        self._block_type: str | None = None
        self._next_index = 0
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index

    def _start(self, out: list) -> None:
        self._started = True
        out.append(("message_start", {"type": "message_start", "message": {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_to_anthropic(self.usage),
        }}))

    def _close(self, out: list) -> None:
        if self._block >= 0:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._block}))
            self._block = -1
            self._block_type = None

    def _open(self, out: list, block: dict) -> int:
        self._close(out)
        i = self._block = self._next_index
        self._next_index += 1
        self._block_type = block["type"]
        out.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": block}))
        return i

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        if self._done:
            return []
        out: list[tuple[str, dict]] = []
        u = chunk.get("usage")
        if u:
            self.usage = usage_from_openai(u)
        err = chunk.get("error")
        if err:
            self._done = True
            msg = err.get("message") if isinstance(err, dict) else str(err)
            return [("error", {"type": "error",
                               "error": {"type": "api_error", "message": msg or "upstream stream error"}})]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                text = delta.get("content")
                if text:
                    if not self._started:
                        self._start(out)
                    if self._block_type != "text":
                        self._open(out, {"type": "text", "text": ""})
                    out.append(("content_block_delta", {
                        "type": "content_block_delta", "index": self._block,
                        "delta": {"type": "text_delta", "text": text},
                    }))
                for tc in delta.get("tool_calls") or ():
                    if not self._started:
                        self._start(out)
                    k = tc.get("index", 0)
                    fn = tc.get("function") or {}
                    bi = self._tools.get(k)
                    if bi is None:
                        bi = self._tools[k] = self._open(out, {
                            "type": "tool_use",
                            "id": tc.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                            "name": fn.get("name") or "",
                            "input": {},
                        })
                    args = fn.get("arguments")
                    if args:
                        if not isinstance(args, str):  # Ollama can send the parsed object whole
                            args = _dumps(args)
                        # Sent even to an already closed block: SDKs accumulate by index.
                        out.append(("content_block_delta", {
                            "type": "content_block_delta", "index": bi,
                            "delta": {"type": "input_json_delta", "partial_json": args},
                        }))
            fr = choice.get("finish_reason")
            if fr:
                self.finish_reason = fr
        if not self._started and chunk.get("choices"):
            # Even the role-only first chunk starts the message, so clients see bytes early.
            self._start(out)
        return out

    def finish(self) -> list[tuple[str, dict]]:
        if self._done:
            return []
        self._done = True
        out: list[tuple[str, dict]] = []
        if not self._started:
            self._start(out)
        self._close(out)
        out.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_from_openai(self.finish_reason, bool(self._tools)), "stop_sequence": None},
            "usage": usage_to_anthropic(self.usage),
        }))
        out.append(("message_stop", {"type": "message_stop"}))
        return out
