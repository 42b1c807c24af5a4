"""Checks that sit next to their assets. The score checks block: bad scores must never reach routing_rules."""


import dagster as dg

from tm_assets.assets import hourly, hour_of, routing_rules, scored_requests, task_types
from tm_assets.resources import PostgresResource
from tm_resources.tables import COMPLETION_ENDPOINTS

SIGNALS = ("coherence", "completion", "brevity", "reprompt", "cost_efficiency", "prompt_quality", "quality")


@dg.asset_check(asset=scored_requests, blocking=True, partitions_def=hourly,
                description="Every signal and the composite lie within 0..1 (or are missing).")
def scores_within_0_1(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    hour = hour_of(context)
    out_of_range = " + ".join(f"count(*) FILTER (WHERE {s} < 0 OR {s} > 1 OR {s} = 'NaN')" for s in SIGNALS)
    with postgres.get_connection() as conn:
        bad = conn.execute(f"SELECT {out_of_range} FROM scored_requests WHERE hour = %s", (hour,)).fetchone()[0]
    return dg.AssetCheckResult(passed=bad == 0, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"values_out_of_range": int(bad)})


@dg.asset_check(asset=scored_requests, blocking=True, partitions_def=hourly,
                description="Exactly one score for every model request logged in the hour.")
def one_score_per_request(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        missing, extra = conn.execute(
            "SELECT"
            " (SELECT count(*) FROM requests r WHERE r.ts >= %(h)s AND r.ts < %(h)s + interval '1 hour'"
            "   AND r.endpoint = ANY(%(e)s)"
            "   AND NOT EXISTS (SELECT 1 FROM scored_requests s WHERE s.request_id = r.id)),"
            " (SELECT count(*) FROM scored_requests s WHERE s.hour = %(h)s"
            "   AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.id = s.request_id AND r.ts = s.ts))",
            {"h": hour, "e": list(COMPLETION_ENDPOINTS)},
        ).fetchone()
    return dg.AssetCheckResult(passed=missing == 0 and extra == 0, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"requests_without_score": int(missing), "scores_without_request": int(extra)})


@dg.asset_check(asset=task_types, partitions_def=hourly,
                description="Every scored request of the hour that has a prompt has a task type.")
def every_request_typed(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        untyped = conn.execute(
            "SELECT count(*) FROM scored_requests s JOIN requests r ON r.id = s.request_id AND r.ts = s.ts"
            " WHERE s.hour = %s AND coalesce(r.prompt, '') ~ '\\S'"
            " AND NOT EXISTS (SELECT 1 FROM task_types t WHERE t.request_id = s.request_id)", (hour,)).fetchone()[0]
    return dg.AssetCheckResult(passed=untyped == 0, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"untyped_requests": int(untyped)})


# The count each action's evidence must show, above zero, for the rule to stand on something.
EVIDENCE_COUNT = {"escalate": "local_samples", "cascade": "local_samples", "lock_local": "local_samples",
                  "finetune_candidate": "samples", "coach": "low_prompt_days", "throttle": "cost_usd",
                  "swap_model": "margin"}


@dg.asset_check(asset=routing_rules, partitions_def=hourly,
                description="No rule without evidence: a reason, and the count or amount behind it.")
def rules_have_evidence(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    hour = hour_of(context)
    with postgres.get_connection() as conn:
        rules = conn.execute("SELECT rule_id, action, reason, evidence FROM routing_rules WHERE hour = %s",
                             (hour,)).fetchall()
    bad = [rule_id for rule_id, action, reason, evidence in rules
           if not reason or not evidence or not (evidence.get(EVIDENCE_COUNT.get(action, "samples")) or 0) > 0]
    return dg.AssetCheckResult(passed=not bad, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"rules": len(rules), "rules_without_evidence": dg.MetadataValue.json(bad)})


loop_checks = [scores_within_0_1, one_score_per_request, every_request_typed, rules_have_evidence]
