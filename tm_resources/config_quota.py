"""Provider quotas in tm.yaml (providers.<p>.quota): what is counted, its limit, when it resets."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from tm_resources.config_base import Strict as _Strict
from tm_resources.config_base import TimeZone

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


class QuotaReset(_Strict):
    """When a provider's quota starts again, in the quota's timezone: every day at `hour`, every week on
    `day` at `hour`, every month on `day` (1-28, so every month has it) at `hour`, or once on `date`."""

    every: Literal["daily", "weekly", "monthly", "fixed"]
    hour: int = Field(0, ge=0, le=23)
    day: Weekday | int | None = None
    date: datetime | None = None

    @model_validator(mode="after")
    def _day_fits(self) -> QuotaReset:
        if self.every == "weekly" and not isinstance(self.day, str):
            raise ValueError("a weekly reset needs `day`, a weekday name (e.g. wednesday)")
        if self.every == "monthly" and not (isinstance(self.day, int) and 1 <= self.day <= 28):
            raise ValueError("a monthly reset needs `day`, a day of the month from 1 to 28")
        if self.every in ("daily", "fixed") and self.day is not None:
            raise ValueError(f"a {self.every} reset takes no `day`")
        if self.every == "fixed" and self.date is None:
            raise ValueError("a fixed reset needs `date` (e.g. 2026-12-01T00:00)")
        if self.every != "fixed" and self.date is not None:
            raise ValueError("`date` is for a fixed reset only")
        return self


class QuotaConfig(_Strict):
    """A provider's quota (tm_resources/quotas.py): how much of it is used since its last reset, and
    when it runs out at the current rate."""

    # self-tracked: counted from the request log; manual: what `tm set-usage` says; unlimited: usage
    # shown, never a state; api: asked of the provider (OpenRouter's GET /api/v1/key).
    source: Literal["self-tracked", "manual", "unlimited", "api"] = "self-tracked"
    type: Literal["tokens", "messages", "requests", "budget"] = "tokens"
    # In the type's unit (USD for a budget); none: usage is shown, exhaustion is not forecast.
    limit: float | None = Field(None, gt=0)
    reset: QuotaReset | None = None
    timezone: TimeZone = "UTC"
    warning: float = Field(0.8, gt=0, le=1)
    critical: float = Field(0.95, gt=0, le=1)
    # Ordering among providers (tier 1 first, then priority within it), for `tm status`.
    tier: int = Field(1, ge=1)
    priority: int = Field(1, ge=1)
    # source api: the key endpoint (default: the provider's base_url + /key, OpenRouter's).
    api_url: str | None = None


    @model_validator(mode="after")
    def _thresholds_ordered(self) -> QuotaConfig:
        if self.warning > self.critical:
            raise ValueError(f"warning ({self.warning}) must not be above critical ({self.critical})")
        if self.source == "api" and self.type != "budget":
            raise ValueError("an api source reports credits in USD: set type: budget")
        return self
