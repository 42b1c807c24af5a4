"""The learning loop's settings in tm.yaml (loop:): how answers are scored and when the decision engine acts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from tm_resources.config_base import Strict as _Strict


class ScoringWeights(_Strict):
    """Weights of the five quality signals; a missing signal's weight is spread over the others."""

    coherence: float = Field(0.25, ge=0)
    completion: float = Field(0.25, ge=0)
    brevity: float = Field(0.20, ge=0)
    reprompt: float = Field(0.20, ge=0)
    cost_efficiency: float = Field(0.10, ge=0)


class TypeThresholds(_Strict):
    """A task type's own quality bar, in place of the global escalate_below / lock_above."""

    escalate_below: float = Field(ge=0, le=1)
    lock_above: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _number_is_the_bar(cls, data: Any) -> Any:
        return {"escalate_below": data} if isinstance(data, int | float) and not isinstance(data, bool) else data

    @model_validator(mode="after")
    def _ordered(self) -> TypeThresholds:
        if self.lock_above is not None and self.lock_above < self.escalate_below:
            raise ValueError(f"lock_above ({self.lock_above}) must not be under escalate_below ({self.escalate_below})")
        return self


class Thresholds(_Strict):
    """Every number the decision engine compares against."""

    escalate_below: float = Field(0.5, ge=0, le=1)      # local average quality under this ...
    escalate_min_samples: int = Field(10, ge=1)         # ... over at least this many requests
    lock_above: float = Field(0.8, ge=0, le=1)          # local average quality over this ...
    lock_min_samples: int = Field(20, ge=1)             # ... over at least this many requests
    # A local type averaging between escalate_below and lock_above over escalate_min_samples+
    # requests is cascaded: its local model answers first, the frontier when that answer fails
    # the gateway's quick gate. False: such a type keeps the default route.
    cascade_borderline: bool = True
    # When the completion judge (loop.judge_model) has given verdicts on completion_min_samples+ answers
    # of a type's best local model, the type is decided on that judge's rate of completed answers, not on
    # the composite (which hides wrong answers behind coherent, brief ones): escalate when the rate is
    # under completion_escalate_below, or more than completion_max_gap under the frontier's rate on the
    # same type (frontier judged completion_min_samples+ times, the gap widened by
    # completion_confidence_z standard errors); lock local when within
    # completion_lock_gap of the frontier's (or, no frontier evidence, over completion_lock_above);
    # in between, cascade. Fewer verdicts: the composite rules above.
    completion_min_samples: int = Field(10, ge=1)
    completion_escalate_below: float = Field(0.6, ge=0, le=1)
    completion_max_gap: float = Field(0.1, ge=0, le=1)
    completion_lock_gap: float = Field(0.03, ge=0, le=1)
    completion_lock_above: float = Field(0.9, ge=0, le=1)
    # The gap to the frontier is taken this many standard errors wide before a type is handed to a
    # local model (0: on the estimate alone).
    completion_confidence_z: float = Field(1.0, ge=0)
    # This share of `auto` requests of a type under an escalate, cascade or lock rule goes to another
    # model (a local one, or the frontier), so both sides keep the evidence the rule rests on.
    explore_share: float = Field(0.05, ge=0, le=0.5)
    coaching_below: float = Field(0.4, ge=0, le=1)      # a user's prompt quality under this ...
    coaching_days: int = Field(3, ge=1)                 # ... on each of this many days in a row
    finetune_min_samples: int = Field(50, ge=1)         # a pattern this common ...
    finetune_min_quality: float = Field(0.75, ge=0, le=1)  # ... and this well served
    anomaly_cost_multiple: float = Field(2.0, gt=1)     # a user's hour costing this many times their baseline
    anomaly_min_cost_usd: float = Field(0.05, ge=0)     # ignore anomalies cheaper than this in absolute terms
    swap_min_margin: float = Field(0.0, ge=0)           # a fine-tune must beat its base by at least this
    cache_min_quality: float = Field(0.8, ge=0, le=1)   # answers the semantic cache may serve
    # Per task type, the quality its local models must reach (a number: escalate_below; or
    # {escalate_below, lock_above}); a type not listed uses the global pair above.
    task_types: dict[str, TypeThresholds] = Field(default_factory=dict)

    def for_type(self, task_type: str) -> tuple[float, float]:
        """(escalate_below, lock_above) for a task type; a bar above the global lock_above lifts it too."""
        own = self.task_types.get(task_type)
        if own is None:
            return self.escalate_below, self.lock_above
        return own.escalate_below, own.lock_above if own.lock_above is not None else max(self.lock_above,
                                                                                          own.escalate_below)


class LoopConfig(_Strict):
    # manual: no rule is applied; dry-run: rules are written as proposals; auto: applied.
    mode: Literal["manual", "dry-run", "auto"] = "auto"
    weights: ScoringWeights = ScoringWeights()
    thresholds: Thresholds = Thresholds()
    # A configured model that judges task completion; none (or unreachable): the signal is missing.
    judge_model: str | None = None
    judge_concurrency: int = Field(8, ge=1)
    # How far back patterns look (hours) and how soon a follow-up counts as a re-prompt (seconds).
    pattern_window_h: int = Field(168, ge=1)
    reprompt_window_s: int = Field(600, ge=1)
    # Answers are embedded only for the coherence signal: their opening tokens with the faster int8
    # model keep an hour of 10,000 requests near a minute on 2 cores (docs/benchmarks.md). Prompts
    # always use the gateway's fp32 model, so their vectors and task types match the gateway's.
    answer_embedding_tokens: int = Field(48, ge=8, le=256)
    answer_embedding_precision: Literal["fp32", "int8"] = "int8"
    # Grades: the day that requests_today etc. count resets at local midnight of this zone.
    timezone: str = "UTC"
    # Seed examples per task type; none: the built-in ones (tm_resources/task_seeds.yaml).
    task_seeds: dict[str, list[str]] | None = None
    # The first hour the loop's hourly partitions offer (UTC unless the time says otherwise); none:
    # the hour of the first logged request (tm_resources/loop_start.py).
    start: datetime | None = None
