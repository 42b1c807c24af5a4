"""The routing rules in force, as the gateway holds them, and the pure routing decision they drive."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from tm_gateway.router import Plan
from tm_gateway.tiers import TierClassifier
from tm_resources import operator_rules
from tm_resources.config import Config, Tier
from tm_resources.db import one

if TYPE_CHECKING:
    from tm_gateway.learned import LearnedRouter

# Actions that steer a task type (escalate beats cascade beats lock_local when several name one), the one that
# picks which local model serves, and the one that steers a user.
TYPE_ACTIONS = ("escalate", "cascade", "lock_local")
SWAP_ACTION = "swap_model"
USER_ACTIONS = ("throttle",)
# A provider whose quota is critical: `auto` and presets move to another model of their chain
# (rule id shift:<provider>).
SHIFT_ACTION = "shift"


@dataclass(frozen=True)
class Rule:
    rule_id: str
    action: str
    task_type: str | None
    user_id: str | None
    model: str | None
    target_model: str | None
    reason: str
    # An operator override's agent (tm_resources/operator_rules.py); the loop's rules name none.
    agent: str | None = None


@dataclass(frozen=True)
class RuleBook:
    """Active rules of the newest materialized hour, indexed for a dict lookup per request."""

    by_type: dict[str, Rule] = field(default_factory=dict)
    # (task type, base model) -> the swap to its fine-tune
    swaps: dict[tuple[str, str], Rule] = field(default_factory=dict)
    throttled: dict[str, Rule] = field(default_factory=dict)
    hour: object = None
    # provider -> the shift rule that moves traffic off it
    shifted: dict[str, Rule] = field(default_factory=dict)
    # Operator overrides: ("agent" | "user", name, task type or None for every type) -> rule.
    overrides: dict[tuple[str, str | None, str | None], Rule] = field(default_factory=dict)

    def override_for(self, agent: str | None, user_id: str, task_type: str | None) -> Rule | None:
        """The operator's override for this request: an agent's before its user's (the agent is the
        work), a task type's before one for every type."""
        if not self.overrides:
            return None
        for kind, who in (("agent", agent), ("user", user_id)):
            if who is None:
                continue
            for t in ((task_type, None) if task_type else (None,)):
                if (rule := self.overrides.get((kind, who, t))) is not None:
                    return rule
        return None

    @classmethod
    def from_rules(cls, rules: list[Rule], hour: object = None, overrides: Sequence[Rule] = ()) -> RuleBook:
        by_type: dict[str, Rule] = {}
        swaps: dict[tuple[str, str], Rule] = {}
        throttled: dict[str, Rule] = {}
        shifted: dict[str, Rule] = {}
        rank = {a: i for i, a in enumerate(TYPE_ACTIONS)}
        for r in rules:
            if r.action == SHIFT_ACTION:
                shifted[r.rule_id.split(":", 1)[-1]] = r
            elif r.action in USER_ACTIONS and r.user_id:
                throttled[r.user_id] = r
            elif r.action == SWAP_ACTION and r.task_type and r.model and r.target_model:
                swaps[(r.task_type, r.model)] = r
            elif r.action in rank and r.task_type:
                held = by_type.get(r.task_type)
                if held is None or rank[r.action] < rank[held.action]:
                    by_type[r.task_type] = r
        by_who = {("agent", r.agent, r.task_type) if r.agent else ("user", r.user_id, r.task_type): r
                  for r in overrides}
        return cls(by_type=by_type, swaps=swaps, throttled=throttled, hour=hour, shifted=shifted, overrides=by_who)

    def __len__(self) -> int:
        return len(self.by_type) + len(self.swaps) + len(self.throttled) + len(self.shifted) + len(self.overrides)


RULE_COLUMNS = "rule_id, action, task_type, user_id, model, target_model, reason"


def load_rulebook(conn: psycopg.Connection) -> RuleBook:
    overrides = [Rule(r.rule_id, r.action, r.task_type, r.user_id, r.model, r.target_model, r.reason, r.agent)
                 for r in operator_rules.list_rules(conn)]
    hour = one(conn.execute("SELECT max(hour) FROM routing_rules"))[0]
    if hour is None:
        return RuleBook.from_rules([], overrides=overrides)
    rows = conn.execute(
        f"SELECT {RULE_COLUMNS} FROM routing_rules WHERE hour = %s AND status = 'active' ORDER BY rule_id",
        (hour,),
    ).fetchall()
    return RuleBook.from_rules([Rule(*r) for r in rows], hour, overrides)


@dataclass(frozen=True)
class Route:
    model: str
    route: str   # what decided: "rule:<rule_id>", "default", "requested", "tier:<TIER>", "learned", ...
    reason: str
    # Models to try after `model` (and its own fallbacks) fail: a preset's or a tier's chain.
    chain: tuple[str, ...] = ()
    # A cascade: `model` answers first; when its answer fails the quick gate, this model answers.
    escalate_to: str | None = None
    # A consensus cascade: these cheap models answer too, alongside `model`; unless all answers pass
    # the gate and agree, `escalate_to` answers.
    consensus: tuple[str, ...] = ()

    @property
    def plan(self) -> Plan:
        """The router's plan for this route, which the cascade stage executes step by step."""
        return Plan((self.model, *self.consensus), self.escalate_to)


def with_consensus(route: Route, config: Config, known: Callable[[str], bool] | None = None) -> Route:
    """A cascade joined by routing.cascade.consensus's cheap models (those not already in it)."""
    known = known or config.models.__contains__
    if route.escalate_to is None:
        return route
    partners = tuple(m for m in dict.fromkeys(config.routing.cascade.consensus)
                     if known(m) and m not in (route.model, route.escalate_to))
    return dataclasses.replace(route, consensus=partners) if partners else route


def local_models(config: Config) -> list[str]:
    return [n for n, m in config.models.items() if m.tier is Tier.local]


def machine_chooses(requested: str, config: Config) -> bool:
    """`auto` and the presets let the machine choose: task-type rules apply to them."""
    return requested == "auto" or requested in config.presets


def default_for(requested: str, user_id: str, agent: str | None, config: Config) -> Route:
    """What a machine-chosen request gets when no rule applies: the preset's first model, else the
    agent's or the user's configured model, else the configured default."""
    if requested in config.presets:
        first, *rest = config.presets[requested]
        return Route(first, f"preset:{requested}", f"the first model of {requested}", chain=tuple(rest))
    if agent and (a := config.agents.get(agent)) and a.model:
        return Route(a.model, f"agent:{agent}", f"agent '{agent}' is configured to use {a.model}")
    if (u := config.users.get(user_id)) and u.model:
        return Route(u.model, f"user:{user_id}", f"user '{user_id}' is configured to use {u.model}")
    return Route(config.defaults.model, "default", "no rule for this task type: the configured default")


def route_request(requested: str, task_type: str | None, user_id: str, book: RuleBook, config: Config,
                  known: Callable[[str], bool] | None = None, agent: str | None = None,
                  explore: float | None = None) -> Route:
    """Which model answers. A throttle applies to every request of its user and keeps it local, even
    for an escalated type; type rules apply to `auto`: escalate sends the type to the frontier,
    cascade has its local model answer first and the frontier when that answer fails the quick gate,
    lock_local keeps it on its local model; a swap then replaces that local model (or the default)
    by the fine-tune that beat it. `known` says whether a model name can be served (the config's
    models, plus registered fine-tunes). `explore`: a uniform draw in [0, 1) for this request; under
    loop.thresholds.explore_share, a type rule's request goes to the other side instead (_explored)."""
    known = known or config.models.__contains__
    auto = machine_chooses(requested, config)
    throttle = book.throttled.get(user_id)
    if throttle is not None:
        named = config.models.get(requested)
        if not auto and named is not None and named.tier is Tier.local:
            return Route(requested, "requested", f"user throttled to local; '{requested}' is local")
        rule = book.by_type.get(task_type) if task_type else None
        local = rule.target_model if rule is not None and rule.action == "lock_local" else None
        kept = local if local and known(local) else _local_default(config, requested)
        return _swapped(Route(kept, f"rule:{throttle.rule_id}", throttle.reason), task_type, book, known)
    if not auto:
        return Route(requested, "requested", "the client named the model")
    # An operator's override is a deliberate choice for this agent's or user's work: it beats the
    # loop's type rules (which the operator can still read in `tm rules`), not a throttle.
    override = book.override_for(agent, user_id, task_type)
    if override is not None and override.target_model and known(override.target_model):
        return _swapped(Route(override.target_model, f"rule:{override.rule_id}", override.reason), task_type,
                        book, known)
    rule = book.by_type.get(task_type) if task_type else None
    if rule is not None and explore is not None and explore < config.loop.thresholds.explore_share:
        if (explored := _explored(rule, book, config, known)):
            return explored
    if rule is not None:
        if rule.action == "escalate":
            target = rule.target_model if rule.target_model and known(rule.target_model) \
                else config.defaults.frontier_model
            if target and known(target):
                return Route(target, f"rule:{rule.rule_id}", rule.reason)
        elif rule.action == "cascade":
            first = rule.model if rule.model and known(rule.model) else config.defaults.model
            top = rule.target_model if rule.target_model and known(rule.target_model) \
                else config.defaults.frontier_model
            route = _swapped(Route(first, f"rule:{rule.rule_id}", rule.reason), task_type, book, known)
            if top and known(top) and top != route.model:
                return with_consensus(dataclasses.replace(route, escalate_to=top), config, known)
            return route
        else:
            target = rule.target_model or rule.model
            if target and known(target):
                return _swapped(Route(target, f"rule:{rule.rule_id}", rule.reason), task_type, book, known)
    return _swapped(default_for(requested, user_id, agent, config), task_type, book, known)


def explore_draw(text: str) -> float:
    """A request's draw for exploration, in [0, 1): from its prompt, so a question asked again is
    routed again as it was (and tests are deterministic), while prompts spread evenly."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def _explored(rule: Rule, book: RuleBook, config: Config, known: Callable[[str], bool]) -> Route | None:
    """A request of a ruled type sent to the other side so the loop keeps the evidence the rule rests
    on: a cascaded type's to its frontier; a locked type's to the frontier the rule names in `model`
    and an escalated type's to the local model named there, which the engine does only while the
    other side could still change the decision (a local model that fails every time, or one right
    every time, is not explored). Never a premium model (it needs a per-user grant)."""
    # escalate and lock_local name the model to explore in `model` (none: not worth it); a cascade
    # always explores its frontier.
    pick = rule.target_model if rule.action == "cascade" else rule.model
    if not pick or not known(pick) or (pick in config.models and config.models[pick].tier is Tier.premium):
        return None
    route = Route(pick, f"explore:{rule.rule_id}",
                  f"exploring {pick} on {rule.task_type} ({config.loop.thresholds.explore_share:.0%} of its traffic "
                  f"keeps evidence on both sides); the rule: {rule.reason}")
    return _swapped(route, rule.task_type, book, known) if rule.action == "escalate" else route


def _swapped(route: Route, task_type: str | None, book: RuleBook, known: Callable[[str], bool]) -> Route:
    swap = book.swaps.get((task_type, route.model)) if task_type else None
    if swap is None or not swap.target_model or not known(swap.target_model):
        return route
    return Route(swap.target_model, f"rule:{swap.rule_id}", swap.reason)


def _local_default(config: Config, requested: str = "auto") -> str:
    # A throttled user stays on the first local model of their preset, else the default if local.
    for m in config.presets.get(requested, []):
        if config.models[m].tier is Tier.local:
            return m
    if config.models[config.defaults.model].tier is Tier.local:
        return config.defaults.model
    local = local_models(config)
    return local[0] if local else config.defaults.model


def auto_route(route: Route, *, tier: tuple[str, float, str] | None, task_type: str | None,
               learned: tuple[str, str] | None, config: Config) -> Route:
    """Refine what `auto` gets when nothing configured for it applied (`route.route == "default"`):
    the learned router's pick when it has one, else the tier's chain; then a cascade where
    configuration asks for one for that tier or task type.

    tier: (TIER, confidence, how it was decided) from the tier classifier, or None;
    learned: (model, reason) from the learned router, or None."""
    if route.route != "default":
        return route
    if learned is not None:
        route = Route(learned[0], "learned", learned[1])
    elif tier is not None and config.routing.tiers.enabled:
        name, confidence, source = tier
        # A tier's value is a TierName; mypy sees the str of the classifier's tuple.
        chain = config.routing.tiers.chains.get(name)  # type: ignore[call-overload]
        if chain:
            route = Route(chain[0], f"tier:{name}", f"tier {name} ({source}, confidence {confidence:.2f})",
                          chain=tuple(chain[1:]))
    cascade = config.routing.cascade
    wants = (tier is not None and tier[0] in cascade.tiers) \
        or (task_type is not None and task_type in cascade.task_types)
    if not wants:
        return route
    first = cascade.first or config.defaults.model
    top = cascade.escalate_to or config.defaults.frontier_model
    if top is None or top == first:
        return route
    why = f"tier {tier[0]}" if tier is not None and tier[0] in cascade.tiers else f"task type {task_type}"
    route = with_consensus(Route(first, "cascade", "", escalate_to=top), config)
    if route.consensus:
        how = (f"{' and '.join(route.plan.tries)} together, then {top} unless every answer passes the gate"
               " and they agree")
    else:
        how = f"{first}, then {top} if the answer fails the gate"
    return dataclasses.replace(route, reason=f"cascade for {why}: {how}")


def tier_of(prompt: str, task_type: str | None, confidence: float, config: Config) -> tuple[str, float, str] | None:
    """The prompt's tier for `auto_route`: the weighted signals (well under 1 ms), or the loop's task
    type (mapped by routing.tiers.task_type_tiers) when the signals are under the confidence bar and
    the task type is surer. None when no tier chain or cascade is configured (nothing to decide)."""
    tiers = config.routing.tiers
    if not tiers.enabled or not (tiers.chains or config.routing.cascade.tiers):
        return None
    mapped = tiers.task_type_tiers.get(task_type) if task_type else None
    fallback = (lambda _prompt: (mapped, confidence)) if mapped else None
    d = TierClassifier(min_confidence=tiers.min_confidence, fallback=fallback).classify(prompt)
    return d.tier.value, d.confidence, "signals" if d.source == "rules" else f"task type {task_type}"


def premium_allowed(user: str, config: Config) -> bool:
    allowed = config.users.get(user)
    return allowed is not None and allowed.premium


def without_premium(route: Route, user: str, config: Config) -> Route:
    """The machine never chooses a premium model for a user who may not use one."""
    if premium_allowed(user, config):
        return route
    models = config.models
    ok = [m for m in (route.model, *route.chain) if models[m].tier is not Tier.premium]
    top = route.escalate_to if route.escalate_to and models[route.escalate_to].tier is not Tier.premium else None
    partners = tuple(m for m in route.consensus if models[m].tier is not Tier.premium) if top else ()
    if ok and ok[0] == route.model and len(ok) == 1 + len(route.chain) and top == route.escalate_to \
            and partners == route.consensus:
        return route
    if not ok:
        default = config.defaults.model
        return Route(default, "default", f"{route.reason}; premium models left out: the default {default}")
    partners = tuple(m for m in partners if m != ok[0])
    return dataclasses.replace(route, model=ok[0], chain=tuple(ok[1:]), escalate_to=top, consensus=partners,
                               reason=f"{route.reason}; premium models left out")


def learned_pick(learned: LearnedRouter | None, vec: Any, user: str, config: Config) -> tuple[str, str] | None:
    """The learned router's model for a prompt's vector, among the models the user may use, and why;
    None when it is off, not trained yet, or unsure."""
    settings = config.routing.learned
    if not settings.enabled or learned is None or vec is None:
        return None
    allowed = [m for m, c in config.models.items() if c.tier is not Tier.premium or premium_allowed(user, config)]
    choice = learned.choose(vec, allowed=allowed, cost_weight=settings.cost_weight, min_quality=settings.min_quality)
    return None if choice is None else (choice.arm, f"learned router: {choice.reason}")
