"""The learned router for `model: "auto"`: predict from the log how well each model (or cascade) would
answer a new prompt and what it would cost, then take the best trade.

The log is plain data: one prompt vector per row, and per *arm* (a model, or a cascade plan) the
quality it got (0..1, NaN where the arm was not tried) and what it cost. `KnnRouter` estimates an
arm's quality on a new prompt as the similarity-weighted mean over the k most similar logged prompts,
shrunk towards the arm's mean over the whole log, so a thin neighbourhood does not swing the choice.
Cost is estimated the same way (long prompts cost more everywhere).

Measured on RouterBench (bench/router.py, docs/benchmarks.md): with MiniLM vectors the prompt says
which *kind* of task it is, hardly which model will get this very prompt right (within one task,
the AUC of predicting a model's correctness from the vector is 0.45-0.63), so a wide neighbourhood
(k = 200, temperature 0.3) beats a sharp one, and a per-model logistic regression on the same
vectors did worse at every cost while needing a refit per new row. Cascades are arms too: their
outcome on a logged prompt is replayed from the logged answers (`Plan.next_step` with the gate), so
the router learns where "try cheap first" pays.

Request time is a matrix-vector product over at most `max_points` stored points (a larger log is
condensed to that many k-means prototypes carrying their rows' sums) plus a top-k: about 0.3 ms
for 2,048 points. numpy's BLAS may use several threads for that product; on a busy gateway, one
BLAS thread (OPENBLAS_NUM_THREADS=1) keeps the tail short. Everything is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tm_gateway.gate import quick_gate, same_answer

# ----------------------------------------------------------------------------------------------
# What is embedded for routing


def routing_text(prompt: str, max_chars: int = 1000, min_chars: int = 120, context_chars: int = 400) -> str:
    """The part of a prompt that says what is being asked: its last paragraph (at most its last
    `max_chars`). When that is shorter than `min_chars` ("What's wrong?" after a code block), the
    paragraphs before it are added from the end, up to `context_chars` in all, so the question stays
    inside the embedder's first 128 tokens. Few-shot and document prompts put the actual question
    last; their first 128 tokens are the same examples on every request of a kind, so embedding the
    head would make every such prompt look alike."""
    blocks = [b.strip("\n") for b in prompt.strip().split("\n\n") if b.strip()]
    if not blocks:
        return ""
    kept = [blocks.pop()[-max_chars:]]
    size = len(kept[0])
    while blocks and size < min_chars:
        kept.append(blocks.pop()[-(context_chars - size - 2):])
        size += len(kept[-1]) + 2
    return "\n\n".join(reversed(kept))


# ----------------------------------------------------------------------------------------------
# Plans: a single model, or a cascade that tries cheap models first


@dataclass(frozen=True)
class Attempt:
    model: str
    answer: str | None
    finish_reason: str | None = None
    # The gate's verdict when already known (replays gate each logged answer once); None: judge it.
    verdict: tuple[bool, list[str]] | None = None


@dataclass(frozen=True)
class Step:
    action: Literal["call", "serve"]
    model: str                  # the model to call next, or the model whose answer is served
    reason: str = ""
    attempt: int | None = None  # for "serve": the index of the attempt whose answer goes out
    # For "call": the models that may be called at once from here, `model` first (a consensus's cheap
    # models; the gateway calls them in parallel). Calling them one by one comes to the same plan.
    together: tuple[str, ...] = ()

    @property
    def calls(self) -> tuple[str, ...]:
        return self.together or (self.model,)


@dataclass(frozen=True)
class Plan:
    """How one request is answered.

    tries: models called first, in order. One model and no `escalate_to`: just that model. One
        model and an `escalate_to`: a cascade; its answer is served if it passes the quick gate,
        else the escalation model answers. Two or more: a consensus cascade; they answer together
        (the gateway calls them in parallel, so every one is paid for), each answer must pass the
        gate and all must say the same (short answers only, see `gate.same_answer`), else the
        escalation model answers. The first answer is the one served.
    """

    tries: tuple[str, ...]
    escalate_to: str | None = None

    def __post_init__(self) -> None:
        if not self.tries:
            raise ValueError("a plan needs at least one model to try")
        if len(self.tries) > 1 and self.escalate_to is None:
            raise ValueError("a consensus plan needs a model to escalate to")
        if self.escalate_to in self.tries or len(set(self.tries)) != len(self.tries):
            raise ValueError("a plan names each model once")

    @property
    def name(self) -> str:
        head = "+".join(self.tries)
        return f"{head}>{self.escalate_to}" if self.escalate_to else head

    @property
    def kind(self) -> Literal["single", "cascade", "consensus"]:
        if self.escalate_to is None:
            return "single"
        return "cascade" if len(self.tries) == 1 else "consensus"

    @property
    def models(self) -> tuple[str, ...]:
        return self.tries + ((self.escalate_to,) if self.escalate_to else ())

    def next_step(self, prompt: str, attempts: Sequence[Attempt],
                  gate: Callable[..., tuple[bool, list[str]]] = quick_gate) -> Step:
        """What to do next, given the attempts made so far for this request (pure: the gateway calls
        the provider between steps; the benchmark replays logged answers)."""
        n = len(attempts)
        if self.escalate_to is None:
            return Step("call", self.tries[0]) if n == 0 else Step("serve", attempts[0].model, "single model", 0)
        if n and attempts[-1].model == self.escalate_to:
            return Step("serve", self.escalate_to, "escalated", n - 1)
        if n < len(self.tries):
            return Step("call", self.tries[n], together=self.tries[n:])
        for a in attempts:
            passed, reasons = a.verdict or gate(prompt, a.answer, finish_reason=a.finish_reason)
            if not passed:
                return Step("call", self.escalate_to, f"{a.model} failed the gate: {'; '.join(reasons)}")
        if n == 1:
            return Step("serve", attempts[0].model, "passed the gate", 0)
        first = attempts[0].answer
        if all(same_answer(first, a.answer) for a in attempts[1:]):
            return Step("serve", attempts[0].model, f"passed the gate, {n} models agree", 0)
        return Step("call", self.escalate_to, "the cheap answers disagree")


def replay(plan: Plan, prompt: str, answers: Mapping[str, str | None],
           gate: Callable[..., tuple[bool, list[str]]] = quick_gate,
           verdicts: dict[str, tuple[bool, list[str]]] | None = None) -> tuple[list[str], str]:
    """Run a plan on logged answers: (models called in order, model whose answer was served).
    `verdicts` caches the gate's verdict per model across plans replayed on the same prompt."""
    verdicts = {} if verdicts is None else verdicts
    attempts: list[Attempt] = []
    while True:
        step = plan.next_step(prompt, attempts, gate)
        if step.action == "serve":
            return [a.model for a in attempts], step.model
        answer = answers.get(step.model)
        if step.model not in verdicts:
            ok, reasons = gate(prompt, answer)
            verdicts[step.model] = (ok, reasons)
        attempts.append(Attempt(step.model, answer, verdict=verdicts[step.model]))


def plan_outcomes(plans: Sequence[Plan], prompts: Sequence[str], answers: Sequence[Mapping[str, str | None]],
                  quality: np.ndarray, cost: np.ndarray, models: Sequence[str],
                  gate: Callable[..., tuple[bool, list[str]]] = quick_gate) -> tuple[np.ndarray, np.ndarray]:
    """Quality and cost of every plan on every logged prompt, replayed from the logged answers:
    a plan's quality is that of the answer it serves; its cost, the sum over every call it made.
    quality / cost: (rows, models) in the order of `models`. Returns two (rows, plans) arrays."""
    col = {m: i for i, m in enumerate(models)}
    pq = np.full((len(prompts), len(plans)), np.nan)
    pc = np.full((len(prompts), len(plans)), np.nan)
    for r, prompt in enumerate(prompts):
        verdicts: dict[str, tuple[bool, list[str]]] = {}
        for p, plan in enumerate(plans):
            called, served = replay(plan, prompt, answers[r], gate, verdicts)
            pq[r, p] = quality[r, col[served]]
            pc[r, p] = sum(cost[r, col[m]] for m in called)
    return pq, pc


def candidate_plans(models: Sequence[str], mean_quality: Mapping[str, float], mean_cost: Mapping[str, float], *,
                    cheap_cost_share: float = 0.2, escalation_targets: int = 2, max_consensus: int = 2,
                    consensus_pool: int = 4) -> list[Plan]:
    """Every single model, plus cascades from the log's figures: each cheap model (mean cost under
    `cheap_cost_share` of the dearest) gated then escalated, and consensus of 2..`max_consensus`
    of the `consensus_pool` best cheap models, escalating to one of the `escalation_targets`
    best models that are not cheap. Sorted names keep the order (and every tie-break) stable.
    On RouterBench, pairs of the 4 best cheap models did as well as triples of the 8 best (39
    candidates instead of 195): fewer candidates, less to overfit (docs/benchmarks.md)."""
    models = sorted(models)
    plans = [Plan((m,)) for m in models]
    dearest = max(mean_cost[m] for m in models)
    cheap = [m for m in models if mean_cost[m] <= cheap_cost_share * dearest]
    strong = sorted((m for m in models if m not in cheap), key=lambda m: (-mean_quality[m], m))[:escalation_targets]
    if not cheap or not strong:
        return plans
    for a in cheap:
        plans += [Plan((a,), s) for s in strong]
    pool = sorted(cheap, key=lambda m: (-mean_quality[m], m))[:consensus_pool]
    from itertools import combinations

    for size in range(2, max_consensus + 1):
        for group in combinations(pool, size):
            plans += [Plan(group, s) for s in strong]
    return plans


# ----------------------------------------------------------------------------------------------
# The estimator and the choice


@dataclass(frozen=True)
class Choice:
    arm: str
    quality: float        # predicted
    cost: float           # predicted, USD
    reason: str
    scores: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _condense(vecs: np.ndarray, stats: list[np.ndarray], max_points: int, seed: int,
              iterations: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    """k-means (cosine) down to `max_points` prototypes; each carries the sums of its rows' stats,
    so a wide neighbourhood over prototypes sums what it would have summed over the rows."""
    rng = np.random.default_rng(seed)
    centers = vecs[np.sort(rng.choice(len(vecs), size=max_points, replace=False))].copy()
    for _ in range(iterations):
        assign = np.concatenate([np.argmax(vecs[s:s + 4096] @ centers.T, axis=1)
                                 for s in range(0, len(vecs), 4096)])
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, vecs)
        empty = ~np.any(sums, axis=1)
        centers = np.where(empty[:, None], centers, _unit(sums))
    keep = np.unique(assign)
    summed = []
    for s in stats:
        acc = np.zeros((max_points,) + s.shape[1:], dtype=np.float64)
        np.add.at(acc, assign, s)
        summed.append(acc[keep])
    return centers[keep], summed


class KnnRouter:
    """Per-arm quality and cost of a prompt from its nearest logged prompts.

    vectors: (rows, dim) unit prompt vectors. arms: names (models or plan names). quality, cost:
        (rows, arms); NaN where the arm was not tried on that row.
    k: neighbours (prototypes) read per prompt; temperature: weight exp((sim - best) / temperature);
        prior_weight: pseudo-rows of the arm's log-wide mean mixed into every estimate.
    reference_cost: what cost_weight is relative to; default the mean cost of the arm with the best
        mean quality (the frontier model, typically), so cost_weight 0.1 reads "pay one frontier
        call for 10 points of quality".
    """

    def __init__(self, vectors: np.ndarray, arms: Sequence[str], quality: np.ndarray, cost: np.ndarray, *,
                 k: int = 200, temperature: float = 0.3, prior_weight: float = 2.0, max_points: int = 2048,
                 reference_cost: float | None = None, seed: int = 0) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        quality = np.asarray(quality, dtype=np.float64)
        cost = np.asarray(cost, dtype=np.float64)
        if vectors.ndim != 2 or quality.shape != (len(vectors), len(arms)) or cost.shape != quality.shape:
            raise ValueError("vectors must be (rows, dim) and quality, cost (rows, arms)")
        if len(vectors) == 0:
            raise ValueError("the log is empty: nothing to learn from")
        if k < 1 or temperature <= 0 or prior_weight < 0:
            raise ValueError("k must be at least 1, temperature above 0 and prior_weight at least 0")
        self.arms = list(arms)
        self.k = k
        self.temperature = temperature
        self.prior_weight = prior_weight
        seen_q, seen_c = ~np.isnan(quality), ~np.isnan(cost)
        stats = [np.where(seen_q, quality, 0.0), seen_q.astype(np.float64),
                 np.where(seen_c, cost, 0.0), seen_c.astype(np.float64)]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.prior_quality = stats[0].sum(0) / stats[1].sum(0)
            self.prior_cost = stats[2].sum(0) / stats[3].sum(0)
        # An arm never tried is never chosen. Costs missing on some rows are estimated from the rows
        # that have them; an arm with no cost anywhere counts as free.
        self.known = ~np.isnan(self.prior_quality)
        self.prior_cost = np.nan_to_num(self.prior_cost, nan=0.0)
        vectors = _unit(vectors)
        if len(vectors) > max_points:
            vectors, stats = _condense(vectors, stats, max_points, seed)
        self.points = np.ascontiguousarray(vectors)
        # One (points, 4 * arms) array: a request gathers its k rows once, and one product sums them.
        self._stats = np.ascontiguousarray(np.hstack(stats))
        if reference_cost is None:
            best = int(np.nanargmax(np.where(self.known, self.prior_quality, -np.inf)))
            reference_cost = float(self.prior_cost[best])
        self.reference_cost = reference_cost if reference_cost > 0 else 1.0
        self._prior_q = np.nan_to_num(self.prior_quality)
        # Tie-breaks by name, precomputed: rank of each arm in sorted order.
        self._name_rank = np.argsort(np.argsort(np.array(self.arms, dtype=object), kind="stable"), kind="stable")

    def __len__(self) -> int:
        return len(self.points)

    def predict(self, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (quality, cost) per arm: two (n, arms) arrays; one vector gives (1, arms)."""
        vecs = _unit(np.atleast_2d(np.asarray(vecs, dtype=np.float32)))
        sims = (self.points @ vecs[0])[None, :] if len(vecs) == 1 else vecs @ self.points.T
        k = min(self.k, sims.shape[1])
        if k < sims.shape[1]:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(k), (len(sims), k))
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / self.temperature)
        if len(vecs) == 1:
            summed = (weights[0] @ self._stats[top[0]])[None, :]
        else:
            # A batch: one dense weight matrix and one matrix product (no (n, k, arms) temporaries).
            dense = np.zeros((len(vecs), len(self.points)))
            np.put_along_axis(dense, top, weights, axis=1)
            summed = dense @ self._stats
        q_s, q_n, c_s, c_n = np.split(summed, 4, axis=1)
        a = self.prior_weight
        q = (q_s + a * self._prior_q) / (q_n + a + 1e-12)
        c = (c_s + a * self.prior_cost) / (c_n + a + 1e-12)
        return np.where(self.known, q, np.nan), c

    def choose(self, vec: np.ndarray, *, cost_weight: float = 0.0, min_quality: float | None = None,
               allowed: Sequence[str] | None = None, explain: bool = False) -> Choice:
        """The arm for one prompt vector.

        min_quality given: the cheapest arm predicted to clear it (none clears it: the best predicted).
        Otherwise: the arm maximizing quality - cost_weight * cost / reference_cost (0: the best
        quality whatever it costs). Ties go to the cheaper arm, then to the name.
        """
        q, c = (x[0] for x in self.predict(vec))
        return self._pick(q, c, cost_weight=cost_weight, min_quality=min_quality, allowed=allowed, explain=explain)

    def choose_many(self, vecs: np.ndarray, **kwargs) -> list[Choice]:
        qs, cs = self.predict(vecs)
        return [self._pick(q, c, **kwargs) for q, c in zip(qs, cs, strict=True)]

    def _pick(self, q: np.ndarray, c: np.ndarray, *, cost_weight: float = 0.0, min_quality: float | None = None,
              allowed: Sequence[str] | None = None, explain: bool = False) -> Choice:
        ok = self.known
        if allowed is not None:
            allowed_set = set(allowed)
            ok = ok & np.array([a in allowed_set for a in self.arms])
        if not ok.any():
            raise ValueError("no arm is both allowed and known to the log")
        idx = np.flatnonzero(ok)
        qi, ci, rank = q[idx], c[idx], self._name_rank[idx]
        scores = {self.arms[i]: (round(float(q[i]), 4), float(c[i])) for i in idx} if explain else {}
        if min_quality is not None:
            clear = qi >= min_quality
            if clear.any():
                # lexsort: the last key sorts first. Cheapest, then best, then by name.
                j = np.lexsort((rank, -qi, np.where(clear, ci, np.inf)))[0]
                i = idx[j]
                return Choice(self.arms[i], float(q[i]), float(c[i]),
                              f"cheapest predicted to reach quality {min_quality:g} ({q[i]:.2f})", scores)
            i = idx[np.lexsort((rank, ci, -qi))[0]]
            return Choice(self.arms[i], float(q[i]), float(c[i]),
                          f"none predicted to reach {min_quality:g}: the best predicted ({q[i]:.2f})", scores)
        value = np.round(qi - cost_weight * ci / self.reference_cost, 12)
        i = idx[np.lexsort((rank, ci, -value))[0]]
        return Choice(self.arms[i], float(q[i]), float(c[i]),
                      f"best predicted quality for its cost ({q[i]:.2f} at ${c[i]:.6f}, cost weight {cost_weight:g})",
                      scores)
