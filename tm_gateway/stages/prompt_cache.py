"""Anthropic prompt caching done for the team: a cache breakpoint added to a long system prompt or tool
list that carries none, so the provider bills the repeated prefix at its cache-read price."""

from __future__ import annotations

from typing import Any

from tm_gateway.stages.limits import estimate_tokens
from tm_resources.config import Config

EPHEMERAL = {"type": "ephemeral"}


def has_cache_control(body: dict) -> bool:
    """Whether the client placed any breakpoint itself (then its choice stands)."""
    system = body.get("system")
    blocks: list[Any] = list(system) if isinstance(system, list) else []
    blocks += body.get("tools") or []
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            blocks += content
    return any(isinstance(b, dict) and "cache_control" in b for b in blocks)


def cacheable_prefix(body: dict) -> tuple[Any, Any]:
    """(system, tools) of an Anthropic body: the prefix Anthropic caches up to a breakpoint at the end of
    the system prompt (its order is tools, then system, then messages)."""
    return body.get("system") or None, body.get("tools") or None


def add_breakpoints(config: Config, body: dict) -> dict:
    """The Anthropic body to send: with `cache.prompt_caching: auto`, one breakpoint at the end of a
    system prompt and tool list that together pass `prompt_caching_min_tokens` and carry none, which
    caches both; otherwise the body as it is."""
    cc = config.cache
    if cc.prompt_caching != "auto" or has_cache_control(body):
        return body
    system, tools = cacheable_prefix(body)
    if (system is None and tools is None) or estimate_tokens(system, tools) < cc.prompt_caching_min_tokens:
        return body
    if system is not None:
        blocks: list[dict[str, Any]] = ([{"type": "text", "text": system}] if isinstance(system, str)
                                        else [dict(b) for b in system])
        blocks[-1] = {**blocks[-1], "cache_control": EPHEMERAL}
        return {**body, "system": blocks}
    return {**body, "tools": [*tools[:-1], {**tools[-1], "cache_control": EPHEMERAL}]}
