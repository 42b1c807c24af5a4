"""Spend control in tm.yaml: rate limits and loop detection (limits:), budgets, team pools and billing (budgets:)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tm_resources.config_base import Strict as _Strict
from tm_resources.config_base import TimeZone


class LimitValues(_Strict):
    """One set of rate limits; a limit left out is no limit."""

    requests_per_minute: int | None = Field(None, ge=1)  # per key
    tokens_per_turn: int | None = Field(None, ge=1)      # input (estimated) plus max_tokens
    turns_per_hour: int | None = Field(None, ge=1)       # per agent
    concurrent_turns: int | None = Field(None, ge=1)     # per agent


class LoopDetection(_Strict):
    """The same tool call (name and arguments) answered `repeats` times within `window_s` in one
    session is refused; repeats 0 turns it off."""

    repeats: int = Field(3, ge=0)
    window_s: float = Field(60.0, gt=0)


class LimitsConfig(LimitValues):
    """Rate limits for everyone, overridden per user (their keys) and per agent (x-tm-agent)."""

    users: dict[str, LimitValues] = Field(default_factory=dict)
    agents: dict[str, LimitValues] = Field(default_factory=dict)
    loop: LoopDetection = LoopDetection()
    # How long a turn in flight holds its place when its worker dies before it ends.
    lease_s: int = Field(900, ge=1)


Period = Literal["day", "week", "month"]


class Limits(_Strict):
    """USD per calendar day, week (from Monday) and month, in budgets.timezone; none: no limit."""

    day: float | None = Field(None, ge=0)
    week: float | None = Field(None, ge=0)
    month: float | None = Field(None, ge=0)


class MarkupBand(_Strict):
    """A markup for models whose price (the mean of input and output, USD per million tokens) is up to `up_to`."""

    up_to: float | None = Field(None, gt=0)   # none: any price above the bands before
    markup: float = Field(ge=0)


class BillingConfig(_Strict):
    """How rows are billed (`billed_usd`, `billing`): tokens of included models draw from their team's
    monthly pool, counted in standard tokens (each token weighted by its model's price against
    `reference_model`'s); past the pool, overage at the markup of the model's price band; premium
    models outside the pool at their own bands."""

    reference_model: str | None = None   # default: defaults.frontier_model
    markup: list[MarkupBand] = Field(default_factory=lambda: [
        MarkupBand(up_to=0.5, markup=0.35), MarkupBand(up_to=1.2, markup=0.25), MarkupBand(markup=0.20)])
    premium_markup: list[MarkupBand] = Field(default_factory=lambda: [
        MarkupBand(up_to=20.0, markup=0.10), MarkupBand(markup=0.08)])

    @field_validator("markup", "premium_markup")
    @classmethod
    def _bands_cover_every_price(cls, bands: list[MarkupBand]) -> list[MarkupBand]:
        limits = [b.up_to for b in bands]
        if not bands or limits[-1] is not None or None in limits[:-1]:
            raise ValueError("bands in rising up_to order, the last without up_to (every price above)")
        rising = [u for u in limits[:-1] if u is not None]
        if rising != sorted(rising):
            raise ValueError("bands in rising up_to order")
        return bands


class BudgetsConfig(_Strict):
    """Spend limits the gateway enforces (tm_gateway/stages/guard.py), the defaults that `tm budgets set`
    overrides at run time; teams are users.<id>.team, or a key's own (`tm keys create --team`)."""

    # The calendar the day, week and month periods follow (an IANA zone name).
    timezone: TimeZone = "UTC"
    # Every user's limits unless users.<id> sets their own.
    user: Limits = Limits()
    users: dict[str, Limits] = Field(default_factory=dict)
    teams: dict[str, Limits] = Field(default_factory=dict)
    # By key id (k_...; `tm keys list`).
    keys: dict[str, Limits] = Field(default_factory=dict)
    # A team's monthly token pool, in standard tokens.
    pools: dict[str, int] = Field(default_factory=dict)
    # Fractions of a budget or pool at which an alert fires, once per period; from the first, the
    # response header x-tm-budget-used says how much is used.
    alert_at: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9, 1.0, 1.5])
    # A reservation not settled within this long (its gateway died) is given back by another replica;
    # a request still running then (a stream longer than this) is counted at its real cost all the same.
    reservation_ttl_s: float = Field(900.0, gt=0)
    billing: BillingConfig = BillingConfig()


    @field_validator("alert_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("fractions of a budget, above 0 (0.5 is half)")
        return sorted(set(value))
