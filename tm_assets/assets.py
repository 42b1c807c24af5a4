"""The loop's asset graph, one asset per table, hourly partitions:
requests -> scored_requests -> task_types -> patterns -> grades -> routing_rules -> finetune_jobs,
and scored_requests -> cache_entries (what the gateway's semantic cache may serve),
and task_types -> usage_hourly -> team_usage_hourly (the dashboard's roll-ups of the log).
Each asset reads Postgres, calls the plain functions in `tm_assets.compute`, and replaces its hour."""


import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import pandas as pd
import psycopg

from tm_assets import compute, rollups
from tm_assets.grade_events import send_grade_events
from tm_assets.quota_hour import QUOTA_COLUMNS, provider_quotas_hour
from tm_assets.resources import TokenMachineConfig
from tm_resources import cache, quality
from tm_resources.config import Config, ConfigError
from tm_resources.db import one
from tm_resources.loop_start import first_hour
from tm_resources.quotas import with_loop_mode
from tm_resources.registry import served_config
from tm_resources.tables import read_df, replace_hour_df


def _installation_start() -> datetime:
    # Read once, when the definitions load: loop.start, else the first logged request's hour.
    try:
        config = TokenMachineConfig(path=os.environ.get("TM_CONFIG") or None).load()
    except (ConfigError, OSError):
        config = None  # a broken tm.yaml is reported by the first run, not by a code location that fails to load
    return first_hour(config, os.environ.get("TM_DATABASE_URL"))


# end_offset=1: the hour in progress is a partition too, so an operator can score the traffic just sent
# (`tm loop run`); the automation never picks it, and re-scores that hour whole once it has ended.
hourly = dg.HourlyPartitionsDefinition(start_date=_installation_start().strftime("%Y-%m-%d-%H:%M"), timezone="UTC",
                                       end_offset=1)

# The root fires five minutes past each hour for the hour just ended; the rest follow once their
# parents have updated, and not past a failed blocking check. Older hours are re-run as backfills.
FIVE_PAST = "5 * * * *"
hour_just_ended = (
    dg.AutomationCondition.in_latest_time_window(timedelta(hours=2))
    & ~dg.AutomationCondition.in_latest_time_window()
).with_label("the hour just ended")
root_condition = (
    dg.AutomationCondition.cron_tick_passed(FIVE_PAST)
    & hour_just_ended
    & ~dg.AutomationCondition.in_progress()
).with_label("hourly at five past")
# on_cron(FIVE_PAST), but for the hour just ended rather than the latest partition (the hour in progress).
follow_condition = (
    hour_just_ended
    # Dagster types since_last_handled() for asset-or-check conditions only; it is documented for assets.
    & dg.AutomationCondition.cron_tick_passed(FIVE_PAST).since_last_handled()  # type: ignore[misc, operator]
    & dg.AutomationCondition.all_deps_updated_since_cron(FIVE_PAST)
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("after its parents, hourly")

requests_source = dg.AssetSpec(
    "requests",
    description="The request log the gateway writes, one row per request: the single source of truth.",
    group_name="gateway",
    kinds={"postgres"},
)

LOOP = "loop"


def hours_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> list[datetime]:
    """The hours a run covers: one, or a backfill's whole range (backfills run as one run)."""
    window = context.partition_time_window
    return [window.start + timedelta(hours=i) for i in range(int((window.end - window.start) / timedelta(hours=1)))]


def _preview(df: pd.DataFrame, columns: list[str], n: int = 10) -> dg.MetadataValue:
    if df.empty:
        return dg.MetadataValue.md("_no rows this hour_")
    return dg.MetadataValue.md(df[columns].head(n).to_markdown(index=False, floatfmt=".3f"))


@dataclass
class Hour:
    """What an hourly table's computation gets: the hour, an open connection, the configuration and the run."""

    start: datetime
    conn: psycopg.Connection
    config: Config
    context: dg.AssetExecutionContext

    @property
    def resources(self) -> Any:
        return self.context.resources


# The computation returns the hour's frame (written by the factory) or, for a table it writes itself, its
# row count; and the metadata an operator reads for the hour.
HourResult = tuple[pd.DataFrame | int, dict[str, Any]]


def hourly_table(*, deps: list, description: str, columns: list[str] | None,
                 automation_condition: dg.AutomationCondition = follow_condition,
                 resources: tuple[str, ...] = ()) -> Callable[[Callable[[Hour], HourResult]], dg.AssetsDefinition]:
    """The shell every loop table shares: hourly partitions (a backfill is one run over its range, models
    loaded once), and each hour of the run replaced whole (delete its rows, insert again) in one
    transaction, so re-running any hour or range is safe. `columns`: the frame's columns to write;
    None when the computation writes its table itself."""

    def build(compute_hour: Callable[[Hour], HourResult]) -> dg.AssetsDefinition:
        table = compute_hour.__name__

        @dg.asset(
            name=table,
            partitions_def=hourly,
            backfill_policy=dg.BackfillPolicy.single_run(),
            deps=deps,
            automation_condition=automation_condition,
            group_name=LOOP,
            kinds={"postgres"},
            description=description,
            required_resource_keys={"postgres", "tm_config", *resources},
        )
        def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            config = context.resources.tm_config.load()
            rows: dict[str, int] = {}
            metadata: dict[str, Any] = {}
            with context.resources.postgres.get_connection() as conn:
                for start in hours_of(context):
                    result, metadata = compute_hour(Hour(start, conn, config, context))
                    rows[f"{start:%Y-%m-%d-%H:%M}"] = (
                        result if columns is None else replace_hour_df(conn, table, start, result, columns))
                    rollups.record_loop_run(conn, table, start, context.run_id)
            # A range run records one materialization per hour, all with this metadata: the last hour's
            # details, and every hour's row count.
            if len(rows) > 1:
                metadata = {**metadata, "rows_by_hour": dg.MetadataValue.json(rows)}
            return dg.MaterializeResult(metadata={"dagster/row_count": sum(rows.values()), **metadata})

        return _asset

    return build


@hourly_table(
    deps=[requests_source],
    columns=compute.SCORED_COLUMNS,
    automation_condition=root_condition,
    resources=("embedder", "judge"),
    description="A composite quality score 0..1 per request from five signals, each kept in its own column.",
)
def scored_requests(h: Hour) -> HourResult:
    config = served_config(h.conn, h.config)
    # Follow-ups after the hour's end still tell whether an answer in it was corrected.
    lookahead = timedelta(hours=1, seconds=config.loop.reprompt_window_s)
    requests = compute.read_requests_for_scoring(h.conn, h.start, h.start + lookahead)
    embedder, judge = h.resources.embedder, h.resources.judge
    scored, stats = compute.score_hour(
        requests, h.start, config, prompt_embedder=embedder.get(),
        answer_embedder=lambda: embedder.get(config.loop.answer_embedding_precision,
                                             config.loop.answer_embedding_tokens),
        judge_completion=lambda conversations: judge.judge(config, conversations, quality.parse_judge),
        log=h.context.log)
    return scored, {
        # Every model call of the hour has a row here; only answered ones get a quality.
        "quality_scored": stats["quality_scored"],
        "not_scored": dg.MetadataValue.json(stats["not_scored"]),
        "not_model_calls": compute.count_other_rows(h.conn, h.start),
        "avg_quality": float(scored["quality"].mean()) if stats["quality_scored"] else None,
        "judge": stats["judge"],
        "weights": dg.MetadataValue.json(config.loop.weights.model_dump()),
        "timings_s": dg.MetadataValue.json(stats["timings_s"]),
        "preview": _preview(scored, ["request_id", "user_id", "model", "coherence", "completion", "brevity",
                                     "reprompt", "cost_efficiency", "quality"]),
    }


@hourly_table(
    deps=[scored_requests],
    columns=compute.TASK_TYPE_COLUMNS,
    resources=("embedder", "task_classifier"),
    description="A task type per request from its prompt's embedding (nearest labelled examples), "
    "and clusters of unclear prompts reported as candidate new types.",
)
def task_types(h: Hour) -> HourResult:
    scored = read_df(h.conn, "SELECT s.request_id, s.ts, s.user_id, s.model, s.prompt_embedding, r.prompt"
                             " FROM scored_requests s JOIN requests r ON r.id = s.request_id AND r.ts = s.ts"
                             " WHERE s.hour = %s ORDER BY s.ts, s.request_id", (h.start,))
    classifier = h.resources.task_classifier.get(h.config, h.resources.embedder.get())
    typed, candidates = compute.classify_hour(scored, classifier)
    counts = typed["task_type"].value_counts().sort_index().to_dict() if len(typed) else {}
    return typed, {
        "not_typed_no_prompt": len(scored) - len(typed),
        "by_type": dg.MetadataValue.json({k: int(v) for k, v in counts.items()}),
        "candidate_new_types": dg.MetadataValue.md(compute.candidates_markdown(candidates)),
        "preview": _preview(typed, ["request_id", "user_id", "model", "task_type", "confidence"]),
    }


@hourly_table(
    deps=[task_types],
    columns=compute.PATTERN_COLUMNS,
    description="Per (task type, model, user) and per (task type, model): samples, average quality, cost, "
    "tokens, escalations, over the trailing pattern window.",
)
def patterns(h: Hour) -> HourResult:
    config = served_config(h.conn, h.config)
    window = compute.read_window(h.conn, h.start, hours=config.loop.pattern_window_h)
    table = compute.patterns_table(window, config)
    by_type_model = table[table["scope"] == "type_model"] if len(table) else table
    return table, {
        "window_hours": config.loop.pattern_window_h,
        "requests_in_window": len(window),
        "preview": _preview(by_type_model, ["task_type", "model", "tier", "samples", "avg_quality",
                                            "avg_cost_usd", "escalations"], n=20),
    }


@hourly_table(
    deps=[patterns],
    columns=compute.GRADE_COLUMNS,
    resources=("posthog",),
    description="Per user: a rolling A-F grade from the trailing 24 hours, today's requests, tokens and cost, "
    "wrong-model rate, and prompt quality over 72 hours.",
)
def grades(h: Hour) -> HourResult:
    window = compute.read_window(h.conn, h.start, hours=max(72, 24 * h.config.loop.thresholds.coaching_days + 24))
    table = compute.grades_table(window, h.start, h.config)
    return table, {
        "posthog_events": send_grade_events(h.resources.posthog.sink(), table, h.start),
        "timezone": h.config.loop.timezone,
        "leaderboard": _preview(table.sort_values(["avg_quality_score"], ascending=False) if len(table) else table,
                                ["user_id", "grade", "avg_quality_score", "requests_today", "cost_today",
                                 "prompt_quality_avg", "wrong_model_rate"], n=25),
    }


@hourly_table(
    deps=[requests_source],
    columns=QUOTA_COLUMNS,
    automation_condition=root_condition,
    resources=("posthog",),
    description="Per provider: its quota's usage since the last reset, the recent rate, when it runs out at that "
    "rate (with an interval), and its state (ok, warning, critical, exhausted); a change of state is an alert.",
)
def provider_quotas(h: Hour) -> HourResult:
    table, forecasts, moved = provider_quotas_hour(h.conn, h.config, h.start, h.resources.posthog.sink())
    return table, {
        "forecasts": dg.MetadataValue.json(forecasts),
        "state_changes": dg.MetadataValue.json(moved),
        "summary": dg.MetadataValue.md("\n".join(f"- **{f['state']}** {f['summary']}" for f in forecasts)
                                       or "_no providers_"),
    }


@hourly_table(
    deps=[grades, provider_quotas],
    columns=compute.RULE_COLUMNS,
    resources=("posthog",),
    description="The decision engine: eight decisions (throttle, escalate, cascade, lock_local, swap_model, "
    "finetune_candidate, coach, shift away from a provider whose quota is critical), each rule with its reason "
    "and evidence; the mode is `tm mode`'s when set, else loop.mode. "
    "The gateway obeys the active rules of the newest hour.",
)
def routing_rules(h: Hour) -> HourResult:
    config = with_loop_mode(h.conn, served_config(h.conn, h.config))
    inputs = compute.read_decision_inputs(h.conn, h.start, config)
    rules = compute.decide_hour(inputs, config)
    sent = compute.send_decision_events(h.resources.posthog.sink(), rules, h.start)
    return rules, {
        "mode": config.loop.mode,
        "thresholds": dg.MetadataValue.json(config.loop.thresholds.model_dump()),
        "decisions": dg.MetadataValue.md(
            rules[["rule_id", "action", "status", "reason"]].to_markdown(index=False) if len(rules)
            else "_no decisions_"),
        "posthog_events": sent,
    }


@hourly_table(
    deps=[routing_rules],
    columns=compute.FINETUNE_COLUMNS,
    description="Fine-tune candidates (common, well-served patterns) with the logged answers they would train on.",
)
def finetune_jobs(h: Hour) -> HourResult:
    jobs = compute.finetune_jobs_for_hour(h.conn, h.start, h.config)
    return jobs, {"preview": _preview(jobs, ["job_id", "task_type", "base_model", "samples", "avg_quality"])}


@hourly_table(
    deps=[scored_requests],
    # Written by cache.replace_entries: it also drops week-old entries, and the gateway reads it the same way.
    columns=None,
    description="The answers the gateway's semantic cache may serve: the hour's requests whose answer "
    "scored at least loop.thresholds.cache_min_quality and ended normally, and whose prompt fits the "
    "embedder's 128-token window (a longer one is embedded from its opening only), with their prompt "
    "vectors (HNSW-indexed). Entries older than a week are dropped.",
)
def cache_entries(h: Hour) -> HourResult:
    n = cache.replace_entries(h.conn, h.start, h.config)
    total = one(h.conn.execute("SELECT count(*) FROM cache_entries"))[0]
    return n, {"entries_in_table": int(total), "min_quality": h.config.loop.thresholds.cache_min_quality}


@hourly_table(
    deps=[task_types],
    columns=None,
    description="The dashboard's roll-up of the request log: per hour x user x agent x model x route x task type, "
    "requests, errors, fallbacks, cache hits, tokens, cost, the all-frontier baseline cost, latency (sum and "
    "log2 buckets). The dashboard reads this, never the raw log.",
)
def usage_hourly(h: Hour) -> HourResult:
    n = rollups.replace_usage_hour(h.conn, h.start, h.config)
    return n, {"frontier_model": h.config.defaults.frontier_model}


@hourly_table(
    deps=[usage_hourly],
    columns=None,
    description="usage_hourly added up over users and task types (per hour x agent x model x route): what the "
    "dashboard's team overview reads.",
)
def team_usage_hourly(h: Hour) -> HourResult:
    return rollups.replace_team_usage_hour(h.conn, h.start), {}


loop_assets = [scored_requests, task_types, patterns, grades, provider_quotas, routing_rules, finetune_jobs,
               cache_entries, usage_hourly, team_usage_hourly]
