"""The cache stage: an answer already given (the same request, or a similar prompt the loop scored
well), found without ever failing the request, and served in the caller's format for nothing."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from tm_gateway.stages.context import JSON, Ctx
from tm_gateway.stages.relay import text_stream
from tm_resources import cache
from tm_resources import formats as fm
from tm_resources.embedder import fits_window

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

log = logging.getLogger(__name__)


async def cache_lookup(gw: Proxy, ctx: Ctx, body: dict) -> cache.Hit | None:
    """Exact, then semantic (only for a prompt its vector covers whole: a long one is embedded
    from its opening only). Never fails the request: a slow or unreachable database is a miss."""
    h, row, headers = ctx.client_headers, ctx.row, ctx.reply_headers
    directives = h.get("cache-control", "").lower()
    if h.get("x-tm-cache", "").strip().lower() in ("off", "no", "false", "0", "bypass") \
            or "no-cache" in directives or "no-store" in directives:
        headers["x-tm-cache"] = "off"
        return None
    keys = cache.keys(body, row.data["agent"])
    r = row.data
    r["request_hash"], r["context_hash"] = keys.request_hash, keys.context_hash
    config = gw.config
    users = cache.scope_users(r["user_id"], config)
    headers["x-tm-cache"] = "miss"
    # Postgres is asked only for what may be there: an exact hash some replica has logged, a prompt
    # with a vector in a context that has semantic entries.
    hashes, contexts = gw.shared.hashes, gw.shared.contexts
    exact = hashes is None or hashes.may_have(keys.request_hash, r["user_id"])
    vec = r.get("prompt_embedding")
    semantic = config.cache.semantic
    similar = keys.context_hash is not None and semantic.enabled and bool(r.get("prompt")) \
        and (contexts is None or contexts.may_have(keys.context_hash, r["requested_model"], r["user_id"])) \
        and (vec is not None or (gw.embed is not None and semantic.named_models)) \
        and fits_window([r["prompt"]])[0]
    if hashes is not None:
        hashes.add(keys.request_hash, r["user_id"])
    if not (exact or similar):
        return None
    try:
        async with asyncio.timeout(config.cache.lookup_timeout_s):
            # A named model's prompt (semantic.named_models): embedded
            if similar and vec is None and gw.embed is not None:
                # before a pooled connection is taken, not while holding one
                vec = await asyncio.get_running_loop().run_in_executor(None, gw.embed, r["prompt"])
                r["prompt_embedding"] = vec
            # Shielded: a lookup given up is left to end by itself (the pool's wait and the
            # server's statement_timeout bound it) and so always hands its connection back.
            # Cancelled inside the pool or a query, connections were lost until the pool had none.
            lookup = asyncio.ensure_future(_cache_query(gw, keys, users, exact, similar, vec, r["requested_model"]))
            _LOOKUPS.add(lookup)
            lookup.add_done_callback(_consume)
            hit = await asyncio.shield(lookup)
    except Exception as err:  # noqa: BLE001 - a cache problem must never cost the user their answer
        log.warning("cache lookup skipped: %s", type(err).__name__)
        headers["x-tm-cache"] = "error"
        return None
    if hit is not None and hit.model is not None and hit.model not in config.models:
        return None  # answered by a model no longer served (a rolled-back fine-tune)
    return hit


async def _cache_query(gw: Proxy, keys: cache.CacheKeys, users: list[str] | None, exact: bool, similar: bool,
                       vec: Any, requested_model: str) -> cache.Hit | None:
    assert gw.cache_pool is not None  # the orchestrator looks up only with a pool
    async with gw.cache_pool.connection() as conn:
        hit = await cache.lookup_exact(conn, keys, users, gw.config) if exact else None
        if hit is None and similar:
            hit = await cache.lookup_semantic(conn, requested_model, keys, vec, users, gw.config)
        return hit


# Lookups still running, held so that one given up is not garbage-collected before it ends.
_LOOKUPS: set[asyncio.Task] = set()


def _consume(task: asyncio.Task) -> None:
    _LOOKUPS.discard(task)
    # A lookup given up may still fail later; its error was already answered as x-tm-cache: error.
    if not task.cancelled():
        task.exception()


def serve_cached(ctx: Ctx, hit: cache.Hit, body: dict) -> Response:
    """The stored answer, in the caller's format (streamed when asked), for nothing; the row says
    where it came from and what the frontier would have charged for it."""
    fmt, stream, row, headers = ctx.fmt, ctx.stream, ctx.row, ctx.reply_headers
    model = hit.model or row.data["requested_model"]
    rid = str(row.data["id"]).replace("-", "")
    how = (f"same request as {hit.source_id}" if hit.kind == "exact"
           else f"prompt {hit.similarity:.3f} similar to {hit.source_id}, an answer the loop scored well")
    route = f"cache:{hit.kind}"
    row.data.update(route=route, route_reason=how)
    row.done(status=200, model=model, provider="cache", upstream_model=None, response_text=hit.text,
             finish_reason="stop" if fmt == "openai" else "end_turn", cost_usd=0.0,
             baseline_cost_usd=hit.baseline_cost_usd, cache_hit=hit.kind, cache_source_id=hit.source_id,
             cache_similarity=hit.similarity, attempts=[])
    headers.update({"x-tm-cache": hit.kind, "x-tm-cache-source": str(hit.source_id), "x-tm-model": model,
                    "x-tm-provider": "cache", "x-tm-route": route, "x-tm-cost-usd": f"{0:.8f}"})
    if stream:
        return text_stream(ctx, hit.text, model, body)
    answer = fm.anthropic_text_message(hit.text, model=model, id="msg_" + rid)
    if fmt == "openai":
        answer = fm.anthropic_response_to_openai(answer, model=model)
        answer["id"] = "chatcmpl-" + rid
    return Response(orjson.dumps(answer), status_code=200, media_type=JSON, headers=headers)
