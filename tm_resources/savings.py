"""What the team spent against the all-frontier baseline (the same requests on the configured frontier
model), the saving, and the average quality the loop scored, overall or per user, agent, model or task type;
shared by `tm savings` and the dashboard."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import psycopg

from tm_resources.config import Config

GROUPINGS = {
    "user": "r.user_id",
    "agent": "coalesce(r.agent, '(no agent)')",
    "model": "coalesce(r.model, '(no model)')",
    "type": "coalesce(t.task_type, r.task_type, '(untyped)')",
}

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> timedelta:
    """'7d', '24h', '30m', '2w' as a time span; ValueError naming the accepted forms otherwise."""
    m = _SINCE.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--since {text!r}: give a positive number and a unit, m, h, d or w (e.g. 7d, 24h, 90m)")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


@dataclass(frozen=True)
class Savings:
    group: str | None          # None: the whole team
    requests: int
    cost_usd: float
    baseline_usd: float        # the same requests, every one on the frontier model
    saving_usd: float
    saving_pct: float | None   # of the baseline; None when the baseline is zero
    avg_quality: float | None  # the loop's composite 0..1 over the scored answers
    scored: int

    def as_dict(self) -> dict:
        return asdict(self)


def _query(group_sql: str) -> str:
    # Every row's cost counts (a cascade's unserved first answer was paid for); the baseline counts the
    # answers the client got, each once, at the frontier price its row recorded. A row without one (an
    # older row, an unpriced fine-tune) has its tokens priced here at the configured frontier price, or
    # its own cost when no frontier model is configured, so it claims no saving.
    return f"""
SELECT {group_sql} AS grp,
       count(*) FILTER (WHERE r.served) AS requests,
       coalesce(sum(r.cost_usd), 0) AS cost,
       coalesce(sum(r.baseline_cost_usd) FILTER (WHERE r.served AND r.baseline_cost_usd IS NOT NULL), 0) AS known,
       coalesce(sum(r.cost_usd) FILTER (WHERE r.served AND r.baseline_cost_usd IS NULL), 0) AS unpriced_cost,
       coalesce(sum(r.input_tokens) FILTER (WHERE r.served AND r.baseline_cost_usd IS NULL), 0) AS i,
       coalesce(sum(r.output_tokens) FILTER (WHERE r.served AND r.baseline_cost_usd IS NULL), 0) AS o,
       coalesce(sum(r.cache_read_tokens) FILTER (WHERE r.served AND r.baseline_cost_usd IS NULL), 0) AS cr,
       coalesce(sum(r.cache_write_tokens) FILTER (WHERE r.served AND r.baseline_cost_usd IS NULL), 0) AS cw,
       avg(s.quality) FILTER (WHERE r.served) AS quality,
       count(s.quality) FILTER (WHERE r.served) AS scored
FROM requests r
LEFT JOIN scored_requests s ON s.request_id = r.id
LEFT JOIN task_types t ON t.request_id = r.id
WHERE r.ts >= %s AND r.ts < %s
GROUP BY 1
ORDER BY 1"""


def savings(conn: psycopg.Connection, config: Config, since: datetime, until: datetime,
            by: str | None = None) -> tuple[Savings, list[Savings]]:
    """The whole team's figures over [since, until), and one per group when `by` names a grouping."""
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"--by {by!r}: one of {', '.join(GROUPINGS)}")
    frontier = config.models.get(config.defaults.frontier_model or "")

    def figures(group: str | None, requests: int, cost: float, known: float, unpriced_cost: float,
                tokens: tuple[int, int, int, int], quality: float | None, scored: int) -> Savings:
        rest = frontier.price.cost(*tokens) if frontier is not None else unpriced_cost
        baseline = known + rest
        saving = baseline - cost
        return Savings(group, requests, round(cost, 8), round(baseline, 8), round(saving, 8),
                       round(100 * saving / baseline, 2) if baseline > 0 else None,
                       None if quality is None else round(quality, 4), scored)

    def run(group_sql: str) -> list[Savings]:
        rows = conn.execute(_query(group_sql), (since, until)).fetchall()
        return [figures(g, n, float(c), float(k), float(u), (int(i), int(o), int(cr), int(cw)),
                        None if q is None else float(q), int(sc))
                for g, n, c, k, u, i, o, cr, cw, q, sc in rows]

    total = run("NULL::text")
    return (total[0] if total else figures(None, 0, 0.0, 0.0, 0.0, (0, 0, 0, 0), None, 0),
            run(GROUPINGS[by]) if by else [])
