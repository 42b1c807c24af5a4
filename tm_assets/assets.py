"""The loop's asset graph, one asset per table, hourly partitions:
requests -> scored_requests -> task_types -> patterns -> grades -> routing_rules -> finetune_jobs,
and scored_requests -> cache_entries (what the gateway's semantic cache may serve).
Each asset reads Postgres, calls the plain functions in `tm_assets.compute`, and replaces its hour."""


from datetime import datetime, timedelta

import dagster as dg
import pandas as pd

from tm_assets import compute
from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig
from tm_resources import cache
from tm_resources.registry import served_config
from tm_resources.tables import read_df, replace_hour_df

# end_offset=1: the hour in progress is a partition too, so an operator can score the traffic just sent
# (`tm loop run`); the automation never picks it, and re-scores that hour whole once it has ended.
hourly = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", timezone="UTC", end_offset=1)

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
    & dg.AutomationCondition.cron_tick_passed(FIVE_PAST).since_last_handled()
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


def hour_of(context: dg.AssetExecutionContext) -> datetime:
    return context.partition_time_window.start


def _preview(df: pd.DataFrame, columns: list[str], n: int = 10) -> dg.MetadataValue:
    if df.empty:
        return dg.MetadataValue.md("_no rows this hour_")
    return dg.MetadataValue.md(df[columns].head(n).to_markdown(index=False, floatfmt=".3f"))


@dg.asset(
    partitions_def=hourly,
    deps=[requests_source],
    automation_condition=root_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="A composite quality score 0..1 per request from five signals, each kept in its own column.",
)
def scored_requests(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        config = served_config(conn, config)
        # Follow-ups after the hour's end still tell whether an answer in it was corrected.
        lookahead = timedelta(hours=1, seconds=config.loop.reprompt_window_s)
        requests = compute.read_requests_for_scoring(conn, hour, hour + lookahead)
        scored, stats = compute.score_hour(requests, hour, config, log=context.log)
        n = replace_hour_df(conn, "scored_requests", hour, scored, compute.SCORED_COLUMNS)
        skipped = compute.count_other_rows(conn, hour)
    w = config.loop.weights
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        # Every model call of the hour has a row here; only answered ones get a quality.
        "quality_scored": stats["quality_scored"],
        "not_scored": dg.MetadataValue.json(stats["not_scored"]),
        "not_model_calls": skipped,
        "avg_quality": float(scored["quality"].mean()) if stats["quality_scored"] else None,
        "judge": stats["judge"],
        "weights": dg.MetadataValue.json(w.model_dump()),
        "timings_s": dg.MetadataValue.json(stats["timings_s"]),
        "preview": _preview(scored, ["request_id", "user_id", "model", "coherence", "completion", "brevity",
                                     "reprompt", "cost_efficiency", "quality"]),
    })


@dg.asset(
    partitions_def=hourly,
    deps=[scored_requests],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="A task type per request from its prompt's embedding (nearest labelled examples), "
    "and clusters of unclear prompts reported as candidate new types.",
)
def task_types(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        scored = read_df(conn, "SELECT s.request_id, s.ts, s.user_id, s.model, s.prompt_embedding, r.prompt"
                               " FROM scored_requests s JOIN requests r ON r.id = s.request_id AND r.ts = s.ts"
                               " WHERE s.hour = %s ORDER BY s.ts, s.request_id", (hour,))
        typed, candidates = compute.classify_hour(scored, config)
        n = replace_hour_df(conn, "task_types", hour, typed, compute.TASK_TYPE_COLUMNS)
    counts = typed["task_type"].value_counts().sort_index().to_dict() if n else {}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "not_typed_no_prompt": len(scored) - n,
        "by_type": dg.MetadataValue.json({k: int(v) for k, v in counts.items()}),
        "candidate_new_types": dg.MetadataValue.md(compute.candidates_markdown(candidates)),
        "preview": _preview(typed, ["request_id", "user_id", "model", "task_type", "confidence"]),
    })


@dg.asset(
    partitions_def=hourly,
    deps=[task_types],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="Per (task type, model, user) and per (task type, model): samples, average quality, cost, "
    "tokens, escalations, over the trailing pattern window.",
)
def patterns(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        config = served_config(conn, config)
        window = compute.read_window(conn, hour, hours=config.loop.pattern_window_h)
        table = compute.patterns_table(window, config)
        n = replace_hour_df(conn, "patterns", hour, table, compute.PATTERN_COLUMNS)
    by_type_model = table[table["scope"] == "type_model"] if n else table
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "window_hours": config.loop.pattern_window_h,
        "requests_in_window": len(window),
        "preview": _preview(by_type_model, ["task_type", "model", "tier", "samples", "avg_quality",
                                            "avg_cost_usd", "escalations"], n=20),
    })


@dg.asset(
    partitions_def=hourly,
    deps=[patterns],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="Per user: a rolling A-F grade from the trailing 24 hours, today's requests, tokens and cost, "
    "wrong-model rate, and prompt quality over 72 hours.",
)
def grades(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        window = compute.read_window(conn, hour, hours=max(72, 24 * config.loop.thresholds.coaching_days + 24))
        table = compute.grades_table(window, hour, config)
        n = replace_hour_df(conn, "grades", hour, table, compute.GRADE_COLUMNS)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "timezone": config.loop.timezone,
        "leaderboard": _preview(table.sort_values(["avg_quality_score"], ascending=False) if n else table,
                                ["user_id", "grade", "avg_quality_score", "requests_today", "cost_today",
                                 "prompt_quality_avg", "wrong_model_rate"], n=25),
    })


@dg.asset(
    partitions_def=hourly,
    deps=[grades],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="The decision engine: seven decisions (throttle, escalate, cascade, lock_local, swap_model, "
    "finetune_candidate, coach), each rule with its reason and evidence. "
    "The gateway obeys the active rules of the newest hour.",
)
def routing_rules(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig,
    posthog: PostHogResource,
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        config = served_config(conn, config)
        inputs = compute.read_decision_inputs(conn, hour, config)
        rules = compute.decide_hour(inputs, config)
        n = replace_hour_df(conn, "routing_rules", hour, rules, compute.RULE_COLUMNS)
    sink = posthog.sink()
    try:
        sent = compute.send_decision_events(sink, rules, hour)
    finally:
        sink.close()
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "mode": config.loop.mode,
        "thresholds": dg.MetadataValue.json(config.loop.thresholds.model_dump()),
        "decisions": dg.MetadataValue.md(
            rules[["rule_id", "action", "status", "reason"]].to_markdown(index=False) if n else "_no decisions_"),
        "posthog_events": sent,
    })


@dg.asset(
    partitions_def=hourly,
    deps=[routing_rules],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="Fine-tune candidates (common, well-served patterns) with the logged answers they would train on.",
)
def finetune_jobs(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        jobs = compute.finetune_jobs_for_hour(conn, hour, config)
        n = replace_hour_df(conn, "finetune_jobs", hour, jobs, compute.FINETUNE_COLUMNS)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "preview": _preview(jobs, ["job_id", "task_type", "base_model", "samples", "avg_quality"]),
    })


@dg.asset(
    partitions_def=hourly,
    deps=[scored_requests],
    automation_condition=follow_condition,
    group_name=LOOP,
    kinds={"postgres"},
    description="The answers the gateway's semantic cache may serve: the hour's requests whose answer "
    "scored at least loop.thresholds.cache_min_quality and ended normally, and whose prompt fits the "
    "embedder's 128-token window (a longer one is embedded from its opening only), with their prompt "
    "vectors (HNSW-indexed). Entries older than a week are dropped.",
)
def cache_entries(
    context: dg.AssetExecutionContext, postgres: PostgresResource, tm_config: TokenMachineConfig
) -> dg.MaterializeResult:
    config = tm_config.load()
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        n = cache.replace_entries(conn, hour, config)
        total = conn.execute("SELECT count(*) FROM cache_entries").fetchone()[0]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": n,
        "entries_in_table": int(total),
        "min_quality": config.loop.thresholds.cache_min_quality,
    })


loop_assets = [scored_requests, task_types, patterns, grades, routing_rules, finetune_jobs, cache_entries]
