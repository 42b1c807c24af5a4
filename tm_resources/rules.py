"""The routing rules in force, as the gateway holds them, and the pure routing decision they drive."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from tm_resources.config import Config, Tier

# Actions that steer a task type, and the one that steers a user.
TYPE_ACTIONS = ("swap_model", "escalate", "lock_local")
USER_ACTIONS = ("throttle",)


@dataclass(frozen=True)
class Rule:
    rule_id: str
    action: str
    task_type: str | None
    user_id: str | None
    model: str | None
    target_model: str | None
    reason: str


@dataclass(frozen=True)
class RuleBook:
    """Active rules of the newest materialized hour, indexed for a dict lookup per request."""

    by_type: dict[str, Rule] = field(default_factory=dict)
    throttled: dict[str, Rule] = field(default_factory=dict)
    hour: object = None

    @classmethod
    def from_rules(cls, rules: list[Rule], hour: object = None) -> RuleBook:
        by_type: dict[str, Rule] = {}
        throttled: dict[str, Rule] = {}
        # A swap beats an escalation beats a lock when several name one type.
        rank = {a: i for i, a in enumerate(TYPE_ACTIONS)}
        for r in rules:
            if r.action in USER_ACTIONS and r.user_id:
                throttled[r.user_id] = r
            elif r.action in rank and r.task_type:
                held = by_type.get(r.task_type)
                if held is None or rank[r.action] < rank[held.action]:
                    by_type[r.task_type] = r
        return cls(by_type=by_type, throttled=throttled, hour=hour)

    def __len__(self) -> int:
        return len(self.by_type) + len(self.throttled)


RULE_COLUMNS = "rule_id, action, task_type, user_id, model, target_model, reason"


def load_rulebook(conn: psycopg.Connection) -> RuleBook:
    hour = conn.execute("SELECT max(hour) FROM routing_rules").fetchone()[0]
    if hour is None:
        return RuleBook()
    rows = conn.execute(
        f"SELECT {RULE_COLUMNS} FROM routing_rules WHERE hour = %s AND status = 'active' ORDER BY rule_id",
        (hour,),
    ).fetchall()
    return RuleBook.from_rules([Rule(*r) for r in rows], hour)


@dataclass(frozen=True)
class Route:
    model: str
    route: str   # what decided: "rule:<rule_id>", "default", "requested"
    reason: str


def local_models(config: Config) -> list[str]:
    return [n for n, m in config.models.items() if m.tier is Tier.local]


def route_request(requested: str, task_type: str | None, user_id: str, book: RuleBook, config: Config) -> Route:
    """Which model answers: rules first (a throttle applies to every request; type rules to `auto`),
    then what the request named, then the configured default."""
    throttle = book.throttled.get(user_id)
    auto = requested == "auto"
    if throttle is not None:
        named = config.models.get(requested)
        if not auto and named is not None and named.tier is Tier.local:
            return Route(requested, "requested", f"user throttled to local; '{requested}' is local")
        target = throttle.target_model if throttle.target_model in config.models else _local_default(config)
        return Route(target, f"rule:{throttle.rule_id}", throttle.reason)
    if auto:
        rule = book.by_type.get(task_type) if task_type else None
        if rule is not None:
            target = _rule_target(rule, config)
            if target is not None:
                return Route(target, f"rule:{rule.rule_id}", rule.reason)
        return Route(config.defaults.model, "default", "no rule for this task type: the configured default")
    return Route(requested, "requested", "the client named the model")


def _local_default(config: Config) -> str:
    if config.models[config.defaults.model].tier is Tier.local:
        return config.defaults.model
    local = local_models(config)
    return local[0] if local else config.defaults.model


def _rule_target(rule: Rule, config: Config) -> str | None:
    if rule.action == "escalate":
        target = rule.target_model or config.defaults.frontier_model
    elif rule.action == "lock_local":
        target = rule.target_model or rule.model or _local_default(config)
    else:  # swap_model
        target = rule.target_model
    return target if target in config.models else None
