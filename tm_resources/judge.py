"""The cheap LLM judge for task completion, called through the same provider endpoints as the gateway.
An unreachable or failing judge yields None for that answer: the signal is missing, never invented."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp
import orjson

from tm_resources import formats as fm
from tm_resources.config import Config
from tm_resources.providers import endpoint_for

log = logging.getLogger(__name__)


async def _judge_all(config: Config, model: str, conversations: Sequence[list[dict]],
                     parse: Callable[[str], float | None], concurrency: int, timeout_s: float) -> list[float | None]:
    mcfg = config.models[model]
    ep = endpoint_for(mcfg.provider, config.providers[mcfg.provider])
    upstream = mcfg.upstream or model
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(ep.connect_timeout_s, timeout_s))
    unreachable = False

    async def one(session: aiohttp.ClientSession, messages: list[dict]) -> float | None:
        nonlocal unreachable
        if unreachable:
            return None
        body = {"model": upstream, "messages": messages, "max_tokens": 16, "temperature": 0}
        if ep.kind == "anthropic":
            body = fm.openai_request_to_anthropic(body, model=upstream, default_max_tokens=16)
        async with sem:
            if unreachable:
                return None
            try:
                async with session.post(ep.url, data=orjson.dumps(body), headers=ep.headers()) as resp:
                    if resp.status >= 400:
                        return None
                    answer = orjson.loads(await resp.read())
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError):
                # One refused connection means the judge is down: stop trying for this batch.
                unreachable = True
                return None
            except (aiohttp.ClientError, ValueError):
                return None
        text = fm.response_text_anthropic(answer) if ep.kind == "anthropic" else fm.response_text_openai(answer)
        return parse(text)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, m) for m in conversations))
    if unreachable:
        log.warning("judge model '%s' is unreachable: task completion is missing for this batch", model)
    return list(results)


def judge_answers(config: Config, conversations: Sequence[list[dict]], parse: Callable[[str], float | None],
                  *, timeout_s: float = 30.0) -> list[float | None]:
    """One score 0..1 (or None) per conversation, from `config.loop.judge_model`; all None when there is none."""
    model = config.loop.judge_model
    if model is None or not conversations:
        return [None] * len(conversations)
    return asyncio.run(_judge_all(config, model, conversations, parse, config.loop.judge_concurrency, timeout_s))
