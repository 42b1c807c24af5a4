"""Budgets, teams and token pools as policy: which limits apply to a request, their calendar periods,
standard tokens and billing markups (pure functions), and the run-time limits `tm budgets` keeps in Postgres."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg

from tm_resources import formats as fm
from tm_resources.config import BudgetsConfig, Config, MarkupBand, Tier

log = logging.getLogger(__name__)

PERIODS = ("day", "week", "month")
SCOPES = ("user", "team", "key", "pool")
# `tm budgets set user '*' day 5`: every user's limit, unless a user has their own.
EVERY_USER = "*"
_PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly"}


def period_bounds(period: str, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar period holding `now` in `zone`: its start and the next one's (when it resets)."""
    local = now.astimezone(zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = midnight, midnight + timedelta(days=1)
    elif period == "week":
        start = midnight - timedelta(days=local.weekday())
        end = start + timedelta(days=7)
    else:
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # Re-localised from the wall time, so a period that spans a DST change still starts at midnight.
    return (start.replace(tzinfo=None).replace(tzinfo=zone), end.replace(tzinfo=None).replace(tzinfo=zone))


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """One budget (USD) or pool (standard tokens) that applies to a request."""

    scope: str      # user | team | key | pool
    name: str       # the user, team or key id
    period: str     # day | week | month
    amount: float

    @property
    def subject(self) -> str:
        return f"pool:{self.name}" if self.scope == "pool" else f"{self.scope}:{self.name}:{self.period}"

    def describe(self) -> str:
        if self.scope == "pool":
            return f"team {self.name}'s monthly pool of {self.amount:,.0f} standard tokens"
        return f"{self.scope} {self.name}'s {_PERIOD_WORDS[self.period]} budget of ${self.amount:,.2f}"


class BudgetBook:
    """The limits in force: tm.yaml's `budgets`, overridden by the rows of `budgets` (re-read by every
    replica when `tm_state_versions` says they changed), and each key's team."""

    def __init__(self, config: Config):
        self.config = config
        self.settings: BudgetsConfig = config.budgets
        self.zone = ZoneInfo(self.settings.timezone)
        self._stored: dict[tuple[str, str, str], float] = {}
        self.key_teams: dict[str, str] = {}
        self._cache: dict[tuple[str, str | None, str], tuple[Limit, ...]] = {}
        self.active = False
        self._recompute()

    def _recompute(self) -> None:
        s = self.settings
        yaml_any = any(_limits(x) for x in (s.user, *s.users.values(), *s.teams.values(), *s.keys.values())) \
            or bool(s.pools)
        self.active = yaml_any or bool(self._stored)
        self._cache = {}

    def replace(self, stored: dict[tuple[str, str, str], float], key_teams: dict[str, str] | None = None) -> None:
        self._stored = stored
        if key_teams is not None:
            self.key_teams = key_teams
        self._recompute()

    def team_of(self, key_id: str | None, user: str) -> str | None:
        """A key's own team first, else the user's in tm.yaml."""
        team = self.key_teams.get(key_id) if key_id else None
        if team:
            return team
        u = self.config.users.get(user)
        return u.team if u else None

    def _amount(self, scope: str, name: str, period: str) -> float | None:
        got = self._stored.get((scope, name, period))
        if got is not None:
            return got
        s = self.settings
        if scope == "pool":
            pool = s.pools.get(name)
            return float(pool) if pool is not None else None
        table = {"user": s.users, "team": s.teams, "key": s.keys}[scope]
        if name in table and getattr(table[name], period) is not None:
            return getattr(table[name], period)
        if scope == "user":
            got = self._stored.get(("user", EVERY_USER, period))
            return got if got is not None else getattr(s.user, period)
        return None

    def limits_for(self, user: str, team: str | None, key_id: str) -> tuple[Limit, ...]:
        """Every budget and pool that applies to a request of `user` (of `team`) with key `key_id`."""
        at = (user, team, key_id)
        got = self._cache.get(at)
        if got is None:
            found = []
            for scope, name in (("user", user), ("team", team), ("key", key_id)):
                if name is None:
                    continue
                for period in PERIODS:
                    amount = self._amount(scope, name, period)
                    if amount is not None:
                        found.append(Limit(scope, name, period, amount))
            if team is not None and (pool := self._amount("pool", team, "month")) is not None:
                found.append(Limit("pool", team, "month", pool))
            got = self._cache[at] = tuple(found)
        return got

    def rows(self) -> list[dict]:
        """Every limit configured, tm.yaml's and stored, for `tm budgets list`."""
        s = self.settings
        out: dict[tuple[str, str, str], dict] = {}
        for scope, table in (("user", s.users), ("team", s.teams), ("key", s.keys)):
            for name, lim in table.items():
                for period, amount in _limits(lim).items():
                    out[(scope, name, period)] = {"scope": scope, "subject": name, "period": period,
                                                  "amount": amount, "source": "tm.yaml"}
        for period, amount in _limits(s.user).items():
            out[("user", EVERY_USER, period)] = {"scope": "user", "subject": EVERY_USER, "period": period,
                                                 "amount": amount, "source": "tm.yaml"}
        for team, tokens in s.pools.items():
            out[("pool", team, "month")] = {"scope": "pool", "subject": team, "period": "month",
                                            "amount": float(tokens), "source": "tm.yaml"}
        for (scope, name, period), amount in self._stored.items():
            out[(scope, name, period)] = {"scope": scope, "subject": name, "period": period, "amount": amount,
                                          "source": "tm budgets set"}
        return sorted(out.values(), key=lambda r: (SCOPES.index(r["scope"]), r["subject"], PERIODS.index(r["period"])))


def _limits(lim) -> dict[str, float]:
    return {p: getattr(lim, p) for p in PERIODS if getattr(lim, p) is not None}


# ---------------------------------------------------------------- what a request may cost

def estimate_input_tokens(*texts: str | None) -> int:
    """An upper estimate of a request's input tokens without a tokenizer: tokens of English, code and
    JSON run 3-4 bytes, so a byte count over 2 stays above the real count."""
    return math.ceil(sum(len(t.encode()) for t in texts if t) / 2)


def max_cost(config: Config, models: list[str], input_tokens: int, max_tokens: int) -> float:
    """The most a request may cost on any of `models` (what it may fall back to). No model reads more
    than its context window: that bounds the estimate of a prompt of base64 images, say."""
    return max((config.models[m].price.cost(min(input_tokens, config.models[m].context_window), max_tokens)
                for m in models), default=0.0)


def free(config: Config, model: str) -> bool:
    p = config.models[model].price
    return p.input == 0 and p.output == 0 and not p.cache_read and not p.cache_write


# ---------------------------------------------------------------- billing

def reference_model(config: Config) -> str | None:
    return config.budgets.billing.reference_model or config.defaults.frontier_model


def standard_tokens(config: Config, model: str, usage: fm.Usage) -> float:
    """Tokens weighted by price against the reference model: one of its input tokens is one standard
    token, one of its output tokens too; a model at twice its prices counts each token twice."""
    ref = reference_model(config)
    if ref is None:
        return float(usage.input_tokens + usage.output_tokens + usage.cache_read_tokens + usage.cache_write_tokens)
    r, p = config.models[ref].price, config.models[model].price

    def weight(mine: float | None, theirs: float | None, fallback_mine: float, fallback_theirs: float) -> float:
        mine = fallback_mine if mine is None else mine
        theirs = fallback_theirs if theirs is None else theirs
        return mine / theirs if theirs else 1.0

    return (usage.input_tokens * weight(p.input, r.input, p.input, r.input)
            + usage.output_tokens * weight(p.output, r.output, p.output, r.output)
            + usage.cache_read_tokens * weight(p.cache_read, r.cache_read, p.input, r.input)
            + usage.cache_write_tokens * weight(p.cache_write, r.cache_write, p.input, r.input))


def band_price(config: Config, model: str) -> float:
    """The price a model's band is read from: the mean of its input and output price per million tokens."""
    p = config.models[model].price
    return (p.input + p.output) / 2


def markup(bands: list[MarkupBand], price: float) -> float:
    for band in bands:
        if band.up_to is None or price <= band.up_to:
            return band.markup
    return bands[-1].markup if bands else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Bill:
    billing: str
    billed_usd: float
    standard_tokens: float   # drawn from the team's pool (included and overage)


def bill(config: Config, model: str, cost: float, usage: fm.Usage, *, pool: float | None,
         pool_used: float) -> Bill:
    """What a row is billed. Included tokens are paid for by the team's pool; the share past it is
    overage at the model's band markup; premium models are billed outside the pool at theirs. A team
    without a pool pays included models at cost."""
    tier = config.models[model].tier
    billing = config.budgets.billing
    if tier is Tier.local:
        return Bill("local", cost, 0.0)
    if tier is Tier.premium:
        return Bill("premium", cost * (1 + markup(billing.premium_markup, band_price(config, model))), 0.0)
    std = standard_tokens(config, model, usage)
    if pool is None:
        return Bill("included", cost, std)
    over = min(std, max(0.0, pool_used + std - pool))
    if over <= 0 or std <= 0:
        return Bill("included", 0.0, std)
    rate = 1 + markup(billing.markup, band_price(config, model))
    return Bill("overage", cost * (over / std) * rate, std)


# ---------------------------------------------------------------- stored limits (`tm budgets`)

STORED_SQL = "SELECT scope, subject, period, amount FROM budgets"
KEY_TEAMS_SQL = "SELECT id, team FROM api_keys WHERE revoked_at IS NULL AND team IS NOT NULL"


def stored_map(rows) -> dict[tuple[str, str, str], float]:
    return {(scope, subject, period): amount for scope, subject, period, amount in rows}


def set_limit(conn: psycopg.Connection, scope: str, subject: str, period: str, amount: float) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'")
    if scope == "pool":
        if period != "month":
            raise ValueError("a pool is monthly: tm budgets set pool TEAM month TOKENS")
    elif period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not '{period}'")
    if not subject.strip():
        raise ValueError("name the user, team or key")
    if scope != "user" and subject == EVERY_USER:
        raise ValueError("'*' (every user) is for user budgets only")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"the amount must be a number, 0 or more, not {amount}")
    conn.execute("INSERT INTO budgets (scope, subject, period, amount) VALUES (%s, %s, %s, %s)"
                 " ON CONFLICT (scope, subject, period) DO UPDATE SET amount = excluded.amount, set_at = now()",
                 (scope, subject, period, amount))
    conn.commit()


def clear_limit(conn: psycopg.Connection, scope: str, subject: str, period: str | None) -> int:
    """Remove stored limits (tm.yaml's default applies again); returns how many were removed."""
    cur = conn.execute("DELETE FROM budgets WHERE scope = %s AND subject = %s AND (%s::text IS NULL OR period = %s)",
                       (scope, subject, period, period))
    conn.commit()
    return cur.rowcount


def usage_now(conn: psycopg.Connection, limits: list[Limit], zone: ZoneInfo, now: datetime) -> dict[str, float]:
    """subject -> what it has used in its current period."""
    if not limits:
        return {}
    subjects = [lim.subject for lim in limits]
    starts = [period_bounds(lim.period, now, zone)[0] for lim in limits]
    rows = conn.execute("SELECT u.subject, u.used FROM budget_usage u"
                        " JOIN unnest(%s::text[], %s::timestamptz[]) AS w(subject, period_start)"
                        " ON u.subject = w.subject AND u.period_start = w.period_start", (subjects, starts))
    return dict(rows.fetchall())


def report(conn: psycopg.Connection, config: Config, now: datetime | None = None,
           for_users: Iterable[str] = ()) -> list[dict]:
    """Every budget and pool in force (tm.yaml's and `tm budgets set`'s), what it used in its current
    period, the fraction and when it resets: what `tm budgets list` and the dashboard's gauges show.
    `for_users`: also each of these users' own row where only the every-user default ('*') applies."""
    now = now or datetime.now(UTC)
    book = BudgetBook(config)
    book.replace(stored_map(conn.execute(STORED_SQL)))
    rows = book.rows()
    own_rows = {(r["scope"], r["subject"], r["period"]) for r in rows}
    for default in [r for r in rows if r["subject"] == EVERY_USER]:
        rows += [{**default, "subject": u, "source": f"{default['source']} (every user)"} for u in for_users
                 if ("user", u, default["period"]) not in own_rows]
    # '*' (every user's default) is listed as set; each user's own counter is what is used.
    own = [r for r in rows if r["subject"] != EVERY_USER]
    limits = [Limit(r["scope"], r["subject"], r["period"], r["amount"]) for r in own]
    used = usage_now(conn, limits, book.zone, now)
    for r, lim in zip(own, limits, strict=True):
        r["used"] = used.get(lim.subject, 0.0)
        r["fraction"] = r["used"] / r["amount"] if r["amount"] else None
        r["resets_at"] = period_bounds(r["period"], now, book.zone)[1]
    return rows
