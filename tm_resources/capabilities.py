"""Capability scores per model (coding, reasoning, creative, instruction following, context, speed):
learned from the loop's patterns and the request log where there is evidence, seeded from tm.yaml where
there is not, a local model's seed scaled by the quantization its tag names."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from tm_resources.config import Config, Tier

QUALITY_CAPABILITIES = ("coding", "reasoning", "creative", "instruction_following")
CAPABILITIES = (*QUALITY_CAPABILITIES, "context", "speed")

# The context score's scale: a window this small scores 0, this large 1 (log scale in between).
_CONTEXT_FLOOR, _CONTEXT_TOP = 4096, 1_000_000


@dataclass(frozen=True)
class Score:
    value: float | None
    source: str          # learned | seeded | learned+seeded | window | none
    samples: int = 0     # the loop's scored answers (speed: timed answers) behind a learned score


@dataclass(frozen=True)
class ModelScores:
    model: str
    provider: str
    tier: str
    quantization: str | None        # the tag read from the model's name (Q4_K_M), if any
    quantization_factor: float
    scores: dict[str, Score] = field(default_factory=dict)

    def value(self, capability: str) -> float | None:
        s = self.scores.get(capability)
        return None if s is None else s.value

    def as_dict(self) -> dict:
        return {"model": self.model, "provider": self.provider, "tier": self.tier,
                "quantization": self.quantization, "quantization_factor": self.quantization_factor,
                "scores": {c: {"value": None if s.value is None else round(s.value, 3), "source": s.source,
                               "samples": s.samples} for c, s in self.scores.items()}}


@dataclass(frozen=True)
class Evidence:
    """What the loop has seen: per (model, task type) scored answers and their average quality, and
    per model the median output tokens per second of answered requests."""

    quality: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    speed: dict[str, tuple[int, float]] = field(default_factory=dict)


def quantization_of(name: str, factors: dict[str, float]) -> tuple[str | None, float]:
    """The quantization tag in a model's name (`qwen2.5-coder:7b-instruct-q4_K_M`) and its factor; the
    longest tag that stands alone in the name wins, so Q4_K_M is not read as Q4_K."""
    lowered = name.lower()
    for tag in sorted(factors, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(tag.lower())}(?![a-z0-9])", lowered):
            return tag, factors[tag]
    return None, 1.0


def context_score(window: int) -> float:
    return min(1.0, max(0.0, math.log(window / _CONTEXT_FLOOR) / math.log(_CONTEXT_TOP / _CONTEXT_FLOOR)))


def _blend(learned: tuple[int, float] | None, seed: float | None, prior_weight: float) -> Score:
    if learned and learned[0]:
        n, avg = learned
        if seed is not None:
            return Score((n * avg + prior_weight * seed) / (n + prior_weight), "learned+seeded", n)
        return Score(avg, "learned", n)
    return Score(seed, "seeded" if seed is not None else "none", 0)


def model_scores(config: Config, evidence: Evidence) -> list[ModelScores]:
    """Every configured model's scores. The quantization factor scales the seed only: the loop's own
    evidence was measured on the quantized model as served, so scaling it again would count it twice."""
    settings = config.optimize.capabilities
    out = []
    for name, m in config.models.items():
        seeds = m.capabilities
        tag, factor = None, 1.0
        if m.tier is Tier.local:
            for label in (seeds.quantization, m.upstream, name):
                if label and (found := quantization_of(label, settings.quantization))[0]:
                    tag, factor = found
                    break
        scores: dict[str, Score] = {}
        for cap in QUALITY_CAPABILITIES:
            types = [t for t, c in settings.task_types.items() if c == cap]
            seen = [evidence.quality[(name, t)] for t in types if (name, t) in evidence.quality]
            n = sum(s for s, _ in seen)
            learned = (n, sum(s * q for s, q in seen) / n) if n else None
            seed = getattr(seeds, cap)
            scores[cap] = _blend(learned, None if seed is None else seed * factor, settings.prior_weight)
        scores["context"] = Score(seeds.context, "seeded") if seeds.context is not None \
            else Score(context_score(m.context_window), "window")
        tps = evidence.speed.get(name)
        learned_speed = (tps[0], tps[1] / (tps[1] + settings.speed_half_tps)) if tps else None
        scores["speed"] = _blend(learned_speed, seeds.speed, settings.prior_weight)
        out.append(ModelScores(name, m.provider, m.tier.value, tag, factor, scores))
    return out


def score_for_type(scores: ModelScores, task_type: str, config: Config) -> Score | None:
    """The capability score that speaks for a task type (coding for coding, reasoning for math ...)."""
    cap = config.optimize.capabilities.task_types.get(task_type)
    return scores.scores.get(cap) if cap else None


def read_evidence(conn: psycopg.Connection, *, now: datetime | None = None, speed_window_h: int = 168) -> Evidence:
    """The loop's newest per-(task type, model) patterns, and each model's median output speed over
    the last `speed_window_h` hours of answered, uncached requests."""
    quality = {
        (model, task_type): (samples, avg)
        for model, task_type, samples, avg in conn.execute(
            "SELECT model, task_type, samples, avg_quality FROM patterns WHERE scope = 'type_model'"
            " AND hour = (SELECT max(hour) FROM patterns) AND samples > 0 AND avg_quality IS NOT NULL")
    }
    since = (now or datetime.now().astimezone()) - timedelta(hours=speed_window_h)
    speed = {
        model: (n, float(tps))
        for model, n, tps in conn.execute(
            "SELECT model, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY"
            " output_tokens * 1000.0 / greatest(latency_ms - coalesce(ttft_ms, 0), 1)) FROM requests"
            " WHERE ts >= %s AND status = 200 AND output_tokens > 0 AND latency_ms > 0 AND cache_hit IS NULL"
            " AND model IS NOT NULL GROUP BY model", (since,))
    }
    return Evidence(quality, speed)
