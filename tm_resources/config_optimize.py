"""`tm analyze` / `tm optimize` and capability scores in tm.yaml (optimize:)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tm_resources.config_base import Strict as _Strict

QualityCapability = Literal["coding", "reasoning", "creative", "instruction_following"]
_TASK_CAPABILITIES: dict[str, QualityCapability] = {
    "coding": "coding", "math": "reasoning", "reasoning": "reasoning", "writing": "creative",
    "chat": "instruction_following", "extraction": "instruction_following", "summarization": "instruction_following"}


class CapabilityScoring(_Strict):
    """How capability scores are learned (tm_resources/capabilities.py)."""

    # Quality a quantization keeps of the full-precision model, by the tag in a local model's name
    # (llama3.1:8b-instruct-q4_K_M); matched without regard to case, longest tag first.
    quantization: dict[str, float] = Field(default_factory=lambda: {
        "Q8_0": 0.99, "Q6_K": 0.97, "Q5_K_M": 0.95, "Q4_K_M": 0.92, "Q3_K_M": 0.85})
    # Which capability the loop's task types show (types not listed show none).
    task_types: dict[str, QualityCapability] = Field(default_factory=lambda: dict(_TASK_CAPABILITIES))
    # A seeded score counts as this many scored requests against the loop's own evidence.
    prior_weight: float = Field(10.0, ge=0)
    # Output tokens per second that score 0.5 for speed (faster approaches 1).
    speed_half_tps: float = Field(40.0, gt=0)

    @field_validator("quantization")
    @classmethod
    def _factors(cls, value: dict[str, float]) -> dict[str, float]:
        for tag, factor in value.items():
            if not 0 < factor <= 1:
                raise ValueError(f"{tag}: a quantization factor is in (0, 1], not {factor}")
        return value


class OptimizeConfig(_Strict):
    """`tm analyze` / `tm optimize`: which work a cheaper model serves as well (tm_resources/optimize.py)."""

    # Days of scored requests read.
    window_days: float = Field(7.0, gt=0)
    # A group (agent or user) needs this many requests of a task type on one model to be worth a rule.
    min_requests: int = Field(5, ge=1)
    # A cheaper model needs this many scored answers of the type to be compared at all ...
    min_samples: int = Field(5, ge=1)
    # ... and this many for --safe-only, with its quality's lower bound (confidence_z standard
    # errors) no more than max_quality_drop under the current model's average.
    safe_min_samples: int = Field(20, ge=1)
    confidence_z: float = Field(1.0, ge=0)
    # "As well": the cheaper model's average quality at most this far under the current one's.
    max_quality_drop: float = Field(0.02, ge=0, le=1)
    capabilities: CapabilityScoring = CapabilityScoring()
