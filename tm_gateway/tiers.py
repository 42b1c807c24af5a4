"""The tier classifier for `model: "auto"`: SIMPLE / MEDIUM / COMPLEX / REASONING from weighted signals
of the prompt, with a calibrated confidence, and a nearest-examples fallback when unsure.

Two scores are summed from signals that each saturate (a prompt saying "prove" ten times is not ten
times harder): `complexity` (code, technical terms, multi-step structure, requested output format,
explicit constraints, several questions, length, demanding verbs; minus plain small talk and
one-line lookups) and `reasoning` (proofs, derivations, "why", step-by-step logic, math notation).
The tier follows an ordinal logistic model: P(REASONING) = sigmoid(reasoning_slope * (reasoning -
reasoning_bar)); the rest is shared between SIMPLE < MEDIUM < COMPLEX by cumulative sigmoids of
`complexity` around two bars. The confidence is the winning tier's probability; the slopes are
fitted (`calibrate`) so that it matches the share of labelled prompts classified right
(bench/tiers.py measures it on prompts the fit never saw).

Below `min_confidence` the caller's fallback decides (e.g. the loop's task-type classifier, or
`NearestExamples` over labelled prompts by embedding). The keyword lists are English: on prompts in
other scripts the rules mix their probabilities with uniform ones, so they come out unsure and the
(embedding) fallback decides. The rule path reads at most 2,000 characters (head and tail), once
into words with a dict lookup per word, plus a few literal-led regexes and str.count calls: about
0.1 ms at p50 and 0.3-0.6 ms at p99 on real prompts (bench/tiers.py). Deterministic: no randomness,
no state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from tm_resources.code_ask import CODE_LINE_STARTS, CODE_TERMS


class Tier(str, Enum):
    SIMPLE = "SIMPLE"
    MEDIUM = "MEDIUM"
    COMPLEX = "COMPLEX"
    REASONING = "REASONING"


TIERS: tuple[Tier, ...] = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)


# ----------------------------------------------------------------------------------------------
# Signals

# Long prompts: read their head and tail only. Instructions sit there; the middle of a pasted
# document adds time, not evidence (the length signal still counts every character).
_HEAD_CHARS = 1200
_TAIL_CHARS = 800

_KEYWORDS: dict[str, tuple[str, ...]] = {
    "reasoning": (
        "prove", "proof", "proofs", "derive", "derivation", "deduce", "theorem", "lemma", "corollary", "why",
        "justify", "justification", "rigorous", "rigorously", "logically", "infer", "contradiction",
        "induction", "paradox", "puzzle", "riddle", "counterexample", "implies", "therefore", "suppose",
        "hypothesis", "syllogism", "premise", "premises", "conclude", "conclusion", "reasoning", "deduction",
        "valid", "reason", "logic", "argument",
    ),
    "math": (
        "integral", "integrate", "derivative", "differentiate", "equation", "equations", "solve", "probability",
        "matrix", "eigenvalue", "eigenvalues", "polynomial", "factorial", "prime", "primes", "modulo",
        "logarithm", "sqrt", "calculus", "algebra", "geometry", "combinatorics", "permutations", "combinations",
        "variance", "integer", "integers", "divisible", "converge", "converges", "convergent", "inequality",
        "minimize", "maximize", "calculate", "compute", "sequence", "function's", "ln", "sin", "cos", "tan",
        "mph", "percent", "ratio", "odds", "expected", "increasing", "decreasing", "bounded", "infinitely",
    ),
    "code": CODE_TERMS,
    "technical": (
        "architecture", "distributed", "latency", "throughput", "scalability", "scalable", "database",
        "schema", "microservice", "microservices", "concurrency", "concurrent", "encryption", "protocol",
        "kernel", "neural", "gradient", "transformer", "regression", "statistical", "quantum", "consensus",
        "cache", "caching", "index", "indexing", "replication", "sharding", "sharded", "tcp", "http", "oauth",
        "jwt", "memory", "complexity", "asymptotic", "heuristic", "pipeline", "infrastructure", "deployment",
        "security", "vulnerability", "compliance", "gdpr", "thermodynamics", "molecular", "genome",
        "econometric", "fourier", "bayesian", "stochastic", "topology", "semantics", "optimization",
        "benchmark", "multi-tenant", "failover", "autoscaling", "vpc", "redis", "postgresql", "mongodb",
        "cassandra", "kafka", "onnx", "hyperparameter", "cross-validation", "migration", "permissions",
    ),
    "demanding": (
        "design", "architect", "build", "develop", "migrate", "optimize", "analyze", "analyse", "evaluate",
        "compare", "critique", "plan", "strategy", "assess", "investigate", "troubleshoot", "diagnose",
        "comprehensive", "detailed", "thorough", "in-depth", "production", "robust", "scale", "scales",
        "tradeoffs", "trade-offs", "review", "audit", "research", "complete", "full", "proposal",
        "curriculum", "projections", "remediation", "recommendation", "prioritized",
    ),
    "task": (
        "write", "explain", "summarize", "summarise", "describe", "draft", "create", "compose", "outline",
        "suggest", "generate", "story", "poem", "haiku", "limerick", "sonnet", "essay", "email",
        "letter", "post", "message", "reminder", "description", "tips", "ideas", "difference", "differences",
        "how", "example", "examples", "pros", "cons", "opening",
    ),
    "simple": (
        "hi", "hello", "hey", "thanks", "thank", "ok", "okay", "morning", "translate", "define", "definition",
        "synonym", "synonyms", "antonym", "capital", "spell", "spelling", "meaning", "mean", "abbreviation",
        "acronym", "stand", "rephrase", "typo", "quick", "name", "convert", "who", "when", "where",
    ),
    "format": (
        "json", "table", "yaml", "csv", "markdown", "xml", "schema", "bullet", "bullets", "format",
        "formatted", "columns", "headings",
    ),
    "constraint": (
        "must", "exactly", "ensure", "without", "require", "requires", "required", "requirement",
        "requirements", "constraint", "constraints", "limit", "limits", "strictly", "never", "mandatory",
        "including", "include", "handle", "handles", "cover",
    ),
}
_CATEGORY_OF: dict[str, list[str]] = {}
for _cat, _words in _KEYWORDS.items():
    for _w in _words:
        _CATEGORY_OF.setdefault(_w, []).append(_cat)

# Every pattern starts with a literal, so the regex engine skips ahead at C speed between hits.
_WORD = re.compile(r"[a-z][a-z'-]*")
_STEP_BY_STEP = re.compile(r"step[- ]by[- ]step|show (?:your|the|all|each) (?:work|steps?|reasoning)"
                           r"|think (?:carefully|through|it through)|explain (?:your|the) (?:reasoning|logic)"
                           r"|walk me through|chain of thought|reason it out|show that|how many ways"
                           r"|what can we conclude|expected number|is the following argument")
_MULTI_STEP = re.compile(r"first\b.{0,200}?\b(?:then|next|after that|finally|second)\b|finally\b|after that\b"
                         r"|and then\b|followed by\b", re.DOTALL)
_AT_LIMIT = re.compile(r"(?:at most|at least|no more than|fewer than|less than|up to|under|exactly|within) \d")
_MATH_CHARS = "^∑∫√∞≤≥≠π∀∃∈"
# Letters of scripts the keyword lists cannot read: Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, CJK, Hangul.
_OTHER_SCRIPT = re.compile("[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u0dff\u0e00-\u0e7f"
                           "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_LATEX = ("\\frac", "\\sum", "\\int", "\\sqrt", "\\lim", "\\prod", "\\cdot", "\\infty")
_LOOKUP_STARTS = ("what is ", "what's ", "who ", "when ", "where ", "which ", "what does ", "what are ",
                  "how many ", "how do you say", "is ", "are ")


@dataclass(frozen=True)
class Signals:
    """What the rule path saw, each in 0..1 (saturating), plus the raw size."""

    reasoning: float
    math: float
    code: float
    technical: float
    demanding: float
    task: float
    simple: float
    multi_step: float
    step_by_step: float
    format: float
    constraint: float
    questions: float
    length: float
    # Share of the letters that are Latin: the keyword lists are English, so on other scripts the
    # rules know little and their probabilities are mixed with uniform ones in that proportion.
    latin: float
    chars: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items() if k not in ("chars", "latin")}


def _sat(count: float, half: float) -> float:
    """0 for none, 0.5 at `half`, towards 1 beyond: many hits add less and less."""
    return count / (count + half) if count > 0 else 0.0


def signals(prompt: str) -> Signals:
    """The weighted signals' raw values for one prompt."""
    chars = len(prompt)
    text = prompt if chars <= _HEAD_CHARS + _TAIL_CHARS else prompt[:_HEAD_CHARS] + "\n" + prompt[-_TAIL_CHARS:]
    low = text.lower()
    counts = dict.fromkeys(_KEYWORDS, 0)
    words = _WORD.findall(low)
    for w in words:
        cats = _CATEGORY_OF.get(w)
        if cats:
            for c in cats:
                counts[c] += 1
    listed = code_lines = 0
    for line in low.split("\n"):
        s = line.lstrip()
        if not s:
            continue
        if (s[0] in "-*•" and s[1:2] == " ") or (s[0].isdigit() and (s[1:2] in (".", ")") or s[2:3] in (".", ")"))):
            listed += 1
        if s.startswith(CODE_LINE_STARTS) or (line[:1] == "\t" or line[:4] == "    "):
            code_lines += 1
    fences = low.count("```")
    math_marks = sum(low.count(c) for c in _MATH_CHARS) + sum(low.count(x) for x in _LATEX) + low.count(" = ")
    digits_groups = len([w for w in low.split() if w[:1].isdigit() or w[:1] == "$"])
    multi = len(_MULTI_STEP.findall(low)) + (listed if listed >= 2 else 0)
    limits = len(_AT_LIMIT.findall(low))
    other = 0 if text.isascii() else len(_OTHER_SCRIPT.findall(text))
    latin_letters = sum(len(w) for w in words) if other else 1
    latin = latin_letters / (latin_letters + other) if other else 1.0
    # Other scripts: about one word per two characters (CJK), so length still counts.
    n_words = max(len(words), other // 2)
    if chars != len(text):
        n_words = int(n_words * chars / max(len(text), 1))
    questions = text.count("?")
    short_lookup = 1 if (n_words <= 12 and questions <= 1 and low.lstrip().startswith(_LOOKUP_STARTS)) else 0
    # Several numbers in a question is a word problem: "a train leaves at 3 pm going 60 mph ...".
    word_problem = 1 if digits_groups >= 2 and (questions or counts["math"]) else 0
    return Signals(
        reasoning=_sat(counts["reasoning"], 1.0),
        math=_sat(counts["math"] + 2 * math_marks + 2 * word_problem, 1.5),
        code=_sat(counts["code"] + 3 * fences + code_lines, 2.0),
        technical=_sat(counts["technical"], 2.0),
        demanding=_sat(counts["demanding"], 1.5),
        task=_sat(counts["task"], 1.0),
        simple=_sat(counts["simple"] + 2 * short_lookup, 1.0),
        multi_step=_sat(multi, 2.0),
        step_by_step=1.0 if _STEP_BY_STEP.search(low) else 0.0,
        format=_sat(counts["format"], 1.0),
        constraint=_sat(counts["constraint"] + limits, 2.0),
        questions=_sat(max(questions - 1, 0), 2.0),
        # log-scaled words: about 0 for a line, 0.5 near 30 words, 1 from about 1,000
        length=min(1.0, max(0.0, math.log10(max(n_words, 1)) / 3.0)),
        latin=latin,
        chars=chars,
    )


# ----------------------------------------------------------------------------------------------
# Scores and probabilities


@dataclass(frozen=True)
class TierWeights:
    """How much each signal moves the two scores, the bars between tiers, and the calibrated slopes.

    The weights were set by hand for readability (each says how much one signal counts); the bars
    and the two slopes are fitted by `calibrate` on labelled prompts, the slopes so that the
    confidence tracks accuracy.
    """

    complexity: Mapping[str, float] = field(default_factory=lambda: {
        "code": 1.0, "technical": 1.2, "demanding": 1.2, "multi_step": 0.8, "format": 0.5, "constraint": 0.8,
        "questions": 0.5, "length": 1.5, "task": 0.8, "math": 0.4, "reasoning": 0.3, "step_by_step": 0.2,
        "simple": -1.0,
    })
    reasoning: Mapping[str, float] = field(default_factory=lambda: {
        "reasoning": 1.4, "math": 1.4, "step_by_step": 1.2, "code": -0.6, "technical": -0.4, "simple": -0.3,
        "demanding": -0.3,
    })
    # Fitted by `calibrate` on bench/tiers.py's FIT + SEEN prompts (100, hand-labelled).
    simple_bar: float = 0.3      # complexity under this: SIMPLE
    complex_bar: float = 1.45    # complexity over this: COMPLEX
    reasoning_bar: float = 0.55  # reasoning over this: REASONING
    complexity_slope: float = 15.97
    reasoning_slope: float = 7.70


DEFAULT_WEIGHTS = TierWeights()


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def scores(s: Signals, weights: TierWeights = DEFAULT_WEIGHTS) -> tuple[float, float]:
    """(complexity, reasoning) of a prompt's signals."""
    v = s.__dict__
    return (sum(w * v[k] for k, w in weights.complexity.items()),
            sum(w * v[k] for k, w in weights.reasoning.items()))


def probabilities(complexity: float, reasoning: float, weights: TierWeights = DEFAULT_WEIGHTS) -> dict[Tier, float]:
    """P(tier) from the two scores: REASONING by its own sigmoid, the rest ordinal in complexity."""
    p_reason = _sigmoid(weights.reasoning_slope * (reasoning - weights.reasoning_bar))
    le_simple = _sigmoid(weights.complexity_slope * (weights.simple_bar - complexity))
    le_medium = _sigmoid(weights.complexity_slope * (weights.complex_bar - complexity))
    rest = 1.0 - p_reason
    return {Tier.SIMPLE: rest * le_simple, Tier.MEDIUM: rest * max(le_medium - le_simple, 0.0),
            Tier.COMPLEX: rest * (1.0 - le_medium), Tier.REASONING: p_reason}


@dataclass(frozen=True)
class TierDecision:
    tier: Tier
    confidence: float
    source: str                       # "rules" or "fallback"
    probabilities: dict[Tier, float]
    signals: Signals | None = None
    rule_tier: Tier | None = None     # what the rules said when the fallback decided


Fallback = Callable[[str], "tuple[Tier | str, float] | None"]

# The optional last resort (routing.tiers.llm_classifier): a cheap model asked for the tier of a
# prompt the signals and the task type are both unsure about.
LLM_TIER_SYSTEM = (
    "You sort requests for an AI gateway by the model they need. Reply with exactly one word:\n"
    "SIMPLE - greetings, quick facts, short rewrites or translations, yes/no questions;\n"
    "MEDIUM - explanations, summaries, emails and ordinary writing, light analysis;\n"
    "COMPLEX - writing or reviewing code, multi-step technical work, long structured documents;\n"
    "REASONING - proofs, mathematics, logic puzzles, careful step-by-step analysis.")
LLM_TIER_MAX_CHARS = 2000
_LLM_TIER_WORD = re.compile(r"\b(SIMPLE|MEDIUM|COMPLEX|REASONING)\b", re.IGNORECASE)


def llm_tier_messages(prompt: str) -> list[dict]:
    """What the cheap model is asked: the instructions and the prompt (its opening and its end when long)."""
    if len(prompt) > LLM_TIER_MAX_CHARS:
        half = LLM_TIER_MAX_CHARS // 2
        prompt = prompt[:half] + "\n[...]\n" + prompt[-half:]
    return [{"role": "system", "content": LLM_TIER_SYSTEM},
            {"role": "user", "content": f"Request:\n<<<\n{prompt}\n>>>\nTier (one word):"}]


def parse_llm_tier(text: str | None) -> Tier | None:
    """The tier a cheap model answered: the first of the four words in its reply, else None."""
    m = _LLM_TIER_WORD.search(text or "")
    return Tier(m.group(1).upper()) if m else None


class TierClassifier:
    """Tier of a prompt: the weighted-signal rules, or `fallback` when their confidence is under
    `min_confidence` and the fallback is surer than the rules were.

    fallback: prompt -> (tier, confidence) or None (no opinion), e.g. `NearestExamples(...)` or
        `tier_from_task_type(...)` over the loop's task-type classifier. Called only when the rules
        are unsure, so its embedding cost is paid by those requests alone.
    """

    def __init__(self, *, min_confidence: float = 0.5, fallback: Fallback | None = None,
                 weights: TierWeights = DEFAULT_WEIGHTS) -> None:
        if not 0 <= min_confidence <= 1:
            raise ValueError("min_confidence must be between 0 and 1")
        self.min_confidence = min_confidence
        self.fallback = fallback
        self.weights = weights

    def rules(self, prompt: str) -> TierDecision:
        """The rule path alone (what the < 1 ms budget covers)."""
        s = signals(prompt or "")
        probs = probabilities(*scores(s, self.weights), self.weights)
        if s.latin < 1.0:
            probs = {t: s.latin * p + (1 - s.latin) / len(TIERS) for t, p in probs.items()}
        # Ties resolve to the cheaper tier, in TIERS order: deterministic.
        tier = max(TIERS, key=lambda t: (probs[t], -TIERS.index(t)))
        return TierDecision(tier, round(probs[tier], 4), "rules", probs, s)

    def classify(self, prompt: str) -> TierDecision:
        decision = self.rules(prompt)
        if decision.confidence >= self.min_confidence or self.fallback is None:
            return decision
        answer = self.fallback(prompt)
        if not answer:
            return decision
        tier, confidence = answer
        tier = Tier(tier)
        if confidence <= decision.confidence:
            return decision
        return TierDecision(tier, round(float(confidence), 4), "fallback", decision.probabilities, decision.signals,
                            rule_tier=decision.tier)


# ----------------------------------------------------------------------------------------------
# Fallbacks


class NearestExamples:
    """Tier by a similarity-weighted vote of the nearest labelled prompts (embedding k-NN).

    examples: tier -> example prompts; embed: texts -> unit vectors (e.g. `get_embedder().embed`).
    Confidence is the winning tier's share of the vote; None when no example is similar enough.
    """

    def __init__(self, examples: Mapping[Tier | str, Sequence[str]], embed: Callable[[list[str]], np.ndarray], *,
                 k: int = 7, temperature: float = 0.05, min_similarity: float = 0.2) -> None:
        pairs = [(Tier(t), text) for t in sorted(examples, key=lambda t: TIERS.index(Tier(t))) for text in examples[t]]
        if not pairs:
            raise ValueError("no labelled examples")
        self.embed = embed
        self.labels = np.array([TIERS.index(t) for t, _ in pairs])
        self.vectors = np.asarray(embed([text for _, text in pairs]), dtype=np.float32)
        self.k, self.temperature, self.min_similarity = k, temperature, min_similarity

    def __call__(self, prompt: str) -> tuple[Tier, float] | None:
        return self.vote(np.asarray(self.embed([prompt]), dtype=np.float32)[0])

    def vote(self, vec: np.ndarray) -> tuple[Tier, float] | None:
        sims = self.vectors @ vec
        top = np.argsort(-sims, kind="stable")[: self.k]
        if sims[top[0]] < self.min_similarity:
            return None
        weights = np.exp((sims[top] - sims[top[0]]) / self.temperature)
        votes = np.bincount(self.labels[top], weights=weights, minlength=len(TIERS))
        best = int(np.argmax(votes))
        return TIERS[best], float(votes[best] / votes.sum())


def tier_from_task_type(classify: Callable[[str], tuple[str, float]],
                        tier_of_type: Mapping[str, Tier | str]) -> Fallback:
    """A fallback from the loop's task-type classifier (prompt -> (task type, confidence)) and a map
    task type -> tier (configuration); an unmapped or unknown type gives no opinion."""
    def fallback(prompt: str) -> tuple[Tier, float] | None:
        task_type, confidence = classify(prompt)
        tier = tier_of_type.get(task_type)
        return (Tier(tier), confidence) if tier is not None else None

    return fallback


# ----------------------------------------------------------------------------------------------
# Calibration


def calibrate(labelled: Sequence[tuple[str, Tier | str]], weights: TierWeights = DEFAULT_WEIGHTS,
              fit_bars: bool = True) -> TierWeights:
    """The weights with the bars (when `fit_bars`) and both slopes refitted by maximum likelihood on
    labelled prompts. Coordinate descent over fixed grids: deterministic, and a few ms per pass.
    The slopes set how sure the classifier is: steeper when the bars separate the labels well."""
    if not labelled:
        raise ValueError("no labelled prompts to calibrate on")
    scored = [(scores(signals(p), weights), Tier(t)) for p, t in labelled]
    slopes = [0.5 * 1.2 ** i for i in range(24)]            # 0.5 .. ~33
    bars = [round(-0.5 + 0.05 * i, 2) for i in range(81)]    # -0.5 .. 3.5

    def nll(w: TierWeights) -> float:
        return -sum(math.log(max(probabilities(c, r, w)[t], 1e-9)) for (c, r), t in scored)

    best = weights
    for _ in range(4):
        if fit_bars:
            best = min((replace(best, simple_bar=b) for b in bars if b < best.complex_bar), key=nll)
            best = min((replace(best, complex_bar=b) for b in bars if b > best.simple_bar), key=nll)
            best = min((replace(best, reasoning_bar=b) for b in bars), key=nll)
        best = min((replace(best, complexity_slope=a) for a in slopes), key=nll)
        best = min((replace(best, reasoning_slope=b) for b in slopes), key=nll)
    return best


def calibration_report(decisions: Sequence[TierDecision], truth: Sequence[Tier | str], bins: int = 5) -> dict:
    """Accuracy, mean confidence and expected calibration error (ECE) over labelled prompts."""
    truth = [Tier(t) for t in truth]
    conf = np.array([d.confidence for d in decisions])
    right = np.array([d.tier == t for d, t in zip(decisions, truth, strict=True)], dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - right[m].mean())
            table.append({"confidence": f"{lo:.1f}-{hi:.1f}", "n": int(m.sum()),
                          "mean_confidence": round(float(conf[m].mean()), 3),
                          "accuracy": round(float(right[m].mean()), 3)})
    return {"n": len(truth), "accuracy": round(float(right.mean()), 4), "mean_confidence": round(float(conf.mean()), 4),
            "ece": round(float(ece), 4), "bins": table}
