"""PostHog's LLM analytics: each model request as an `$ai_generation` event (and each cache hit as
`tm_cache_hit`), sent from the request log's writer thread once its row is stored, never on the request path."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from tm_resources.config import Config, PostHogConfig
from tm_resources.events import EventSink, event_uuid
from tm_resources.redact import redact

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy
    from tm_gateway.requestlog import RequestLog

# The endpoints whose rows are model calls; a model listing or a count is not a generation.
GENERATION_ENDPOINTS = frozenset(("/v1/chat/completions", "/chat/completions", "/v1/messages"))
_NOT_IN_TRACE_ID = re.compile(r"[^A-Za-z0-9\-_~.@()!':|]")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def trace_id(text: str) -> str:
    # PostHog accepts only these characters in a trace id; a client's session header may hold any.
    return _NOT_IN_TRACE_ID.sub("_", text)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 6)


class LlmAnalytics:
    """Turns stored rows into PostHog events. Prompts and answers are left out unless
    `posthog.capture_content` is on, and then redacted as the log redacts them."""

    def __init__(self, sink: EventSink, config: Config):
        self.sink = sink
        self.settings: PostHogConfig = config.posthog
        self.config = config
        self.redact_secrets = config.log.redact.secrets
        self.redact_pii = config.log.redact.pii
        self.base_urls = {name: _without_credentials(p.base_url) for name, p in config.providers.items()}

    def _clean(self, text: Any) -> Any:
        if isinstance(text, str) and (self.redact_secrets or self.redact_pii):
            return redact(text, secrets=self.redact_secrets, pii=self.redact_pii)
        if isinstance(text, list):
            return [self._clean(t) for t in text]
        if isinstance(text, dict):
            return {k: self._clean(v) for k, v in text.items()}
        return text

    def _costs(self, row: dict) -> tuple[float | None, float | None]:
        """(input, output) cost in USD at the model's configured price; cache tokens count as input."""
        model = self.config.models.get(row.get("model") or "")
        if model is None or row.get("provider") == "cache":
            return (0.0, 0.0) if row.get("provider") == "cache" else (None, None)
        p = model.price
        return (p.cost(row.get("input_tokens") or 0, 0, row.get("cache_read_tokens") or 0,
                       row.get("cache_write_tokens") or 0), p.cost(0, row.get("output_tokens") or 0))

    def generation(self, row: dict) -> dict[str, Any]:
        """The `$ai_generation` properties of one row."""
        status = row.get("status") or 0
        rid = str(row["id"])
        input_cost, output_cost = self._costs(row)
        props: dict[str, Any] = {
            "$ai_trace_id": trace_id(row.get("session_id") or rid),
            "$ai_span_id": rid,
            "$ai_model": row.get("model") or row.get("requested_model"),
            "$ai_provider": row.get("provider"),
            "$ai_input_tokens": row.get("input_tokens") or 0,
            "$ai_output_tokens": row.get("output_tokens") or 0,
            "$ai_cache_read_input_tokens": row.get("cache_read_tokens") or 0,
            "$ai_cache_creation_input_tokens": row.get("cache_write_tokens") or 0,
            "$ai_latency": _seconds(row.get("latency_ms")),
            "$ai_stream": bool(row.get("stream")),
            "$ai_http_status": status,
            "$ai_is_error": status >= 400,
            "$ai_total_cost_usd": row.get("cost_usd") or 0.0,
            "tm_requested_model": row.get("requested_model"),
            "tm_upstream_model": row.get("upstream_model"),
            "tm_route": row.get("route"),
            "tm_task_type": row.get("task_type"),
            "tm_agent": row.get("agent"),
            "tm_api_format": row.get("api_format"),
            "tm_cache_hit": row.get("cache_hit"),
            "tm_served": row.get("served", True),
            "tm_frontier_baseline_cost_usd": row.get("baseline_cost_usd"),
        }
        if input_cost is not None:
            props["$ai_input_cost_usd"] = input_cost
            props["$ai_output_cost_usd"] = output_cost
        if row.get("ttft_ms") is not None:
            props["$ai_time_to_first_token"] = _seconds(row["ttft_ms"])
        if row.get("session_id"):
            props["$ai_session_id"] = row["session_id"]
        if row.get("parent_id"):
            props["$ai_parent_id"] = str(row["parent_id"])
        if base := self.base_urls.get(row.get("provider") or ""):
            props["$ai_base_url"] = base
        if status >= 400:
            props["$ai_error"] = row.get("error_message") or row.get("error_class")
            props["tm_error_class"] = row.get("error_class")
        if self.settings.capture_content:
            messages = row.get("messages")
            turns = orjson.loads(messages) if isinstance(messages, str) else (messages or [])
            if row.get("system"):
                turns = [{"role": "system", "content": row["system"]}, *turns]
            props["$ai_input"] = self._clean(turns)
            if row.get("response_text") is not None:
                props["$ai_output_choices"] = [{"role": "assistant", "content": self._clean(row["response_text"])}]
        return props

    def observe(self, request_log: RequestLog, rows: list[dict]) -> None:
        """Send a batch of stored rows (called by the request log's writer thread; the SDK queues and
        sends from its own thread). The row id is the event id, so a row is one event in PostHog."""
        for row in rows:
            if row.get("endpoint") not in GENERATION_ENDPOINTS:
                continue
            user, rid, ts = row.get("user_id") or "anonymous", str(row["id"]), row.get("ts")
            self.sink.capture("$ai_generation", distinct_id=user, properties=self.generation(row),
                              event_id=rid, timestamp=ts)
            if kind := row.get("cache_hit"):
                self.sink.capture("tm_cache_hit", distinct_id=user, timestamp=ts,
                                  event_id=event_uuid("cache_hit", rid), properties={
                    "kind": kind, "request_id": rid, "source_request_id": str(row.get("cache_source_id")),
                    "similarity": row.get("cache_similarity"), "model": row.get("model"),
                    "saved_frontier_cost_usd": row.get("baseline_cost_usd"),
                    "$ai_trace_id": trace_id(row.get("session_id") or rid)})


def attach(proxy: Proxy) -> None:
    """Send the proxy's stored rows to PostHog when a project key is set and `posthog.llm_analytics` is on."""
    if proxy.events.enabled and proxy.config.posthog.llm_analytics:
        proxy.request_log.observers.append(LlmAnalytics(proxy.events, proxy.config).observe)
