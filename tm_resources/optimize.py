"""Which agents and users send work a cheaper model serves as well (`tm analyze`), and the overrides
that would move it (`tm optimize`): plain functions over the loop's scored requests and the config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pandas as pd
import psycopg

from tm_resources.capabilities import ModelScores, model_scores, read_evidence, score_for_type
from tm_resources.config import Config, Tier

Kind = Literal["agent", "user"]
Basis = Literal["evidence", "capabilities"]
KINDS: dict[str, tuple[Kind, ...]] = {"all": ("agent", "user"), "agents": ("agent",), "users": ("user",)}
_MONTH_DAYS = 30.0


@dataclass(frozen=True)
class Opportunity:
    kind: Kind                 # an agent's work, or a user's own (requests without an agent)
    who: str
    task_type: str
    model: str                 # what the work goes to now
    requests: int              # the group's requests of this type on that model the machine routed
    cost_usd: float
    proposed_model: str
    proposed_cost_usd: float   # the same tokens at the proposed model's prices
    saving_usd: float
    monthly_saving_usd: float
    basis: Basis                # measured quality on the type, or capability scores
    safe: bool                 # the evidence says quality holds (enough samples, lower bound within the drop)
    reason: str
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Analysis:
    window_days: float
    observed_days: float       # the span of scored traffic the monthly figures extrapolate from
    kinds: tuple[Kind, ...]
    opportunities: list[Opportunity]
    scored_requests: int

    @property
    def monthly_saving_usd(self) -> float:
        return round(sum(o.monthly_saving_usd for o in self.opportunities), 6)

    def as_dict(self) -> dict:
        return {"window_days": self.window_days, "observed_days": round(self.observed_days, 3),
                "type": "all" if len(self.kinds) == 2 else self.kinds[0] + "s",
                "scored_requests": self.scored_requests, "monthly_saving_usd": self.monthly_saving_usd,
                "opportunities": [o.as_dict() for o in self.opportunities]}


SCORED_SQL = """
SELECT r.ts, r.user_id, r.agent, r.requested_model, r.model, t.task_type, s.quality, s.completion,
       r.cost_usd, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens
FROM scored_requests s
JOIN task_types t ON t.request_id = s.request_id
JOIN requests r ON r.id = s.request_id AND r.ts = s.ts
WHERE s.ts >= %s AND s.ts <= %s AND s.quality IS NOT NULL AND r.served AND r.cache_hit IS NULL
  AND r.model IS NOT NULL
"""


def read_scored(conn: psycopg.Connection, since: datetime, until: datetime) -> pd.DataFrame:
    cur = conn.execute(SCORED_SQL, (since, until))
    return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description or []])


def _machine_routed(requested: str | None, config: Config) -> bool:
    """Whether an override can move this request: the machine chose its model (auto, a preset, or an
    alias of one). A client that names its model keeps it."""
    if not requested:
        return False
    meant, _ = config.resolve_alias(requested)
    return meant == "auto" or meant in config.presets


def _model_stats(df: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """Team-wide quality per (task type, model): samples, mean, standard error, judge verdicts."""
    out = {}
    for (task_type, model), g in df.groupby(["task_type", "model"]):
        q = g["quality"].astype(float)
        judged = g["completion"].dropna().astype(float)
        out[(task_type, model)] = {
            "samples": int(len(q)), "avg_quality": round(float(q.mean()), 4),
            "se": float(q.std(ddof=1) / math.sqrt(len(q))) if len(q) > 1 else float("inf"),
            "judged": int(len(judged)), "completion": round(float(judged.mean()), 4) if len(judged) else None}
    return out


def _cost(config: Config, model: str, g: pd.DataFrame) -> float:
    return config.models[model].price.cost(int(g["input_tokens"].sum()), int(g["output_tokens"].sum()),
                                           int(g["cache_read_tokens"].sum()), int(g["cache_write_tokens"].sum()))


def analyze(df: pd.DataFrame, config: Config, *, kinds: tuple[Kind, ...] = ("agent", "user"),
            scores: list[ModelScores] | None = None, now: datetime | None = None) -> Analysis:
    """Per agent (and per user, for requests without an agent) and task type: the cheapest configured
    model, not premium, that serves the type as well as the model the work goes to now (team-wide
    quality on the type within optimize.max_quality_drop; with too few scored answers of its own, its
    capability score for the type), and what the same tokens would have cost on it."""
    s = config.optimize
    window_days = s.window_days
    now = now or datetime.now(UTC)
    if df.empty:
        return Analysis(window_days, 0.0, kinds, [], 0)
    first = pd.Timestamp(df["ts"].min()).to_pydatetime()
    observed = min(max(now - first, timedelta(hours=1)), timedelta(days=window_days))
    observed_days = observed.total_seconds() / 86400
    stats = _model_stats(df)
    by_model = {m.model: m for m in scores or []}
    routed = df[df["requested_model"].map(lambda r: _machine_routed(r, config))
                & df["model"].isin(list(config.models))]
    out: list[Opportunity] = []
    for kind in kinds:
        col = "agent" if kind == "agent" else "user_id"
        part = routed[routed["agent"].notna()] if kind == "agent" else routed[routed["agent"].isna()]
        for (who, task_type, model), g in part.groupby([col, "task_type", "model"]):
            if len(g) < s.min_requests:
                continue
            best = _cheaper(config, stats, by_model, task_type, model, g)
            if best is None:
                continue
            proposed, proposed_cost, basis, safe, evidence = best
            cost = float(g["cost_usd"].sum())
            saving = cost - proposed_cost
            evidence["group_avg_quality"] = round(float(g["quality"].mean()), 4)
            monthly = saving * _MONTH_DAYS / observed_days
            why = (f"{proposed} scores {evidence['proposed']['avg_quality']:.2f} on {task_type} over "
                   f"{evidence['proposed']['samples']} answers against {model}'s "
                   f"{evidence['current']['avg_quality']:.2f} over {evidence['current']['samples']}"
                   if basis == "evidence" else
                   f"{proposed}'s {evidence['capability']} score {evidence['proposed']['capability']:.2f} against "
                   f"{model}'s {evidence['current']['capability']:.2f} (too few scored {task_type} answers on "
                   f"{proposed} to measure)")
            out.append(Opportunity(
                kind=kind, who=str(who), task_type=task_type, model=model, requests=len(g),
                cost_usd=round(cost, 6), proposed_model=proposed, proposed_cost_usd=round(proposed_cost, 6),
                saving_usd=round(saving, 6), monthly_saving_usd=round(monthly, 4), basis=basis, safe=safe,
                reason=f"{kind} {who}'s {task_type} work: {why}; ${monthly:.2f} a month at this rate",
                evidence=evidence))
    out.sort(key=lambda o: (-o.monthly_saving_usd, o.kind, o.who, o.task_type))
    return Analysis(window_days, observed_days, kinds, out, len(df))


def _cheaper(config: Config, stats: dict, by_model: dict[str, ModelScores], task_type: str, model: str,
             g: pd.DataFrame) -> tuple[str, float, Basis, bool, dict[str, Any]] | None:
    s = config.optimize
    cost = float(g["cost_usd"].sum())
    current = stats.get((task_type, model))
    found: list[tuple[float, float, str, Basis, bool, dict[str, Any]]] = []
    for name, m in config.models.items():
        if name == model or m.tier is Tier.premium:
            continue
        proposed_cost = _cost(config, name, g)
        if proposed_cost >= cost:
            continue
        theirs = stats.get((task_type, name))
        if theirs and theirs["samples"] >= s.min_samples and current:
            bar = current["avg_quality"] - s.max_quality_drop
            if theirs["avg_quality"] < bar:
                continue
            both_judged = theirs["judged"] >= s.min_samples and current["judged"] >= s.min_samples
            if both_judged and theirs["completion"] < current["completion"] - s.max_quality_drop:
                continue
            safe = theirs["samples"] >= s.safe_min_samples and \
                theirs["avg_quality"] - s.confidence_z * theirs["se"] >= bar
            evidence: dict[str, Any] = {"current": _public(current), "proposed": _public(theirs)}
            found.append((proposed_cost, -theirs["avg_quality"], name, "evidence", safe, evidence))
            continue
        mine_s, theirs_s = by_model.get(model), by_model.get(name)
        mine_c = score_for_type(mine_s, task_type, config) if mine_s else None
        theirs_c = score_for_type(theirs_s, task_type, config) if theirs_s else None
        if mine_c is None or theirs_c is None or mine_c.value is None or theirs_c.value is None:
            continue
        if theirs_c.value < mine_c.value - s.max_quality_drop:
            continue
        cap = config.optimize.capabilities.task_types[task_type]
        evidence = {"capability": cap,
                    "current": {**(_public(current) if current else {}), "capability": round(mine_c.value, 4),
                                "capability_source": mine_c.source},
                    "proposed": {**(_public(theirs) if theirs else {}), "capability": round(theirs_c.value, 4),
                                 "capability_source": theirs_c.source}}
        found.append((proposed_cost, -theirs_c.value, name, "capabilities", False, evidence))
    if not found:
        return None
    # Measured evidence first, then the cheapest, then the better scored.
    proposed_cost, _, name, basis, safe, evidence = min(found, key=lambda f: (f[3] != "evidence", f[0], f[1], f[2]))
    return name, proposed_cost, basis, safe, evidence


def _public(stat: dict) -> dict:
    return {k: v for k, v in stat.items() if k != "se"}


@dataclass(frozen=True)
class Proposal:
    agent: str | None
    user_id: str | None
    task_type: str
    model: str
    target_model: str
    safe: bool
    reason: str
    evidence: dict

    def as_dict(self) -> dict:
        return asdict(self)


def proposals(analysis: Analysis, *, safe_only: bool = False) -> list[Proposal]:
    """The overrides `tm optimize` offers: one per opportunity (--safe-only: those whose evidence says
    quality holds)."""
    out = []
    for o in analysis.opportunities:
        if safe_only and not o.safe:
            continue
        evidence = {**o.evidence, "requests": o.requests, "cost_usd": o.cost_usd,
                    "proposed_cost_usd": o.proposed_cost_usd, "monthly_saving_usd": o.monthly_saving_usd,
                    "basis": o.basis, "safe": o.safe}
        out.append(Proposal(agent=o.who if o.kind == "agent" else None, user_id=o.who if o.kind == "user" else None,
                            task_type=o.task_type, model=o.model, target_model=o.proposed_model, safe=o.safe,
                            reason=o.reason, evidence=evidence))
    return out


def run_analysis(conn: psycopg.Connection, config: Config, *, kinds: tuple[Kind, ...] = ("agent", "user"),
                 now: datetime | None = None) -> Analysis:
    """analyze() over the configured window of the database's scored requests, with capability scores."""
    now = now or datetime.now(UTC)
    df = read_scored(conn, now - timedelta(days=config.optimize.window_days), now)
    return analyze(df, config, kinds=kinds, scores=model_scores(config, read_evidence(conn, now=now)), now=now)
