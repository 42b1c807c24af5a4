"""The route stage: which model answers, from the rules in force, the learned router, the tier
classifier (asking the LLM tier classifier when both are unsure), and who may use premium models."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tm_gateway import quota_routing
from tm_gateway.rules import (
    Route,
    auto_route,
    explore_draw,
    learned_pick,
    machine_chooses,
    premium_allowed,
    route_request,
    tier_of,
    without_premium,
)
from tm_gateway.stages.classify import Classified, classified
from tm_gateway.stages.context import BadRequest, Ctx
from tm_gateway.stages.parse import unknown_model
from tm_gateway.tiers import llm_tier_messages, parse_llm_tier
from tm_resources.completions import TextClient
from tm_resources.config import Tier

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

log = logging.getLogger(__name__)


async def choose_model(gw: Proxy, ctx: Ctx, requested: str, prompt: str, got: Classified | None = None,
                       task_text: str = "") -> Route:
    """Classify the task when the machine chooses, then let the rules in force decide. `task_text`:
    the person's last words when this turn has none of its own (a tool result): it picks the tier,
    so an agent's tool loop stays on the tier of the task it was given."""
    config, row = gw.config, ctx.row
    chooses = machine_chooses(requested, config)
    if not chooses and requested not in config.models:
        raise unknown_model(requested)
    task_type, confidence, vec = None, 0.0, None
    if chooses and gw.classify is not None and prompt:
        vec, task_type, confidence = got or await classified(gw, prompt, row)
    user = row.data["user_id"]
    route = route_request(requested, task_type, user, gw.shared.rules, config, agent=row.data["agent"],
                          explore=explore_draw(prompt or task_text))
    if route.route == "default" and requested == "auto":
        learned = learned_pick(gw.shared.learned, vec, user, config)
        tier = tier_of(prompt or task_text, task_type, confidence, config)
        if tier is not None and learned is None and tier[1] < config.routing.tiers.min_confidence \
                and config.routing.tiers.llm_classifier:
            tier = await _llm_tier(gw, prompt or task_text, tier)
        route = auto_route(route, tier=tier, task_type=task_type, learned=learned, config=config)
        route = without_premium(route, user, config)
    if chooses:
        route = quota_routing.adjust(route, book=gw.shared.rules, config=config, user=user,
                                     prompt=prompt or task_text, task_type=task_type, confidence=confidence)
    row.data["route"] = route.route
    dispatched = row.data.pop("dispatch_reason", None)
    row.data["route_reason"] = f"dispatched to {dispatched}; {route.reason}" if dispatched else route.reason
    if config.models[route.model].tier is Tier.premium and not premium_allowed(user, config):
        raise BadRequest(403, "premium_not_allowed",
                         f"'{route.model}' is a premium model and user '{user}' is not allowed premium "
                         "models; ask an admin to set users.<you>.premium in tm.yaml, or use another model")
    return route


async def _llm_tier(gw: Proxy, prompt: str, unsure: tuple[str, float, str]) -> tuple[str, float, str]:
    """routing.tiers.llm_classifier's tier for a prompt the signals and the task type are both
    unsure about; what they said when it cannot answer in time."""
    tiers = gw.config.routing.tiers
    model = tiers.llm_classifier
    assert model is not None  # asked only when one is configured
    mcfg = gw.config.models[model]
    ep = gw.endpoints[mcfg.provider]
    client = gw.text_clients.get(ep.name)
    if client is None or client.ep != ep:
        client = gw.text_clients[ep.name] = TextClient(ep)
    try:
        async with asyncio.timeout(tiers.llm_timeout_s):
            text = await client.complete(mcfg.upstream or model, llm_tier_messages(prompt), 8)
    except Exception as err:  # noqa: BLE001 - an unsure tier is still a tier; never fail the request
        log.info("tier classifier %s did not answer (%s): keeping %s", model, type(err).__name__, unsure[0])
        return unsure
    asked = parse_llm_tier(text)
    if asked is None:
        return unsure
    return asked.value, unsure[1], f"{model} asked; the signals said {unsure[0]}"
