"""Token Machine's configuration: one YAML file, validated once, secrets only from the environment."""

from __future__ import annotations

import fnmatch
import os
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tm_resources.config_base import ConfigError as ConfigError
from tm_resources.config_base import Strict as _Strict
from tm_resources.config_base import TimeZone as TimeZone
from tm_resources.config_loop import LoopConfig as LoopConfig
from tm_resources.config_loop import ScoringWeights as ScoringWeights
from tm_resources.config_loop import Thresholds as Thresholds
from tm_resources.config_loop import TypeThresholds as TypeThresholds
from tm_resources.config_optimize import CapabilityScoring as CapabilityScoring
from tm_resources.config_optimize import OptimizeConfig as OptimizeConfig
from tm_resources.config_quota import QuotaConfig as QuotaConfig
from tm_resources.config_quota import QuotaReset as QuotaReset
from tm_resources.config_spend import BillingConfig as BillingConfig
from tm_resources.config_spend import BudgetsConfig as BudgetsConfig
from tm_resources.config_spend import Limits as Limits
from tm_resources.config_spend import LimitsConfig as LimitsConfig
from tm_resources.config_spend import LimitValues as LimitValues
from tm_resources.config_spend import LoopDetection as LoopDetection
from tm_resources.config_spend import MarkupBand as MarkupBand

# The example tm.yaml ships inside the package, so a wheel installed anywhere runs as it is; setuptools
# installs package data as plain files, which callers read and copy as a Path.
EXAMPLE_CONFIG = Path(str(resources.files("tm_resources").joinpath("tm.yaml")))


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
    # The gateway keeps the hashes answered within exact_ttl_s in fixed-size filters so that a request
    # nobody sent before costs no query: two of them (this half of the TTL and the last), each sized
    # for this many distinct requests (about 1.2 bytes each: 2 x 6 MB for the default); past it, more
    # requests cost a lookup, none is answered wrongly.
    exact_filter_capacity: int = Field(5_000_000, ge=1000)
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
