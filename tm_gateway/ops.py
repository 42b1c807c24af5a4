"""The operator's questions answered as plain data, for the `tm` commands and the MCP tools alike:
providers and their models' capability scores, the cheaper-model analysis, optimize, the rules."""

from __future__ import annotations

from datetime import datetime

import psycopg

from tm_resources import operator_rules
from tm_resources.capabilities import CAPABILITIES, model_scores, read_evidence
from tm_resources.config import Config
from tm_resources.db import one
from tm_resources.optimize import KINDS, proposals, run_analysis


def providers_report(conn: psycopg.Connection, config: Config, *, now: datetime | None = None) -> list[dict]:
    """Each provider with its models: tier, price per million tokens, capability scores."""
    scores = {s.model: s for s in model_scores(config, read_evidence(conn, now=now))}
    out = []
    for name, p in config.providers.items():
        models = []
        for m, mc in config.models.items():
            if mc.provider != name:
                continue
            models.append({"model": m, "upstream": mc.upstream or m, "tier": mc.tier.value,
                           "context_window": mc.context_window,
                           "price": {"input": mc.price.input, "output": mc.price.output},
                           **{k: v for k, v in scores[m].as_dict().items() if k not in ("model", "provider", "tier")}})
        out.append({"provider": name, "kind": p.kind, "base_url": p.base_url, "models": models})
    return out


def provider_rows(report: list[dict]) -> list[dict]:
    """One table row per model, scores to two places ('-' where nothing is known)."""
    rows = []
    for p in report:
        for m in p["models"]:
            row = {"provider": p["provider"], "model": m["model"], "tier": m["tier"],
                   "$/M in": m["price"]["input"], "$/M out": m["price"]["output"],
                   "quant": m["quantization"] or ""}
            for cap in CAPABILITIES:
                value = m["scores"][cap]["value"]
                row[cap] = None if value is None else f"{value:.2f}" + ("*" if "learned" in
                                                                           m["scores"][cap]["source"] else "")
            rows.append(row)
    return rows


def analysis_report(conn: psycopg.Connection, config: Config, kind: str = "all", *,
                    now: datetime | None = None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"type '{kind}': one of {', '.join(KINDS)}")
    return run_analysis(conn, config, kinds=KINDS[kind], now=now).as_dict()


def optimize_report(conn: psycopg.Connection, config: Config, *, apply: bool = False, safe_only: bool = False,
                    by: str, now: datetime | None = None) -> dict:
    """The overrides the analysis proposes; with `apply`, written as operator rules the gateway obeys."""
    analysis = run_analysis(conn, config, now=now)
    offered = proposals(analysis, safe_only=safe_only)
    applied = []
    if apply:
        for p in offered:
            rule = operator_rules.apply_override(conn, by=by, agent=p.agent, user_id=p.user_id,
                                                 task_type=p.task_type, model=p.model, target_model=p.target_model,
                                                 reason=p.reason, evidence=p.evidence)
            applied.append(rule.as_dict())
    return {"applied": apply, "safe_only": safe_only, "monthly_saving_usd": analysis.monthly_saving_usd,
            "proposals": [p.as_dict() for p in offered], "rules": applied}


def rules_report(conn: psycopg.Connection, *, include_inactive: bool = False) -> dict:
    """The loop's rules of its newest hour (active and proposed; with include_inactive, manual mode's
    too) and the operator's rules in force (with include_inactive, the reverted ones too)."""
    hour = one(conn.execute("SELECT max(hour) FROM routing_rules"))[0]
    statuses = ["active", "proposed", "inactive"] if include_inactive else ["active", "proposed"]
    loop = []
    if hour is not None:
        cur = conn.execute(
            "SELECT rule_id, action, status, task_type, user_id, model, target_model, reason, evidence"
            " FROM routing_rules WHERE hour = %s AND status = ANY(%s) ORDER BY action, rule_id", (hour, statuses))
        names = [d.name for d in cur.description or []]
        loop = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    ops = [r.as_dict() for r in operator_rules.list_rules(conn, include_reverted=include_inactive)]
    return {"hour": hour, "loop_rules": loop, "operator_rules": ops}


def revert_rule(conn: psycopg.Connection, rule_id: str, *, by: str) -> dict:
    return operator_rules.revert(conn, rule_id, by=by).as_dict()
