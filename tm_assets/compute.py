"""What each loop asset computes, as plain functions over DataFrames and a connection: the assets in
`tm_assets.assets` only call these and write the result, so these are tested without Dagster."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import psycopg

from tm_assets import decisions
from tm_resources import grading, quality, tasks
from tm_resources.config import Config
from tm_resources.db import one
from tm_resources.embedder import DIM, Embedder
from tm_resources.events import EventSink, event_uuid
from tm_resources.redact import redact
from tm_resources.tables import COMPLETION_ENDPOINTS, read_df, read_requests, vectors

log = logging.getLogger(__name__)

SCORED_COLUMNS = ["request_id", "ts", "user_id", "model", "tier", "coherence", "completion", "brevity", "reprompt",
                  "cost_efficiency", "prompt_quality", "quality", "prompt_embedding"]
TASK_TYPE_COLUMNS = ["request_id", "ts", "user_id", "model", "task_type", "confidence"]
PATTERN_COLUMNS = ["scope", "task_type", "model", "tier", "user_id", "requests", "samples", "avg_quality",
                   "total_cost_usd", "avg_cost_usd", "input_tokens", "output_tokens", "escalations",
                   "escalated_away", "judged", "avg_completion"]
GRADE_COLUMNS = ["user_id", "grade", "avg_quality_score", "samples", "requests_today", "tokens_today", "cost_today",
                 "escalations", "wrong_model_rate", "prompt_quality_avg", "low_prompt_days",
                 "prompt_quality_daily", "coaching_example", "prompt_weakness"]
RULE_COLUMNS = ["rule_id", "action", "task_type", "user_id", "model", "target_model", "status", "reason",
                "evidence"]
FINETUNE_COLUMNS = ["job_id", "task_type", "base_model", "samples", "avg_quality", "example_ids", "reason"]

_SCORING_INPUT = ["id", "ts", "user_id", "session_id", "model", "prompt", "response_text", "status",
                  "input_tokens", "output_tokens", "cost_usd", "baseline_cost_usd", "parent_id", "served",
                  "prompt_embedding"]

# How many of a pattern's best answers a fine-tune job lists at most.
MAX_FINETUNE_EXAMPLES = 2000


def tiers_of(config: Config) -> dict[str, str]:
    return {name: m.tier.value for name, m in config.models.items()}


# -- scored_requests --------------------------------------------------------------------------


def read_requests_for_scoring(conn: psycopg.Connection, start: datetime, end: datetime) -> pd.DataFrame:
    return read_requests(conn, start, end, _SCORING_INPUT)


def count_other_rows(conn: psycopg.Connection, hour: datetime) -> int:
    """Rows of the hour that are no model call (a models listing, a token count): logged, never scored."""
    return one(conn.execute("SELECT count(*) FROM requests WHERE ts >= %s AND ts < %s AND NOT endpoint = ANY(%s)",
                            (hour, hour + timedelta(hours=1), list(COMPLETION_ENDPOINTS))))[0]


def _prompt_vectors(df: pd.DataFrame, embedder: Embedder) -> np.ndarray:
    """The gateway's vector where it computed one (the same model and code), else embed the prompt now."""
    vecs = np.zeros((len(df), DIM), dtype=np.float32)
    if df.empty:
        return vecs
    have = df["prompt_embedding"].notna().to_numpy()
    if have.any():
        vecs[have] = vectors(df.loc[have, "prompt_embedding"], DIM)
    # A request rejected before it had a prompt keeps a zero vector: nothing to embed, type or compare.
    embed = ~have & df["prompt"].map(has_prompt).to_numpy(dtype=bool)
    if embed.any():
        vecs[embed] = embedder.embed(df.loc[embed, "prompt"].tolist())
    return vecs


def has_prompt(value: Any) -> bool:
    return bool(quality.text_or_empty(value).strip())


def unscored_kinds(requests: pd.DataFrame) -> dict[str, int]:
    """How many of these rows get no quality, by why: what an operator reads in the run's metadata."""
    status = requests["status"].astype("Int64")
    kinds = {
        "rejected (4xx)": (status.ge(400) & status.lt(500) & status.ne(499)).fillna(False),
        "failed upstream (5xx)": status.ge(500).fillna(False),
        "cut by the client (499)": status.eq(499).fillna(False),
        "answered empty": ~quality.answered(requests) & status.eq(200).fillna(False),
    }
    return {name: int(mask.sum()) for name, mask in kinds.items() if mask.any()}


def score_hour(requests: pd.DataFrame, hour: datetime, config: Config, *, prompt_embedder: Embedder,
               answer_embedder: Callable[[], Embedder],
               judge_completion: Callable[[list[list[dict]]], list[float | None]],
               log: Any = log) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score the requests of `hour`; rows after it in `requests` serve only as follow-ups (re-prompts).
    `answer_embedder` is called only when the hour has answers (an empty hour loads no second model);
    `judge_completion` scores task completion of (prompt, answer) conversations, None where it cannot."""
    timings: dict[str, float] = {}
    requests = requests.reset_index(drop=True)
    in_hour = (requests["ts"] >= pd.Timestamp(hour)) & (requests["ts"] < pd.Timestamp(hour + timedelta(hours=1)))
    if not in_hour.any():
        return pd.DataFrame(columns=SCORED_COLUMNS), {"judge": "no requests", "timings_s": timings,
                                                       "quality_scored": 0, "not_scored": {}}

    t0 = time.perf_counter()
    prompt_vecs = _prompt_vectors(requests, prompt_embedder)
    timings["embed_prompts"] = time.perf_counter() - t0

    answered = quality.answered(requests).to_numpy() & in_hour.to_numpy()
    answer_vecs = np.zeros_like(prompt_vecs)
    t0 = time.perf_counter()
    if answered.any():
        answer_vecs[answered] = answer_embedder().embed(requests.loc[answered, "response_text"].astype(str).tolist())
    timings["embed_answers"] = time.perf_counter() - t0

    judge = None
    judge_state = "off (no loop.judge_model)"
    if config.loop.judge_model and answered.any():
        t0 = time.perf_counter()
        conversations = [quality.judge_prompt(p or "", a or "") for p, a in
                         zip(requests.loc[answered, "prompt"], requests.loc[answered, "response_text"], strict=True)]
        verdicts = judge_completion(conversations)
        judge = np.full(len(requests), np.nan)
        judge[answered] = [np.nan if v is None else v for v in verdicts]
        got = int(np.isfinite(judge[answered]).sum())
        judge_state = f"{config.loop.judge_model}: {got} of {int(answered.sum())} answers judged"
        timings["judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = quality.score_requests(requests, prompt_vecs, answer_vecs, judge, config.loop.weights,
                                    config.loop.reprompt_window_s)
    timings["signals"] = time.perf_counter() - t0

    mask = in_hour.to_numpy()
    out = scores[mask].reset_index(drop=True)
    base = requests[mask].reset_index(drop=True)
    tiers = tiers_of(config)
    out["ts"] = base["ts"]
    out["user_id"] = base["user_id"]
    out["model"] = base["model"]
    out["tier"] = [tiers.get(m) if isinstance(m, str) else None for m in base["model"]]
    out["prompt_embedding"] = list(prompt_vecs[mask])
    not_scored = unscored_kinds(base)
    log.info(f"scored {len(out)} requests of {hour:%Y-%m-%d %H:00}, {int(out['quality'].notna().sum())} with a"
             f" quality; not scored: {not_scored or 'none'}; judge {judge_state}")
    return out[SCORED_COLUMNS], {"judge": judge_state, "timings_s": {k: round(v, 3) for k, v in timings.items()},
                                 "quality_scored": int(out["quality"].notna().sum()), "not_scored": not_scored}


# -- task_types -------------------------------------------------------------------------------


def classify_hour(scored: pd.DataFrame, classifier: tasks.TaskClassifier) -> tuple[pd.DataFrame, list[dict]]:
    """Task types of the scored requests that have a prompt (a rejected one has none to type)."""
    scored = scored[scored["prompt"].map(has_prompt).astype(bool)] if not scored.empty else scored
    if scored.empty:
        return pd.DataFrame(columns=TASK_TYPE_COLUMNS), []
    vecs = vectors(scored["prompt_embedding"], DIM)
    results = classifier.classify(vecs)
    typed = scored[["request_id", "ts", "user_id", "model"]].copy()
    typed["task_type"] = [t for t, _ in results]
    typed["confidence"] = [float(c) for _, c in results]
    candidates = tasks.candidate_types(vecs, scored["prompt"].fillna("").tolist(), typed["task_type"].tolist(),
                                       typed["confidence"].tolist())
    return typed[TASK_TYPE_COLUMNS], candidates


def candidates_markdown(candidates: list[dict]) -> str:
    if not candidates:
        return "_no cluster of unclear prompts large enough to suggest a new type_"
    lines = ["| size | distinctive words | examples |", "|---|---|---|"]
    for c in candidates:
        words = ", ".join(c.get("top_words", [])[:6])
        # Redacted before clipping: the UI shows this to anyone who can open it, and a clipped key
        # might no longer look like one.
        examples = " / ".join(redact(e)[:80].replace("|", " ").replace("\n", " ") for e in c.get("examples", [])[:3])
        lines.append(f"| {c.get('size')} | {words} | {examples} |")
    return "\n".join(lines)


# -- patterns and grades ----------------------------------------------------------------------


def read_window(conn: psycopg.Connection, hour: datetime, *, hours: int) -> pd.DataFrame:
    """Scored (and, where known, typed) requests in the `hours` ending with `hour`'s end."""
    end = hour + timedelta(hours=1)
    return read_df(
        conn,
        "SELECT r.id, r.ts, r.user_id, r.session_id, r.model, r.status, r.prompt, r.input_tokens,"
        " r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.cost_usd, r.baseline_cost_usd,"
        " r.parent_id, r.served, r.route_reason, r.cache_hit, s.quality, s.completion, s.prompt_quality, t.task_type"
        " FROM scored_requests s"
        " JOIN requests r ON r.id = s.request_id AND r.ts = s.ts"
        " LEFT JOIN task_types t ON t.request_id = s.request_id"
        " WHERE s.ts >= %s AND s.ts < %s ORDER BY s.ts, s.request_id",
        (end - timedelta(hours=hours), end),
    )


def patterns_table(window: pd.DataFrame, config: Config) -> pd.DataFrame:
    # A cached answer says nothing new about its model (and cost nothing): patterns count model calls.
    window = window[window["cache_hit"].isna()] if "cache_hit" in window else window
    if window.empty:
        return pd.DataFrame(columns=PATTERN_COLUMNS)
    by_user, by_type_model = grading.patterns(window, tiers_of(config))
    by_user = by_user.assign(scope="type_model_user")
    by_type_model = by_type_model.assign(scope="type_model", user_id="")
    return pd.concat([by_type_model, by_user], ignore_index=True)[PATTERN_COLUMNS]


def grades_table(window: pd.DataFrame, hour: datetime, config: Config) -> pd.DataFrame:
    if window.empty:
        return pd.DataFrame(columns=GRADE_COLUMNS)
    g = grading.grades(window, pd.Timestamp(hour + timedelta(hours=1)), config.loop.timezone,
                       coaching_below=config.loop.thresholds.coaching_below)
    return g[GRADE_COLUMNS]


# -- routing_rules ----------------------------------------------------------------------------


def read_decision_inputs(conn: psycopg.Connection, hour: datetime, config: Config) -> dict[str, Any]:
    end = hour + timedelta(hours=1)
    pats = read_df(conn, "SELECT task_type, model, tier, requests, samples, avg_quality, total_cost_usd,"
                         " avg_cost_usd, escalations, judged, avg_completion FROM patterns"
                         " WHERE hour = %s AND scope = 'type_model'"
                         " ORDER BY task_type, model", (hour,))
    grade_rows = read_df(conn, f"SELECT {', '.join(GRADE_COLUMNS)} FROM grades WHERE hour = %s ORDER BY user_id",
                         (hour,))
    # The anomaly baseline looks back a week of the user's active hours.
    costs = read_df(conn, "SELECT user_id, ts, cost_usd FROM requests WHERE ts >= %s AND ts < %s",
                    (end - timedelta(days=8), end))
    versions = None
    if one(conn.execute("SELECT to_regclass('model_versions')"))[0] is not None:
        versions = read_df(conn, "SELECT version AS model, base_model, task_type, eval_score, base_eval_score"
                                 " FROM model_versions WHERE status IN ('won', 'lost') ORDER BY version")
    quotas = read_df(conn, "SELECT provider, state, used, quota_limit, used_fraction, exhausts_at, reset_at, summary"
                           " FROM provider_quotas WHERE hour = %s ORDER BY provider", (hour,))
    return {"patterns": pats, "grades": grade_rows, "user_hour_costs": grading.user_hour_costs(costs),
            "model_versions": versions, "hour": pd.Timestamp(hour), "provider_quotas": quotas}


def decide_hour(inputs: dict[str, Any], config: Config) -> pd.DataFrame:
    found = decisions.decide(
        inputs["patterns"], inputs["grades"], inputs["user_hour_costs"], inputs["model_versions"],
        config.loop.thresholds, tiers_of(config), config.loop.mode,
        frontier_model=config.defaults.frontier_model, hour=inputs["hour"],
        provider_quotas=inputs.get("provider_quotas"),
    )
    return pd.DataFrame([{c: getattr(d, c) for c in RULE_COLUMNS} for d in found], columns=RULE_COLUMNS)


_EVENT_BY_ACTION = {"throttle": "tm_anomaly", "coach": "tm_coaching_brief"}


def send_decision_events(sink: EventSink, rules: pd.DataFrame, hour: datetime) -> int:
    """One PostHog event per decision (anomalies and coaching briefs under their own names).
    Event ids derive from the hour and the rule, so a re-run hour does not count twice."""
    if not sink.enabled:
        return 0
    for r in rules.itertuples(index=False):
        sink.capture(
            _EVENT_BY_ACTION.get(r.action, "tm_routing_decision"),
            distinct_id=r.user_id if isinstance(r.user_id, str) and r.user_id else "token-machine",
            properties={
                "rule_id": r.rule_id, "action": r.action, "status": r.status, "reason": r.reason,
                "task_type": r.task_type, "model": r.model, "target_model": r.target_model,
                "evidence": r.evidence, "hour": hour.isoformat(),
            },
            event_id=event_uuid(hour.isoformat(), r.rule_id),
            timestamp=hour + timedelta(hours=1),
        )
    return len(rules)


# -- finetune_jobs ----------------------------------------------------------------------------


def finetune_jobs_for_hour(conn: psycopg.Connection, hour: datetime, config: Config) -> pd.DataFrame:
    """A job per fine-tune candidate decided this hour, with the best answers of its pattern."""
    candidates = read_df(conn, "SELECT rule_id, task_type, model, target_model, reason, evidence"
                               " FROM routing_rules WHERE hour = %s AND action = 'finetune_candidate'"
                               " ORDER BY rule_id", (hour,))
    end = hour + timedelta(hours=1)
    start = end - timedelta(hours=config.loop.pattern_window_h)
    jobs = []
    for c in candidates.itertuples(index=False):
        rows = conn.execute(
            "SELECT s.request_id, s.quality FROM scored_requests s"
            " JOIN task_types t ON t.request_id = s.request_id"
            " WHERE t.task_type = %s AND s.model = %s AND s.ts >= %s AND s.ts < %s AND s.quality > %s"
            " ORDER BY s.quality DESC, s.request_id LIMIT %s",
            (c.task_type, c.model, start, end, config.loop.thresholds.finetune_min_quality, MAX_FINETUNE_EXAMPLES),
        ).fetchall()
        if not rows:
            continue
        jobs.append({
            "job_id": f"ft:{c.task_type}:{c.model}",
            "task_type": c.task_type,
            # Train on top of the local model that serves the type (the pattern's own when it is local).
            "base_model": c.target_model or c.model,
            "samples": len(rows),
            "avg_quality": float(np.mean([q for _, q in rows])),
            "example_ids": [rid for rid, _ in rows],
            "reason": c.reason,
        })
    return pd.DataFrame(jobs, columns=FINETUNE_COLUMNS)
