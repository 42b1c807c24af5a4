"""The classify stage: which agent a request is for (named, or chosen by the dispatcher), and the
prompt's vector and task type, computed once per request off the event loop."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from tm_gateway.dispatch import AGENT_HEADER, apply_agent, resolve_agent
from tm_gateway.stages.context import Ctx
from tm_gateway.stages.log import Row
from tm_gateway.stages.parse import system_and_prompt

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

Classified = tuple[Any, str, float]  # (vector, task type, confidence)


async def classified(gw: Proxy, prompt: str, row: Row) -> Classified:
    """The prompt's (vector, task type, confidence), computed once per request, off the event loop."""
    assert gw.classify is not None  # called only when the gateway has a classifier
    vec, task_type, confidence = await asyncio.get_running_loop().run_in_executor(None, gw.classify, prompt)
    row.data["prompt_embedding"] = vec
    row.data["task_type"] = task_type
    return vec, task_type, confidence


async def agent(gw: Proxy, ctx: Ctx, body: dict) -> tuple[dict, Classified | None]:
    """The agent a request is for: named in x-tm-agent, or chosen by the dispatcher from the prompt
    when it is addressed to `dispatch.name`. The agent's system prompt and default parameters are
    applied; its model is what `auto` means (rules.default_for). Returns the body to send and the
    prompt's classification when dispatching computed it."""
    config, row, headers = gw.config, ctx.row, ctx.reply_headers
    name, dispatch = resolve_agent(ctx.client_headers.get(AGENT_HEADER), config)
    got = None
    if dispatch:
        row.data["agent"] = config.dispatch.name  # unless it finds one
        _, prompt = system_and_prompt(ctx.fmt, body)
        if gw.dispatcher is not None and prompt:
            vec = None
            if gw.classify is not None:
                got = await classified(gw, prompt, row)
                vec = got[0]
            decision = await asyncio.get_running_loop().run_in_executor(
                None, gw.dispatcher.classify, prompt, vec)
            name = decision.agent
            row.data["dispatch_reason"] = decision.reason
            headers["x-tm-dispatch"] = f"{name or 'none'}; confidence {decision.confidence:.2f}"
        else:
            headers["x-tm-dispatch"] = "none; no agent has intents or keywords"
    if name is not None:
        row.data["agent"] = name
        headers["x-tm-agent"] = name
        agent_cfg = config.agents.get(name)
        if agent_cfg is not None:
            body = apply_agent(body, ctx.fmt, agent_cfg)
    return body, got
