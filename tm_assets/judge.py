"""The cheap LLM judge for task completion, called through the same provider endpoints as the gateway
(tm_resources/completions.py: the anthropic SDK or httpx).
An unreachable or failing judge yields None for that answer: the signal is missing, never invented."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from tm_resources.completions import TextClient, Unreachable
from tm_resources.config import Config
from tm_resources.providers import endpoint_for

log = logging.getLogger(__name__)


async def _judge_all(config: Config, model: str, conversations: Sequence[list[dict]],
                     parse: Callable[[str], float | None], concurrency: int, timeout_s: float) -> list[float | None]:
    mcfg = config.models[model]
    ep = endpoint_for(mcfg.provider, config.providers[mcfg.provider])
    upstream = mcfg.upstream or model
    sem = asyncio.Semaphore(concurrency)
    unreachable = False

    async def one(client: TextClient, messages: list[dict]) -> float | None:
        nonlocal unreachable
        if unreachable:
            return None
        async with sem:
            if unreachable:
                return None
            try:
                text = await client.complete(upstream, messages, 16)
            except Unreachable:
                # One refused connection means the judge is down: stop trying for this batch.
                unreachable = True
                return None
        return None if text is None else parse(text)

    async with TextClient(ep, timeout_s=timeout_s) as client:
        results = await asyncio.gather(*(one(client, m) for m in conversations))
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
