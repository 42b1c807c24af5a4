"""What quotas and the operator's local preference change in a machine-chosen route (`auto`, presets):
routing.local_preference, and the loop's shift:<provider> rules that move traffic off a provider whose
quota is critical while another model of the chain can serve. Pure functions of the route, the rules
and the configuration."""

from __future__ import annotations

import dataclasses

from tm_gateway.rules import Route, RuleBook, premium_allowed, tier_of
from tm_gateway.tiers import TierClassifier
from tm_resources.config import Config, Tier


def adjust(route: Route, *, book: RuleBook, config: Config, user: str, prompt: str,
           task_type: str | None = None, confidence: float = 0.0) -> Route:
    """The route after the local preference, then after the shift rules in force."""
    route = with_local_preference(route, config, user, lambda: _tier(prompt, task_type, confidence, config))
    return avoid_shifted(route, book, config, user)


def _tier(prompt: str, task_type: str | None, confidence: float, config: Config) -> str:
    found = tier_of(prompt, task_type, confidence, config)
    return found[0] if found else TierClassifier().classify(prompt).tier.value


def _is_local(model: str, config: Config) -> bool:
    m = config.models.get(model)
    return m is not None and m.tier is Tier.local


def _may_use(model: str, config: Config, user: str) -> bool:
    m = config.models.get(model)
    return m is not None and (m.tier is not Tier.premium or premium_allowed(user, config))


def with_local_preference(route: Route, config: Config, user: str, tier) -> Route:
    """routing.local_preference: `never` leaves local models out (a throttled user's route excepted: that is
    the loop keeping a cost in check); `simple-only` does so except for SIMPLE prompts; `prefer` puts a
    local model first where no rule decided; `when-available` keeps the chains as configured."""
    pref = config.routing.local_preference
    if pref == "when-available" or route.route.startswith("rule:throttle:"):
        return route
    models = [route.model, *route.chain]
    if pref == "prefer":
        if route.route.startswith(("rule:", "explore:")) or _is_local(route.model, config):
            return route
        local = [m for m in models if _is_local(m, config)]
        if not local:
            first = config.defaults.model if _is_local(config.defaults.model, config) else next(
                (m for m, c in config.models.items() if c.tier is Tier.local), None)
            local = [first] if first else []
        if not local:
            return route
        order = local + [m for m in models if m not in local]
        return dataclasses.replace(route, model=order[0], chain=tuple(order[1:]),
                                   reason=f"{route.reason}; local first (routing.local_preference prefer)")
    if pref == "simple-only" and tier() == "SIMPLE":
        return route
    cascades_locally = route.escalate_to is not None and _is_local(route.escalate_to, config)
    if not any(_is_local(m, config) for m in models) and not cascades_locally:
        return route
    kept = [m for m in models if not _is_local(m, config)]
    if route.escalate_to and not _is_local(route.escalate_to, config) and route.escalate_to not in kept:
        # A cascade's local first answer is left out: its escalation answers alone.
        kept.insert(0, route.escalate_to)
    frontier = config.defaults.frontier_model
    if not kept and frontier and not _is_local(frontier, config) and _may_use(frontier, config, user):
        kept = [frontier]
    if not kept:
        return route
    why = "never" if pref == "never" else f"simple-only, and this is a {tier()} prompt"
    return Route(kept[0], route.route, f"{route.reason}; local models left out (routing.local_preference {why})",
                 chain=tuple(kept[1:]))


def avoid_shifted(route: Route, book: RuleBook, config: Config, user: str) -> Route:
    """A route whose first model's provider is shifted (its quota critical) starts instead with the first
    model of its chain, or of that model's fallbacks, on another provider; the shifted model stays last,
    so it still answers when the others cannot."""
    if not book.shifted:
        return route
    first = config.models.get(route.model)
    rule = book.shifted.get(first.provider) if first is not None else None
    if first is None or rule is None:
        return route
    candidates = [*route.chain, *first.fallbacks]
    for alt in candidates:
        alt_cfg = config.models.get(alt)
        if alt_cfg is None or alt_cfg.provider in book.shifted or not _may_use(alt, config, user):
            continue
        rest = [m for m in dict.fromkeys(candidates) if m != alt]
        return dataclasses.replace(route, model=alt, route=f"rule:{rule.rule_id}",
                                   reason=f"{route.model} avoided: {rule.reason}", chain=(*rest, route.model))
    return route
