"""The learned router, trained on the request log: `KnnRouter` (tm_gateway/router.py) fitted to the
scored requests of the last week, one arm per model.

Each scored row is one model's answer to one prompt: its quality (the loop's 0..1 score), what it
cost, and the prompt's vector (the gateway's embedding of the prompt, else the one the loop
computed). In the router's (rows, arms) matrices that row fills its model's column and leaves the
others NaN; a prompt answered by two models (a cascade and its escalation) is two rows with the same
vector. Answers served from the response cache (`provider = 'cache'`) are left out: they say nothing
about the model named on them.

Loading reads at most `max_rows` rows (the newest), and fitting condenses them to `max_points`
prototypes: about 2.5 s for 20,000 rows on two cores. The gateway does it off the request path
(tm_gateway/state.py), whenever the loop has written new routing rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg

from tm_gateway.router import Choice, KnnRouter

log = logging.getLogger(__name__)

# Defaults measured on RouterBench (router.py's docstring, docs/benchmarks.md): a wide
# neighbourhood, soft weights, and two pseudo-rows of the model's mean.
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.3
DEFAULT_PRIOR_WEIGHT = 2.0
DEFAULT_MAX_POINTS = 2048
DEFAULT_MAX_ROWS = 20_000


@dataclass(frozen=True)
class RouterSettings:
    """What `load_router` takes besides the connection and the models; held by the gateway."""

    window_h: int = 168
    min_rows: int = 50
    min_rows_per_model: int = 10
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    prior_weight: float = DEFAULT_PRIOR_WEIGHT
    max_points: int = DEFAULT_MAX_POINTS
    max_rows: int = DEFAULT_MAX_ROWS


@dataclass(frozen=True)
class LearnedRouter:
    """The outcome of one load: the fitted router, or None and the reason why not.

    rows: the rows the router learned from (those of its arms); arms: its models, sorted;
    rows_per_model: every model seen in the window with its row count, the ones left out included.
    """

    router: KnnRouter | None
    rows: int
    arms: tuple[str, ...]
    reason: str
    loaded_at: datetime
    window_h: int
    rows_per_model: dict[str, int] = field(default_factory=dict, compare=False)
    # The arms the log knows (every arm, as built here), for `choose`'s quick check of `allowed`.
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        r = self.router
        known = frozenset(a for a, ok in zip(r.arms, r.known, strict=True) if ok) if r is not None else frozenset()
        object.__setattr__(self, "_known", known)

    @property
    def ready(self) -> bool:
        return self.router is not None

    def choose(self, vec: np.ndarray | None, *, allowed: Iterable[str] | None = None, cost_weight: float = 0.0,
               min_quality: float | None = None) -> Choice | None:
        """The router's choice among `allowed` (None: any arm) for one prompt vector; None when there
        is no router, no vector, or no allowed model the log knows."""
        if self.router is None or vec is None:
            return None
        if allowed is not None:
            allowed = [a for a in allowed if a in self._known]
            if not allowed:
                return None
        elif not self._known:
            return None
        return self.router.choose(vec, cost_weight=cost_weight, min_quality=min_quality, allowed=allowed)


def _array(v: object) -> np.ndarray:
    # pgvector's Vector (what its loaders return), or an array or a list.
    return np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)


_QUERY = """
SELECT s.model, coalesce(s.prompt_embedding, r.prompt_embedding) AS vec, s.quality, r.cost_usd
FROM scored_requests s
JOIN requests r ON r.id = s.request_id AND r.ts > %(since)s AND r.ts <= %(now)s
WHERE s.ts > %(since)s AND s.ts <= %(now)s
  AND s.quality IS NOT NULL AND s.model IS NOT NULL
  AND coalesce(s.prompt_embedding, r.prompt_embedding) IS NOT NULL
  AND r.provider IS DISTINCT FROM 'cache'
  {models}
ORDER BY s.ts DESC
LIMIT %(limit)s
"""


def load_router(conn: psycopg.Connection, *, models: Iterable[str] | None = None, window_h: int = 168,
                min_rows: int = 50, min_rows_per_model: int = 10, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, prior_weight: float = DEFAULT_PRIOR_WEIGHT,
                max_points: int = DEFAULT_MAX_POINTS, max_rows: int = DEFAULT_MAX_ROWS,
                reference_cost: float | None = None, now: datetime | None = None) -> LearnedRouter:
    """Fit the router to the scored requests of the last `window_h` hours before `now`.

    models: the models it may choose (those configured); None: every model in the log. A model
    needs `min_rows_per_model` rows to be an arm, and the router needs two arms and `min_rows`
    rows in all; otherwise `.router` is None and `.reason` says what was missing. The newest
    `max_rows` rows are read. Raises on a database error (the caller keeps what it had)."""
    from pgvector.psycopg import register_vector

    now = now or datetime.now(UTC)
    since = now - timedelta(hours=window_h)
    wanted = None if models is None else sorted(set(models))

    def empty(reason: str, rows: int = 0, per_model: dict[str, int] | None = None) -> LearnedRouter:
        return LearnedRouter(None, rows, (), reason, now, window_h, per_model or {})

    if wanted is not None and not wanted:
        return empty("no models to choose from")
    register_vector(conn)  # vector columns as pgvector's Vector, whoever opened the connection
    params = {"since": since, "now": now, "limit": max_rows, "models": wanted}
    sql = _QUERY.format(models="AND s.model = ANY(%(models)s)" if wanted is not None else "")
    with conn.cursor(binary=True) as cur:
        rows = cur.execute(sql, params).fetchall()

    keep = [(m, v, float(q), float(c)) for m, v, q, c in rows if math.isfinite(q)]
    per_model: dict[str, int] = {}
    for m, *_ in keep:
        per_model[m] = per_model.get(m, 0) + 1
    per_model = dict(sorted(per_model.items()))
    window = f"the last {window_h} h"
    if len(keep) < min_rows:
        return empty(f"only {len(keep)} scored requests with a prompt vector in {window}"
                     f"{' from the configured models' if wanted is not None else ''}; need {min_rows}",
                     len(keep), per_model)
    arms = tuple(m for m, n in per_model.items() if n >= min_rows_per_model)
    if len(arms) < 2:
        counts = ", ".join(f"{m}: {n}" for m, n in per_model.items())
        return empty(f"fewer than two models have {min_rows_per_model} scored requests in {window} ({counts})",
                     len(keep), per_model)
    col = {m: i for i, m in enumerate(arms)}
    keep = [r for r in keep if r[0] in col]
    if len(keep) < min_rows:
        return empty(f"only {len(keep)} scored requests of models with at least {min_rows_per_model} each in"
                     f" {window}; need {min_rows}", len(keep), per_model)

    vectors = np.stack([_array(v) for _, v, _, _ in keep])
    quality = np.full((len(keep), len(arms)), np.nan)
    cost = np.full_like(quality, np.nan)
    idx = np.arange(len(keep))
    cols = np.array([col[m] for m, *_ in keep])
    quality[idx, cols] = [q for _, _, q, _ in keep]
    cost[idx, cols] = [c for _, _, _, c in keep]
    router = KnnRouter(vectors, arms, quality, cost, k=k, temperature=temperature, prior_weight=prior_weight,
                       max_points=max_points, reference_cost=reference_cost)
    capped = f" (the newest {max_rows})" if len(rows) >= max_rows else ""
    return LearnedRouter(router, len(keep), arms,
                         f"learned from {len(keep)} scored requests{capped} of {len(arms)} models in {window}",
                         now, window_h, per_model)


def load_with(conn: psycopg.Connection, settings: RouterSettings, models: Iterable[str] | None = None,
              now: datetime | None = None) -> LearnedRouter:
    """`load_router` with a `RouterSettings`."""
    return load_router(conn, models=models, window_h=settings.window_h, min_rows=settings.min_rows,
                       min_rows_per_model=settings.min_rows_per_model, k=settings.k,
                       temperature=settings.temperature, prior_weight=settings.prior_weight,
                       max_points=settings.max_points, max_rows=settings.max_rows, now=now)
