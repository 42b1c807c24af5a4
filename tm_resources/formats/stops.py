"""Stop reasons mapped between the two formats."""

from __future__ import annotations

_A2O_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}
_O2A_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _finish_from_anthropic(stop_reason, has_tools: bool) -> str:
    r = _A2O_STOP.get(stop_reason)
    if r is None:
        r = "tool_calls" if has_tools else "stop"
    return r


def _stop_from_openai(finish_reason, has_tools: bool) -> str:
    r = _O2A_STOP.get(finish_reason, "end_turn")
    # Some local servers (older Ollama, some vLLM parsers) say "stop" after emitting tool calls;
    # Anthropic clients run tools only when stop_reason is tool_use.
    if has_tools and r == "end_turn":
        r = "tool_use"
    return r
