"""Checks that sit next to their assets. The score checks block: bad scores must never reach routing_rules."""


from datetime import datetime

import dagster as dg

from tm_assets.assets import hourly, routing_rules, scored_requests, task_types
from tm_assets.resources import PostgresResource
from tm_resources.db import one
from tm_resources.tables import COMPLETION_ENDPOINTS


def window_of(context: dg.AssetCheckExecutionContext) -> dict[str, datetime]:
    """The hours the run covered (one, or a backfill's range), as query parameters `start` and `end`."""
    window = context.partition_time_window
    return {"start": window.start, "end": window.end}


def loop_check(asset, *, severity: dg.AssetCheckSeverity, description: str, blocking: bool = False):
    """A check on an hourly loop table; its severity is declared here (and shown in the UI) rather than
    only when it fails."""
    return dg.asset_check(asset=asset, blocking=blocking, partitions_def=hourly, description=description,
                          metadata={"severity": severity.value})


SIGNALS = ("coherence", "completion", "brevity", "reprompt", "cost_efficiency", "prompt_quality", "quality")


@loop_check(scored_requests, blocking=True, severity=dg.AssetCheckSeverity.ERROR,
            description="Every signal and the composite lie within 0..1 (or are missing).")
def scores_within_0_1(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    out_of_range = " + ".join(f"count(*) FILTER (WHERE {s} < 0 OR {s} > 1 OR {s} = 'NaN')" for s in SIGNALS)
    with postgres.get_connection() as conn:
        bad = one(conn.execute(f"SELECT {out_of_range} FROM scored_requests"
                               " WHERE hour >= %(start)s AND hour < %(end)s", window_of(context)))[0]
    return dg.AssetCheckResult(passed=bad == 0, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"values_out_of_range": int(bad)})


@loop_check(scored_requests, blocking=True, severity=dg.AssetCheckSeverity.ERROR,
            description="Exactly one score for every model request logged in the hour.")
def one_score_per_request(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        missing, extra = one(conn.execute(
            "SELECT"
            " (SELECT count(*) FROM requests r WHERE r.ts >= %(start)s AND r.ts < %(end)s"
            "   AND r.endpoint = ANY(%(e)s)"
            "   AND NOT EXISTS (SELECT 1 FROM scored_requests s WHERE s.request_id = r.id)),"
            " (SELECT count(*) FROM scored_requests s WHERE s.hour >= %(start)s AND s.hour < %(end)s"
            "   AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.id = s.request_id AND r.ts = s.ts))",
            {**window_of(context), "e": list(COMPLETION_ENDPOINTS)},
        ))
    return dg.AssetCheckResult(passed=missing == 0 and extra == 0, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"requests_without_score": int(missing), "scores_without_request": int(extra)})


@loop_check(task_types, severity=dg.AssetCheckSeverity.WARN,
            description="Every scored request of the hour that has a prompt has a task type.")
def every_request_typed(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        untyped = one(conn.execute(
            "SELECT count(*) FROM scored_requests s JOIN requests r ON r.id = s.request_id AND r.ts = s.ts"
            " WHERE s.hour >= %(start)s AND s.hour < %(end)s AND coalesce(r.prompt, '') ~ '\\S'"
            " AND NOT EXISTS (SELECT 1 FROM task_types t WHERE t.request_id = s.request_id)",
            window_of(context)))[0]
    return dg.AssetCheckResult(passed=untyped == 0, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"untyped_requests": int(untyped)})


# The count each action's evidence must show, above zero, for the rule to stand on something.
EVIDENCE_COUNT = {"escalate": "local_samples", "cascade": "local_samples", "lock_local": "local_samples",
                  "finetune_candidate": "samples", "coach": "low_prompt_days", "throttle": "cost_usd",
                  "swap_model": "margin", "shift": "used"}


@loop_check(routing_rules, severity=dg.AssetCheckSeverity.ERROR,
            description="No rule without evidence: a reason, and the count or amount behind it.")
def rules_have_evidence(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        rules = conn.execute("SELECT rule_id, action, reason, evidence FROM routing_rules"
                             " WHERE hour >= %(start)s AND hour < %(end)s", window_of(context)).fetchall()
    bad = [rule_id for rule_id, action, reason, evidence in rules
           if not reason or not evidence or not (evidence.get(EVIDENCE_COUNT.get(action, "samples")) or 0) > 0]
    return dg.AssetCheckResult(passed=not bad, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"rules": len(rules), "rules_without_evidence": dg.MetadataValue.json(bad)})


loop_checks = [scores_within_0_1, one_score_per_request, every_request_typed, rules_have_evidence]
