"""POST /v1/messages/count_tokens: the request's input tokens for the model it names, counted by the
provider when it has an endpoint for it (Anthropic's), else by a local tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response

from tm_gateway.rules import default_for, machine_chooses
from tm_gateway.stages.call import use
from tm_gateway.stages.context import JSON, BadRequest, Ctx
from tm_gateway.stages.parse import claude_code_session, counted_texts, json_body, resolve_alias, unknown_model
from tm_resources import formats as fm
from tm_resources.embedder import word_pieces
from tm_resources.providers import Endpoint

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy


async def count_tokens(gw: Proxy, request: Request, ctx: Ctx) -> Response:
    """The count, and header x-tm-token-counter saying who counted. Its row has route 'count_tokens' and
    no tokens or cost, so spend and the loop (which reads only completion endpoints) leave it out."""
    row, headers = ctx.row, ctx.reply_headers
    body = await json_body(gw, request, ctx)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest(400, "invalid_request", "'model' is required and must be a non-empty string")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest(400, "invalid_request", "'messages' is required and must be a non-empty array")
    body, alias = resolve_alias(gw, ctx, body)
    if row.data["session_id"] is None:
        row.data["session_id"] = claude_code_session(body.get("metadata"), ctx.client_headers)
    requested = body["model"]
    if machine_chooses(requested, gw.config):
        # Which model answers depends on the prompt; counting need not classify it: the model
        # the request would get with no rule, tier or cascade (a preset's first, the default).
        model = default_for(requested, row.data["user_id"], row.data["agent"], gw.config).model
    elif requested in gw.config.models:
        model = requested
    else:
        raise unknown_model(requested)
    mcfg = gw.config.models[model]
    ep = gw.endpoints[mcfg.provider]
    use(gw, ctx, model, ep)
    n, counter = None, "local"
    if ep.kind == "anthropic":
        n, counter = await _provider_count(gw, body, mcfg.upstream or model, ep, ctx.client_headers)
    if n is None:
        text = "\n".join(counted_texts(body))
        n = await asyncio.get_running_loop().run_in_executor(None, word_pieces, text)
    headers["x-tm-token-counter"] = counter
    row.done(status=200, route="count_tokens", attempts=[],
             route_reason="; ".join(filter(None, (alias, f"{n} input tokens, counted by {counter}"))))
    return Response(orjson.dumps({"input_tokens": n}), status_code=200, media_type=JSON, headers=headers)


async def _provider_count(gw: Proxy, body: dict, upstream: str, ep: Endpoint,
                          h: dict[str, str]) -> tuple[int | None, str]:
    """Anthropic's own count_tokens; (None, why not) when it cannot answer, and the local count
    stands in. A request it refuses as malformed is the caller's to fix: answered as it said."""
    url = ep.url.removesuffix("/messages") + "/messages/count_tokens"
    try:
        payload = orjson.dumps({**fm.merge_system_messages(body), "model": upstream})
    except fm.FormatError as err:
        raise BadRequest(400, "invalid_request", str(err)) from None
    try:
        async with gw.session.post(url, data=payload, headers=ep.headers(0, h),
                                   timeout=gw.timeouts[ep.name]) as resp:
            data = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as err:
        return None, f"local ({ep.name} unreachable: {type(err).__name__})"
    if status == 400:
        raise BadRequest(400, "upstream_bad_request", gw.scrub(fm.error_message_from_body(data)))
    with contextlib.suppress(ValueError, AttributeError):
        n = orjson.loads(data).get("input_tokens") if status == 200 else None
        if isinstance(n, int) and not isinstance(n, bool):
            return n, ep.name
    return None, f"local ({ep.name} answered {status})"
