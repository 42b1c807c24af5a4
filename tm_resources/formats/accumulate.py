"""Stream accumulators: what a relayed stream said, gathered for the request log."""

from __future__ import annotations

from tm_resources.formats._common import _dumps, _int
from tm_resources.formats.response import _compact_args, _log_text
from tm_resources.formats.usage import Usage, usage_from_anthropic, usage_from_openai


class _Accumulator:
    __slots__ = ("_text", "usage", "tool_calls", "got_content", "error")

    def __init__(self) -> None:
        self._text: list[str] = []
        self.usage = Usage()
        self.tool_calls: list[dict] = []  # {"id", "name", "arguments"}
        self.got_content = False
        self.error: dict | None = None

    @property
    def text(self) -> str:
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def log_text(self) -> str:
        """Same shape as response_text_openai / response_text_anthropic, for streamed responses."""
        return _log_text(self.text, ((c["name"], _compact_args(c["arguments"])) for c in self.tool_calls))


class OpenAIStreamAccumulator(_Accumulator):
    __slots__ = ("finish_reason", "_by_index")

    def __init__(self) -> None:
        super().__init__()
        self.finish_reason: str | None = None
        self._by_index: dict[int, dict] = {}

    def feed(self, chunk: dict) -> None:
        u = chunk.get("usage")
        if u:
            self.usage = usage_from_openai(u)
        if "error" in chunk:
            self.error = chunk["error"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                c = delta.get("content")
                if c:
                    self._text.append(c)
                    self.got_content = True
                for tc in delta.get("tool_calls") or ():
                    self.got_content = True
                    idx = tc.get("index", 0)
                    call = self._by_index.get(idx)
                    if call is None:
                        call = self._by_index[idx] = {"id": tc.get("id"), "name": "", "arguments": ""}
                        self.tool_calls.append(call)
                    elif tc.get("id"):
                        call["id"] = tc["id"]
                    fn = tc.get("function")
                    if fn:
                        if fn.get("name"):
                            call["name"] += fn["name"]
                        args = fn.get("arguments")
                        if args:  # Ollama can send the parsed object whole
                            call["arguments"] += args if isinstance(args, str) else _dumps(args)
            fr = choice.get("finish_reason")
            if fr:
                self.finish_reason = fr


class AnthropicStreamAccumulator(_Accumulator):
    __slots__ = ("stop_reason", "_by_index")

    def __init__(self) -> None:
        super().__init__()
        self.stop_reason: str | None = None
        self._by_index: dict[int | None, dict] = {}  # a block index as sent, None if missing

    def feed(self, event_type: str, data: dict) -> None:
        if event_type == "content_block_delta":
            d = data.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                t = d.get("text")
                if t:
                    self._text.append(t)
                    self.got_content = True
            elif dt == "input_json_delta":
                call = self._by_index.get(data.get("index"))
                if call is not None:
                    call["arguments"] += d.get("partial_json") or ""
        elif event_type == "content_block_start":
            b = data.get("content_block") or {}
            if b.get("type") == "tool_use":
                self.got_content = True
                call = {"id": b.get("id"), "name": b.get("name") or "", "arguments": ""}
                self._by_index[data.get("index")] = call
                self.tool_calls.append(call)
            elif b.get("type") == "text" and b.get("text"):
                self._text.append(b["text"])
                self.got_content = True
        elif event_type == "message_start":
            self.usage = usage_from_anthropic((data.get("message") or {}).get("usage"))
        elif event_type == "message_delta":
            sr = (data.get("delta") or {}).get("stop_reason")
            if sr:
                self.stop_reason = sr
            u = data.get("usage")
            if u:
                _merge_anthropic_usage(self.usage, u)
        elif event_type == "error":
            self.error = data.get("error") or data


def _merge_anthropic_usage(usage: Usage, u: dict) -> None:
    # message_delta counts are cumulative and only sometimes carry the input side.
    v = u.get("output_tokens")
    if v is not None:
        usage.output_tokens = _int(v)
    v = u.get("input_tokens")
    if v is not None:
        usage.input_tokens = _int(v)
    v = u.get("cache_read_input_tokens")
    if v is not None:
        usage.cache_read_tokens = _int(v)
    v = u.get("cache_creation_input_tokens")
    if v is not None:
        usage.cache_write_tokens = _int(v)
