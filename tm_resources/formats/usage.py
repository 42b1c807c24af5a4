"""Token usage in either format, read leniently and written back."""

from __future__ import annotations

from dataclasses import dataclass

from tm_resources.formats._common import _int


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # uncached prompt tokens
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


def usage_from_anthropic(u: dict | None) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        _int(u.get("input_tokens")),
        _int(u.get("output_tokens")),
        _int(u.get("cache_read_input_tokens")),
        _int(u.get("cache_creation_input_tokens")),
    )


def usage_from_openai(u: dict | None) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    prompt = _int(u.get("prompt_tokens"))
    details = u.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = _int(details.get("cached_tokens"))
        # Not OpenAI's own field, but some OpenAI-compatible routers report cache writes here.
        written = _int(details.get("cache_write_tokens"))
    else:
        # DeepSeek-style servers report the cache hit at top level.
        cached = _int(u.get("prompt_cache_hit_tokens"))
        written = 0
    return Usage(
        max(prompt - cached - written, 0),
        _int(u.get("completion_tokens")),
        cached,
        written,
    )


def usage_to_anthropic(u: Usage) -> dict:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
    }


def usage_to_openai(u: Usage) -> dict:
    prompt = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens},
    }
