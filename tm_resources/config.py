"""Token Machine's configuration: one YAML file, validated once, secrets only from the environment."""

from __future__ import annotations

import fnmatch
import os
from datetime import datetime
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The example tm.yaml ships inside the package, so a wheel installed anywhere runs as it is; setuptools
# installs package data as plain files, which callers read and copy as a Path.
EXAMPLE_CONFIG = Path(str(resources.files("tm_resources").joinpath("tm.yaml")))


class ConfigError(Exception):
    """A configuration problem, worded so the operator knows which key to fix."""


class _Strict(BaseModel):
    # A misspelt key is the commonest config mistake: refuse it rather than ignore it.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(str, Enum):
    local = "local"
    included = "included"
    premium = "premium"


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)
    cache_read: float | None = Field(None, ge=0)
    cache_write: float | None = Field(None, ge=0)

    def cost(self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0) -> float:
        # Providers that do not price cache tokens separately bill them as input.
        cr = self.input if self.cache_read is None else self.cache_read
        cw = self.input if self.cache_write is None else self.cache_write
        return (input_tokens * self.input + output_tokens * self.output + cache_read * cr + cache_write * cw) / 1e6


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
    timezone: str = "UTC"
    warning: float = Field(0.8, gt=0, le=1)
    critical: float = Field(0.95, gt=0, le=1)
    # Ordering among providers (tier 1 first, then priority within it), for `tm status`.
    tier: int = Field(1, ge=1)
    priority: int = Field(1, ge=1)
    # source api: the key endpoint (default: the provider's base_url + /key, OpenRouter's).
    api_url: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{value}' is not a time zone (an IANA name such as Europe/Paris or UTC)") from None
        return value

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> QuotaConfig:
        if self.warning > self.critical:
            raise ValueError(f"warning ({self.warning}) must not be above critical ({self.critical})")
        if self.source == "api" and self.type != "budget":
            raise ValueError("an api source reports credits in USD: set type: budget")
        return self


class ProviderConfig(_Strict):
    kind: Literal["anthropic", "openai"]
    base_url: str
    # Names of environment variables holding API keys, tried in order (key rotation).
    api_key_env: list[str] = Field(default_factory=list)
    timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    quota: QuotaConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_env_name_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("api_key_env"), str):
            data = {**data, "api_key_env": [data["api_key_env"]]}
        return data

    def api_keys(self) -> list[str]:
        return [v for name in self.api_key_env if (v := os.environ.get(name))]


class ModelCapabilities(_Strict):
    """What a model is known to be good at, 0..1 each, before the loop has seen it work (a benchmark,
    the vendor's card). For a quantized local model, the full-precision model's scores: the factor
    of its tag (optimize.capabilities.quantization) is applied to them."""

    coding: float | None = Field(None, ge=0, le=1)
    reasoning: float | None = Field(None, ge=0, le=1)
    creative: float | None = Field(None, ge=0, le=1)
    instruction_following: float | None = Field(None, ge=0, le=1)
    context: float | None = Field(None, ge=0, le=1)
    speed: float | None = Field(None, ge=0, le=1)
    # The quantization tag (Q4_K_M) when the model's name does not carry it (Ollama's `:latest`).
    quantization: str | None = None


class ModelConfig(_Strict):
    provider: str
    # The model's name at the provider, when it differs from the name clients use.
    upstream: str | None = None
    tier: Tier = Tier.local
    context_window: int = Field(8192, gt=0)
    price: Price = Price()
    # Local weights mlx-lm can fine-tune for this model (a Hugging Face-format folder), if any.
    mlx_path: str | None = None
    # Models to try, in order, when this one fails (see tm_gateway/fallback.py for what each failure does).
    fallbacks: list[str] = Field(default_factory=list)
    # Seed capability scores (0..1) until the loop has evidence of its own (tm_resources/capabilities.py).
    capabilities: ModelCapabilities = ModelCapabilities()


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=1, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    default_max_tokens: int = Field(4096, gt=0)
    # How often a replica checks whether keys or rules changed in Postgres.
    refresh_interval_s: float = Field(1.0, gt=0)
    # A deployment that failed is skipped for this long; a 429 is waited out for at most this long.
    cooldown_s: float = Field(30.0, ge=0)
    max_retry_wait_s: float = Field(2.0, ge=0)
    # Classify the task of `model: "auto"` requests (embedding + nearest examples) so rules can apply.
    classify_auto: bool = True
    # Failed logins from one client address: this many are free, then each blocks it for 1, 2, 4 ... s.
    login_free_failures: int = Field(5, ge=0)
    login_backoff_max_s: float = Field(60.0, gt=0)


class RedactConfig(_Strict):
    """What is replaced by a placeholder before a row is stored (tm_resources/redact.py)."""

    # API keys, tokens, passwords, private keys: [SECRET].
    secrets: bool = True
    # Emails, phone numbers, IP addresses, card numbers.
    pii: bool = False


class LogConfig(_Strict):
    batch_max_rows: int = Field(1000, gt=0)
    flush_interval_ms: int = Field(100, gt=0)
    # Where rows wait when Postgres is unreachable; default: $TM_HOME/spool.
    spool_dir: str | None = None
    # Past this size on disk, rows that would be spooled (or kept as rejected) are dropped, counted
    # in /healthz and logged: a full disk must not take the gateway down with it.
    spool_max_mb: int = Field(1024, gt=0)
    rejected_max_mb: int = Field(100, gt=0)
    # Every row is appended to a local journal before it is queued, so that kill -9 loses none:
    # "write" survives the process dying (the kernel holds the bytes), "fsync" also a power cut, at
    # a disk flush per request; "off" loses the rows still queued (up to one flush interval's).
    journal: Literal["off", "write", "fsync"] = "write"
    redact: RedactConfig = RedactConfig()

    @field_validator("journal", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML reads a bare `off` as false.
        return "off" if value is False else value


class SemanticCacheConfig(_Strict):
    enabled: bool = True
    # Cosine similarity of the prompts (MiniLM) above which a stored answer is served. On real
    # ShareGPT prompts 0.99 served no wrong answer, 0.98 one in 19, 0.95 one in 7 (docs/benchmarks.md).
    threshold: float = Field(0.99, gt=0, le=1)
    # Answers of the last this many hours, among those the loop scored at least
    # loop.thresholds.cache_min_quality (the loop's cache_entries asset).
    window_h: int = Field(24, ge=1)
    # `auto` and preset requests are embedded anyway (task type); embedding the prompt of a request
    # that names its model costs 7-20 ms of CPU, so those use the exact cache only unless this is on.
    named_models: bool = False
    # Candidates the HNSW index keeps while searching (pgvector's hnsw.ef_search, default 40). At
    # 50,000 entries in one context, 100 missed 0.5 % of the hits 40 missed 5.8 % of, for +2 ms.
    hnsw_ef_search: int = Field(100, ge=1, le=1000)


class KeepWarmConfig(_Strict):
    """Re-send an agent's cached prompt prefix just before the provider's cache forgets it, when the
    agent's habits say the saving beats the ping's cost."""

    enabled: bool = False
    ttl_s: float = Field(300.0, gt=0)           # the provider's cache lifetime (Anthropic: 5 minutes)
    lead_s: float = Field(30.0, gt=0)           # ping this long before it ends
    active_h: float = Field(24.0, gt=0)         # only agents active within this many hours
    interval_s: float = Field(10.0, gt=0)       # how often the (one) warming worker looks


class CacheConfig(_Strict):
    enabled: bool = True
    # Who shares answers: each user their own, a team (users.<id>.team), or everyone.
    scope: Literal["user", "team", "global"] = "user"
    # The exact cache serves the same request's answer for this long (unless the loop scored it
    # under loop.thresholds.cache_min_quality).
    exact_ttl_s: int = Field(86400, ge=1)
    # A lookup slower than this is given up (the request goes to the model): the cache never fails
    # a request or holds it up for long.
    lookup_timeout_s: float = Field(0.25, gt=0)
    semantic: SemanticCacheConfig = SemanticCacheConfig()
    # Anthropic prompt caching: auto adds cache breakpoints to a long system prompt or tool list that
    # has none; passthrough sends bodies as they came; off does that too and never keeps a cache warm.
    prompt_caching: Literal["auto", "passthrough", "off"] = "auto"
    prompt_caching_min_tokens: int = Field(1024, ge=1)
    keep_warm: KeepWarmConfig = KeepWarmConfig()


TierName = Literal["SIMPLE", "MEDIUM", "COMPLEX", "REASONING"]


class TierRouting(_Strict):
    """`auto` with no rule, user or agent model: the tier classifier picks a chain (tm_gateway/tiers.py)."""

    enabled: bool = True
    # Under this confidence the weighted-signal rules defer to the loop's task type (task_type_tiers).
    min_confidence: float = Field(0.5, ge=0, le=1)
    # Each tier's chain, tried in order (each model with its own fallbacks). A tier without a chain
    # goes to defaults.model.
    chains: dict[TierName, list[str]] = Field(default_factory=dict)
    # The loop's task types mapped to tiers, for prompts the rules are unsure about.
    task_type_tiers: dict[str, TierName] = Field(default_factory=lambda: dict[str, TierName]({
        "chat": "SIMPLE", "extraction": "SIMPLE", "summarization": "MEDIUM", "writing": "MEDIUM",
        "coding": "COMPLEX", "math": "REASONING", "reasoning": "REASONING"}))
    # Optionally, when neither the signals nor the task type clear min_confidence: ask this
    # configured (cheap, local) model for the tier, waiting at most llm_timeout_s; no answer in time
    # (or not one of the four words) keeps what the signals said.
    llm_classifier: str | None = None
    llm_timeout_s: float = Field(1.5, gt=0, le=30)


class CascadeRouting(_Strict):
    """Where a cascade runs: the cheap model answers first; if its answer fails the quick quality gate
    (empty, refusal, cut off, wrong format, unmet constraints) the frontier answers (tm_gateway/gate.py)."""

    # `auto` requests of these tiers / task types (no rule, user or agent model) run as a cascade.
    tiers: list[TierName] = Field(default_factory=list)
    task_types: list[str] = Field(default_factory=list)
    # Default: defaults.model first, escalating to defaults.frontier_model.
    first: str | None = None
    escalate_to: str | None = None
    # Cheap models that answer alongside the first, in parallel, wherever the gateway cascades (these
    # settings, or a loop's cascade rule): their answers must pass the gate and agree, else the
    # escalation model answers (a consensus plan, tm_gateway/router.py Plan). Empty: a plain cascade.
    consensus: list[str] = Field(default_factory=list)


class LearnedRouting(_Strict):
    """`auto` with no rule, user or agent model: pick the model the request log predicts best for its
    cost (tm_gateway/router.py, judged on RouterBench by `tm bench router`). Learns from the loop's
    scored requests, re-read whenever the loop writes new rules. Off until enabled."""

    enabled: bool = False
    # Quality points one frontier call is worth: 0.06 = pay a frontier call for 6 points of quality.
    cost_weight: float = Field(0.06, ge=0)
    # Instead: the cheapest model predicted to reach this quality.
    min_quality: float | None = Field(None, ge=0, le=1)
    window_h: int = Field(168, ge=1)
    min_rows: int = Field(50, ge=1)
    k: int = Field(200, ge=1)
    temperature: float = Field(0.3, gt=0)
    prior_weight: float = Field(2.0, ge=0)


class RoutingConfig(_Strict):
    tiers: TierRouting = TierRouting()
    cascade: CascadeRouting = CascadeRouting()
    learned: LearnedRouting = LearnedRouting()
    # How `auto` and presets use local models (tm_gateway/quota_routing.py): never; simple-only (SIMPLE
    # prompts only); when-available (where the chains put them, today's behaviour); prefer (first).
    local_preference: Literal["never", "simple-only", "when-available", "prefer"] = "when-available"


class Defaults(_Strict):
    # What `model: "auto"` means until routing rules say otherwise.
    model: str
    frontier_model: str | None = None


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


class DashboardConfig(_Strict):
    """The read-only dashboard the gateway serves at /dashboard (tm_gateway/dashboard)."""

    enabled: bool = True
    # Where the Dagster UI is, so a routing rule links to the run that wrote it (`tm up --ui-port`).
    dagster_url: str = "http://127.0.0.1:3000"
    # A model whose share of answers that needed a fallback passes this is flagged on the overview.
    fallback_alert_rate: float = Field(0.05, ge=0, le=1)
    # How long a sign-in lasts before the key must be entered again.
    session_hours: float = Field(12, gt=0)


class UserConfig(_Strict):
    # Premium models cost extra: only users allowed them may use them (others get a 403, never a bill).
    premium: bool = False
    # What `auto` means for this user when no routing rule applies.
    model: str | None = None
    # Users of one team share cached answers when cache.scope is "team".
    team: str | None = None


class AgentConfig(_Strict):
    """A role a request may name (`x-tm-agent: <name>`) or the dispatcher may pick for it
    (tm_gateway/dispatch.py): its model, system prompt and default sampling parameters."""

    # What `auto` means for requests from this agent (x-tm-agent) when no routing rule applies.
    model: str | None = None
    # What the agent is for, in a line (for people; the dispatcher does not read it).
    description: str = ""
    # Example requests that belong to this agent: the dispatcher votes by the nearest of them.
    intents: list[str] = Field(default_factory=list)
    # Words or phrases that strongly signal this agent (whole words, any case, plural -s/-es allowed).
    keywords: list[str] = Field(default_factory=list)
    # A system prompt put before the client's own when answering as this agent.
    system: str | None = None
    # Default sampling parameters for requests that do not set them (AGENT_PARAMS lists the names).
    params: dict[str, Any] = Field(default_factory=dict)


# An agent's default parameters, each with a check of its value. A parameter the request's format
# lacks (top_k in OpenAI's, seed or the penalties in Anthropic's) is left out for that format.
AGENT_PARAMS: dict[str, tuple[str, Any]] = {
    "temperature": ("a number from 0 to 2", lambda v: _number(v) and 0 <= v <= 2),
    "top_p": ("a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1),
    "top_k": ("a positive integer", lambda v: _integer(v) and v >= 1),
    "max_tokens": ("a positive integer", lambda v: _integer(v) and v >= 1),
    "stop": ("a string or a list of strings",
             lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))),
    "presence_penalty": ("a number from -2 to 2", lambda v: _number(v) and -2 <= v <= 2),
    "frequency_penalty": ("a number from -2 to 2", lambda v: _number(v) and -2 <= v <= 2),
    "seed": ("an integer", lambda v: _integer(v)),
}


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class DispatchConfig(_Strict):
    """Requests naming the dispatcher (`x-tm-agent: <name>`) go to the agent whose intents and keywords
    they match best (tm_gateway/dispatch.py)."""

    name: str = Field("dispatcher", min_length=1)
    # Under this confidence (0..1) the dispatcher is unsure: the request goes to fallback_agent, if any.
    min_confidence: float = Field(0.35, ge=0, le=1)
    # One of the agents, for requests the dispatcher cannot place; none: answered as if no agent was named.
    fallback_agent: str | None = None


def _check_agents(agents: dict[str, AgentConfig], dispatch: DispatchConfig) -> None:
    """The agents and the dispatcher's settings, each problem named by its key path."""
    if not dispatch.name.strip() or dispatch.name != dispatch.name.strip():
        raise ValueError(f"dispatch.name: {dispatch.name!r} is what requests send in x-tm-agent: "
                         "no leading or trailing spaces")
    for name, agent in agents.items():
        if not name.strip() or name != name.strip():
            raise ValueError(f"agents.{name}: {name!r} is what requests send in x-tm-agent: "
                             "not empty, no leading or trailing spaces")
        if name.casefold() == dispatch.name.casefold():
            raise ValueError(f"agents.{name}: '{name}' is the dispatcher's name (dispatch.name): "
                             "rename the agent, or give the dispatcher another name")
        for key in ("intents", "keywords"):
            for i, text in enumerate(getattr(agent, key)):
                if not text.strip():
                    raise ValueError(f"agents.{name}.{key}.{i}: must not be empty")
        for key, value in agent.params.items():
            if key not in AGENT_PARAMS:
                raise ValueError(f"agents.{name}.params.{key}: not a parameter an agent may set "
                                 f"(one of: {', '.join(AGENT_PARAMS)})")
            wanted, ok = AGENT_PARAMS[key]
            if not ok(value):
                raise ValueError(f"agents.{name}.params.{key}: must be {wanted}, not {value!r}")
    fallback = dispatch.fallback_agent
    if fallback is not None and fallback not in agents:
        raise ValueError(f"dispatch.fallback_agent: '{fallback}' is not one of the agents "
                         f"({', '.join(sorted(agents)) or 'none defined'})")


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
    timezone: str = "UTC"
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

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{value}' is not a time zone (an IANA name such as Europe/Paris)") from None
        return value

    @field_validator("alert_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("fractions of a budget, above 0 (0.5 is half)")
        return sorted(set(value))
class PostHogConfig(_Strict):
    """What the gateway sends PostHog (with POSTHOG_API_KEY set): each request as PostHog's LLM analytics
    event `$ai_generation`, and cache hits as `tm_cache_hit`."""

    llm_analytics: bool = True
    # Prompts and answers ($ai_input, $ai_output_choices), redacted as log.redact says; off, PostHog sees
    # models, tokens, cost, latency and status only.
    capture_content: bool = False


class Config(_Strict):
    gateway: GatewayConfig = GatewayConfig()
    log: LogConfig = LogConfig()
    cache: CacheConfig = CacheConfig()
    routing: RoutingConfig = RoutingConfig()
    loop: LoopConfig = LoopConfig()
    # Named chains a request may ask for as its model, tried in order (e.g. "tm:balanced").
    presets: dict[str, list[str]] = Field(default_factory=dict)
    # Model names clients send that are not configured here (Claude Code's defaults, say), as
    # fnmatch patterns (`claude-opus-*`), each to a model, a preset or `auto`; the first that matches wins.
    aliases: dict[str, str] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    dispatch: DispatchConfig = DispatchConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    limits: LimitsConfig = LimitsConfig()
    dashboard: DashboardConfig = DashboardConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    posthog: PostHogConfig = PostHogConfig()
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    defaults: Defaults

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        def models_exist(path: str, names: list[str]) -> None:
            for i, m in enumerate(names):
                if m not in self.models:
                    raise ValueError(f"{path}.{i}: '{m}' is not one of the models")

        for name, m in self.models.items():
            models_exist(f"models.{name}.fallbacks", m.fallbacks)
            if m.provider not in self.providers:
                raise ValueError(
                    f"models.{name}.provider: '{m.provider}' is not one of the providers "
                    f"({', '.join(sorted(self.providers)) or 'none defined'})"
                )
        for name, chain in self.presets.items():
            if not name.startswith("tm:"):
                raise ValueError(f"presets.{name}: a preset's name starts with 'tm:' (e.g. tm:balanced)")
            if not chain:
                raise ValueError(f"presets.{name}: a preset needs at least one model")
            models_exist(f"presets.{name}", chain)
        for pattern, target in self.aliases.items():
            if target != "auto" and target not in self.models and target not in self.presets:
                raise ValueError(f"aliases.{pattern}: '{target}' is not one of the models or presets, nor 'auto'")
        for section in ("users", "agents"):
            for who, entry in getattr(self, section).items():
                if entry.model is not None and entry.model not in self.models:
                    raise ValueError(f"{section}.{who}.model: '{entry.model}' is not one of the models")
        _check_agents(self.agents, self.dispatch)
        for tier, chain in self.routing.tiers.chains.items():
            models_exist(f"routing.tiers.chains.{tier}", chain)
        for key in ("first", "escalate_to"):
            value = getattr(self.routing.cascade, key)
            if value is not None and value not in self.models:
                raise ValueError(f"routing.cascade.{key}: '{value}' is not one of the models")
        models_exist("routing.cascade.consensus", self.routing.cascade.consensus)
        llm = self.routing.tiers.llm_classifier
        if llm is not None and llm not in self.models:
            raise ValueError(f"routing.tiers.llm_classifier: '{llm}' is not one of the models")
        ref = self.budgets.billing.reference_model
        if ref is not None and ref not in self.models:
            raise ValueError(f"budgets.billing.reference_model: '{ref}' is not one of the models")
        if self.loop.judge_model is not None and self.loop.judge_model not in self.models:
            raise ValueError(f"loop.judge_model: '{self.loop.judge_model}' is not one of the models")
        for key in ("model", "frontier_model"):
            value = getattr(self.defaults, key)
            if value is not None and value not in self.models:
                raise ValueError(f"defaults.{key}: '{value}' is not one of the models")
        return self

    def resolve_alias(self, requested: str) -> tuple[str, str | None]:
        """(what `requested` means here, the alias pattern that said so). A configured model, a preset
        and `auto` are never aliased; a name no pattern matches comes back as it is."""
        if requested == "auto" or requested in self.models or requested in self.presets:
            return requested, None
        for pattern, target in self.aliases.items():
            if fnmatch.fnmatchcase(requested, pattern):
                return target, pattern
        return requested, None

    def upstream_name(self, model: str) -> str:
        return self.models[model].upstream or model


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is not a valid Token Machine configuration:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or not a setting of this section)"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "configuration") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, not {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """The file to read: the argument, else $TM_CONFIG, else ./tm.yaml, else the shipped example."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("TM_CONFIG"):
        return Path(env)
    if Path("tm.yaml").exists():
        return Path("tm.yaml")
    return EXAMPLE_CONFIG


def load_config(path: str | os.PathLike | None = None) -> Config:
    p = config_path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read configuration {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    return parse_config(data, str(p))


def tm_home() -> Path:
    return Path(os.environ.get("TM_HOME", ".tm")).resolve()
