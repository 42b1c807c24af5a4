"""Fallback policy, apart from the plumbing: which failures mean what, which model comes next, and which
deployments are cooling down after a failure."""

from __future__ import annotations

import time

from tm_resources.config import Config, Tier

# What a failed attempt means, from its status and message.
RATE_LIMITED = "rate_limited"      # 429: next key, then wait once, then the next model
UNAVAILABLE = "unavailable"        # 5xx, 529, connection refused: the next model at once
CONTEXT_TOO_LONG = "context_too_long"  # a model with a larger context window
TIMEOUT = "timeout"                # retry once, then the next (faster) model
AUTH = "auth"                      # 401/403: next key, then report it
CLIENT_ERROR = "client_error"      # any other 4xx: the request's own fault, no fallback

_CONTEXT_MARKERS = ("prompt is too long", "context_length_exceeded", "maximum context length",
                    "context window", "too many tokens", "input is too long")


def classify_failure(status: int, message: str = "") -> str:
    if status == 429:
        return RATE_LIMITED
    if status in (401, 403):
        return AUTH
    if status in (408, 504):
        return TIMEOUT
    if status >= 500:
        return UNAVAILABLE
    text = message.lower()
    if status in (400, 413, 422) and any(m in text for m in _CONTEXT_MARKERS):
        return CONTEXT_TOO_LONG
    return CLIENT_ERROR


def _allowed(origin: Tier, candidate: Tier) -> bool:
    # Never "up" from what the user may be billed for: an included model never falls to a premium one.
    return not (candidate is Tier.premium and origin is not Tier.premium)


def chain(model: str, config: Config) -> list[str]:
    """The model, then its configured fallbacks (transitively, in order), without repeats or tier climbs."""
    origin = config.models[model].tier
    out: list[str] = []
    todo = [model]
    while todo:
        m = todo.pop(0)
        if m in out or m not in config.models or not _allowed(origin, config.models[m].tier):
            continue
        out.append(m)
        todo.extend(config.models[m].fallbacks)
    return out


def larger_context(model: str, remaining: list[str], config: Config, origin: Tier) -> list[str]:
    """Candidates with a larger context window than `model`: the chain's own first, then any other
    configured model the tier rule allows, smallest sufficient window first."""
    window = config.models[model].context_window
    in_chain = [m for m in remaining if config.models[m].context_window > window]
    others = sorted(
        (m for m, c in config.models.items()
         if m not in remaining and m != model and c.context_window > window and _allowed(origin, c.tier)),
        key=lambda m: config.models[m].context_window,
    )
    return in_chain + others


class Cooldowns:
    """A deployment that just failed is skipped for `seconds`, so an outage does not cost every request
    the same failed attempt."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._until: dict[str, float] = {}

    def cooling(self, model: str) -> bool:
        until = self._until.get(model)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._until[model]
            return False
        return True

    def trip(self, model: str) -> None:
        self._until[model] = time.monotonic() + self.seconds

    def clear(self, model: str) -> None:
        self._until.pop(model, None)
