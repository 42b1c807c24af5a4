"""The decision engine: seven conditions over patterns, grades and costs, seven routing actions,
every threshold from config. Task types are decided on the completion judge's verdicts when there are
enough of them, else on the composite quality."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from tm_resources.config import Thresholds
from tm_resources.grading import low_prompt_streak, tier_name
from tm_resources.quotas import SHIFT_STATES

Action = Literal["escalate", "cascade", "lock_local", "coach", "finetune_candidate", "throttle", "swap_model", "shift"]
Mode = Literal["manual", "dry-run", "auto"]

# auto: the gateway obeys the rule; dry-run: written as a proposal; manual: computed and shown,
# never applied. The gateway obeys `active` rules only.
STATUS_BY_MODE: dict[str, str] = {"auto": "active", "dry-run": "proposed", "manual": "inactive"}

# Order of the returned list, and of precedence where rules meet on one request: a throttle on
# the user beats any rule on the task type (a throttled user goes local only, even for an
# escalated type); escalate, cascade and lock_local never coexist on a type (the local average
# is under escalate_below, between, or over lock_above); swap_model only picks which
# local model serves; coach and finetune_candidate do not route.
ACTION_ORDER: tuple[Action, ...] = ("throttle", "escalate", "cascade", "lock_local", "swap_model",
                                    "finetune_candidate", "coach", "shift")

BASELINE_WINDOW_H = 168        # a user's baseline: their hours in the trailing 7 days ...
BASELINE_MIN_HOURS = 3         # ... when they had at least this many active hours; else the team's

_EPS_DIGITS = 9                # averages are rounded before comparing: 0.5 must not read as 0.49999999


@dataclass(frozen=True)
class Decision:
    rule_id: str                # stable across hours: the same condition yields the same id
    action: Action
    task_type: str | None
    user_id: str | None
    model: str | None           # the model the rule is about (pattern's model, base of a swap, the
                                # local model an escalated type still explores)
    target_model: str | None    # where traffic goes, or the base to fine-tune
    reason: str                 # one sentence with the numbers
    evidence: dict = field(default_factory=dict)
    status: str = "active"


def _r(x: float, digits: int = 4) -> float:
    return float(round(float(x), digits))


def _tiers_of(patterns: pd.DataFrame, tiers: Mapping[str, object] | None) -> pd.Series:
    from_map = pd.Series([tier_name(m, tiers) for m in patterns["model"]], index=patterns.index, dtype="object")
    if "tier" in patterns:
        from_map = from_map.fillna(patterns["tier"])
    return from_map


def _local_models(tiers: Mapping[str, object] | None) -> list[str]:
    return sorted(m for m in (tiers or {}) if tier_name(m, tiers) == "local")


def _best(rows: pd.DataFrame) -> str | None:
    """The best-served model among pattern rows: highest quality, then more samples, then name."""
    rows = rows[rows["avg_quality"].notna() & (rows["samples"] > 0)]
    if rows.empty:
        return None
    best = rows.sort_values(["avg_quality", "samples", "model"], ascending=[False, False, True], kind="stable")
    return best.iloc[0]["model"]


def coaching_brief(user_id: str, weakness: str | None, example: str | None, average: float, days: int,
                   below: float) -> str:
    """A short, concrete brief for a user whose prompts have been weak several days in a row."""
    advice = {
        "specificity": "Name the exact thing: the file, function, error message, data or product you mean.",
        "context": "Say what you are working on and what you already tried, so the model does not guess.",
        "constraints": "Say what a good answer looks like: language, format, length, what must not change.",
        "length": "One line is rarely enough: add the goal, the situation and the expected result.",
        "ask": "End with one clear question or instruction.",
    }
    tip = advice.get(weakness or "", advice["context"])
    score = "" if average is None or np.isnan(average) else f" (averaging {average:.2f} out of 1)"
    lines = [f"Your prompts were under the team's bar of {below:.2f} on each of your last {days} active days{score}. "
             "Vague prompts cost retries and escalations to paid models.",
             f"Most useful change: {tip}"]
    if example:
        lines.append(f'For example, you wrote: "{example}". A stronger version: "<what> in <where> does '
                     f'<symptom>; I expected <result>. I use <stack/version>. Please <one clear ask>, '
                     f'<constraint: format/length/what to keep>."')
    return "\n".join(lines)


def _judged(rows: pd.DataFrame) -> pd.DataFrame:
    if "judged" not in rows or "avg_completion" not in rows:
        return rows.iloc[0:0]
    return rows[rows["avg_completion"].notna() & (rows["judged"].fillna(0) > 0)]


def _completion_rate(rows: pd.DataFrame) -> tuple[float, int]:
    """The judge's completion rate pooled over pattern rows, and how many verdicts it rests on."""
    rows = _judged(rows)
    n = int(rows["judged"].sum()) if not rows.empty else 0
    if n == 0:
        return float("nan"), 0
    return round(float((rows["avg_completion"] * rows["judged"]).sum() / n), _EPS_DIGITS), n


def _completion_rule(task_type: str, g: pd.DataFrame, frontier: pd.DataFrame, target: str | None,
                     t: Thresholds, ev: dict) -> Decision | None:
    """A type decided on the judge's completion rate of its best local model, when it has enough verdicts.

    The best local model (the one that serves a lock or answers first in a cascade) is the one the
    judge found right most often, not the one with the best composite: the composite rewards a
    coherent, brief, wrong answer almost as much as a right one."""
    judged = _judged(g)
    judged = judged[judged["judged"] >= t.completion_min_samples]
    if judged.empty:
        return None
    best = judged.assign(_c=judged["avg_completion"].astype("float64").round(_EPS_DIGITS)).sort_values(
        ["_c", "judged", "model"], ascending=[False, False, True], kind="stable").iloc[0]
    local, n_local, kept = float(best["_c"]), int(best["judged"]), best["model"]
    top, n_top = _completion_rate(frontier)
    known = n_top >= t.completion_min_samples
    gap = round(top - local, _EPS_DIGITS) if known else None
    # How far the gap may really be, given how few verdicts it rests on: handing a type to a local
    # model needs the gap's upper bound within the allowance, not only its estimate (exploration
    # keeps adding local verdicts to an escalated type, so a close one is won back later).
    margin = t.completion_confidence_z * float(np.sqrt(local * (1 - local) / n_local + top * (1 - top) / n_top)) \
        if known else 0.0
    ev = ev | {"local_model": kept, "local_completion": _r(local), "local_judged": n_local,
               "frontier_completion": _r(top) if known else None, "frontier_judged": n_top,
               "completion_min_samples": t.completion_min_samples,
               "completion_escalate_below": t.completion_escalate_below,
               "completion_max_gap": t.completion_max_gap, "completion_lock_gap": t.completion_lock_gap,
               "completion_lock_above": t.completion_lock_above, "completion_confidence_z": t.completion_confidence_z}
    seen = f"The judge found {kept}'s answers on {task_type} complete {local:.0%} of {n_local} times"
    seen += f", {target or 'the frontier'}'s {top:.0%} of {n_top}" if known else \
        " (too few frontier verdicts to compare)"
    # The frontier's own rate comes first: no bar sends a type to a frontier that does no better on it.
    if gap is not None and round(gap + margin, _EPS_DIGITS) > t.completion_max_gap:
        behind = (f"{gap:.0%} behind" if gap >= 0 else f"{-gap:.0%} ahead") + \
            (f" (up to {gap + margin:.0%} on this evidence)" if gap <= t.completion_max_gap else "")
        # The gateway explores the local model (loop.thresholds.explore_share) only while the gap
        # could still be within the allowance: one far behind is not worth its wrong answers.
        explore = kept if round(gap - margin, _EPS_DIGITS) <= t.completion_max_gap else None
        return Decision(f"escalate:{task_type}", "escalate", task_type, None, explore, target,
                        f"{seen}: {behind}, more than the {t.completion_max_gap:.0%} allowed; route {task_type} to "
                        f"{target or 'the frontier model'}.", ev | {"gap_margin": _r(margin), "explore_model": explore})
    if (gap is not None and gap <= t.completion_lock_gap) or (gap is None and local > t.completion_lock_above):
        why = f"no more than {t.completion_lock_gap:.0%} behind the frontier" if known else \
            f"over {t.completion_lock_above:.0%}"
        # The gateway explores the frontier only while it could still be more than the lock gap
        # ahead: a local model right every time leaves nothing to measure.
        could_be = gap + margin if gap is not None else \
            1 - (local - t.completion_confidence_z * float(np.sqrt(local * (1 - local) / n_local)))
        explore = target if round(could_be, _EPS_DIGITS) > t.completion_lock_gap else None
        return Decision(f"lock_local:{task_type}", "lock_local", task_type, None, explore, kept,
                        f"{seen}: {why}; keep {task_type} on {kept}.", ev | {"explore_model": explore})
    if local < t.completion_escalate_below:
        # Under the bar but not far from the frontier (or no frontier to compare): worth exploring
        # while the local rate's own error bar reaches the bar.
        reach = local + t.completion_confidence_z * float(np.sqrt(local * (1 - local) / n_local))
        explore = kept if round(reach, _EPS_DIGITS) >= t.completion_escalate_below else None
        return Decision(f"escalate:{task_type}", "escalate", task_type, None, explore, target,
                        f"{seen}: under the bar of {t.completion_escalate_below:.0%}; route {task_type} to "
                        f"{target or 'the frontier model'}.", ev | {"explore_model": explore})
    if not t.cascade_borderline:
        return None
    return Decision(f"cascade:{task_type}", "cascade", task_type, None, kept, target,
                    f"{seen}: close but not close enough to lock; {kept} answers {task_type} first, "
                    f"{target or 'the frontier model'} when its answer fails the quick gate.", ev)


def _for_type(t: Thresholds, task_type: str) -> Thresholds:
    """The thresholds a task type is decided on: its own quality bar where loop.thresholds.task_types sets one."""
    escalate_below, lock_above = t.for_type(task_type)
    if (escalate_below, lock_above) == (t.escalate_below, t.lock_above):
        return t
    return t.model_copy(update={"escalate_below": escalate_below, "lock_above": lock_above})


def _type_rules(pat: pd.DataFrame, t_all: Thresholds, frontier_model: str | None) -> list[Decision]:
    out: list[Decision] = []
    local = pat[(pat["_tier"] == "local") & pat["avg_quality"].notna() & (pat["samples"] > 0)]
    for task_type, g in local.groupby("task_type", sort=True):
        t = _for_type(t_all, task_type)
        n = int(g["samples"].sum())
        q = round(float((g["avg_quality"] * g["samples"]).sum() / n), _EPS_DIGITS)
        ev = {"local_samples": n, "local_avg_quality": _r(q), "local_models": sorted(g["model"].tolist())}
        others = pat[(pat["task_type"] == task_type) & (pat["_tier"].notna()) & (pat["_tier"] != "local")]
        target = frontier_model or _best(others)  # where the type goes when local is not enough
        frontier = others[others["model"] == target] if target else others.iloc[0:0]
        if "judged" in g and g["judged"].fillna(0).ge(t.completion_min_samples).any():
            if (d := _completion_rule(task_type, g, frontier, target, t, ev)) is not None:
                out.append(d)
            continue
        if n >= t.escalate_min_samples and q < t.escalate_below:
            out.append(Decision(
                f"escalate:{task_type}", "escalate", task_type, None, None, target,
                f"Local models averaged quality {q:.2f} on {task_type} over {n} requests, under "
                f"{t.escalate_below:.2f} (at least {t.escalate_min_samples} needed): route {task_type} to "
                f"{target or 'the frontier model'}.",
                ev | {"escalate_below": t.escalate_below, "escalate_min_samples": t.escalate_min_samples}))
        elif n >= t.lock_min_samples and q > t.lock_above:
            kept = _best(g)
            out.append(Decision(
                f"lock_local:{task_type}", "lock_local", task_type, None, None, kept,
                f"Local models averaged quality {q:.2f} on {task_type} over {n} requests, above "
                f"{t.lock_above:.2f} (at least {t.lock_min_samples} needed): keep {task_type} on {kept}.",
                ev | {"lock_above": t.lock_above, "lock_min_samples": t.lock_min_samples}))
        elif t.cascade_borderline and n >= t.escalate_min_samples and q <= t.lock_above:
            first = _best(g)
            out.append(Decision(
                f"cascade:{task_type}", "cascade", task_type, None, first, target,
                f"Local models averaged quality {q:.2f} on {task_type} over {n} requests, between "
                f"{t.escalate_below:.2f} and {t.lock_above:.2f}: {first} answers {task_type} first, "
                f"{target or 'the frontier model'} when its answer fails the quick gate.",
                ev | {"escalate_below": t.escalate_below, "lock_above": t.lock_above,
                      "escalate_min_samples": t.escalate_min_samples}))
    return out


def _finetune_rules(pat: pd.DataFrame, t: Thresholds, tiers: Mapping[str, object] | None) -> list[Decision]:
    out: list[Decision] = []
    rows = pat[pat["avg_quality"].notna()].sort_values(["task_type", "model"], kind="stable")
    for _, p in rows.iterrows():
        n, q = int(p["samples"]), round(float(p["avg_quality"]), _EPS_DIGITS)
        if not (n >= t.finetune_min_samples and q > t.finetune_min_quality):
            continue
        # The answers of a well-served pattern train a local model: the pattern's own if it is
        # local, else the best local model on that type, else any configured local model.
        if p["_tier"] == "local":
            base = p["model"]
        else:
            same_type = pat[(pat["task_type"] == p["task_type"]) & (pat["_tier"] == "local")]
            base = _best(same_type) or next(iter(_local_models(tiers)), None)
        out.append(Decision(
            f"finetune:{p['task_type']}:{p['model']}", "finetune_candidate", p["task_type"], None, p["model"], base,
            f"{p['model']} served {p['task_type']} {n} times at average quality {q:.2f} (needs "
            f"{t.finetune_min_samples}+ at over {t.finetune_min_quality:.2f}): fine-tune "
            f"{base or 'a local model'} on these answers.",
            {"samples": n, "avg_quality": _r(q), "finetune_min_samples": t.finetune_min_samples,
             "finetune_min_quality": t.finetune_min_quality}))
    return out


def _coach_rules(grades_df: pd.DataFrame, t: Thresholds) -> list[Decision]:
    out: list[Decision] = []
    if grades_df is None or grades_df.empty:
        return out
    for _, g in grades_df.sort_values("user_id", kind="stable").iterrows():
        daily = g.get("prompt_quality_daily")
        if isinstance(daily, Mapping):
            streak = low_prompt_streak(daily, t.coaching_below)
            days = len(streak)
            avg = float(np.mean([daily[d] for d in streak])) if streak else float("nan")
        else:
            # A grades table without the daily averages: trust the streak it stored.
            streak, days = [], int(g.get("low_prompt_days") or 0)
            avg = g.get("prompt_quality_avg")
            avg = float(avg) if avg is not None and not pd.isna(avg) else float("nan")
        if days < t.coaching_days:
            continue
        example = g.get("coaching_example") if isinstance(g.get("coaching_example"), str) else None
        weakness = g.get("prompt_weakness") if isinstance(g.get("prompt_weakness"), str) else None
        brief = coaching_brief(g["user_id"], weakness, example, avg, days, t.coaching_below)
        detail = [f"{streak[0]} to {streak[-1]}"] if streak else []
        detail += [] if np.isnan(avg) else [f"average {avg:.2f}"]
        detail += [f"coaching after {t.coaching_days}"]
        out.append(Decision(
            f"coach:{g['user_id']}", "coach", None, g["user_id"], None, None,
            f"{g['user_id']}'s daily prompt quality was under {t.coaching_below:.2f} on {days} active days in a row "
            f"({', '.join(detail)}): send a coaching brief.",
            {"low_prompt_days": days, "days": streak, "prompt_quality_avg": _r(avg) if not np.isnan(avg) else None,
             "weakness": weakness, "example": example, "brief": brief,
             "coaching_below": t.coaching_below, "coaching_days": t.coaching_days}))
    return out


def _throttle_rules(costs: pd.DataFrame, t: Thresholds, hour: pd.Timestamp | None) -> list[Decision]:
    """A user whose cost this hour exceeds anomaly_cost_multiple x their baseline.

    Baseline: the median cost of the user's active hours (hours with any request) in the 168
    hours before this one, when they had at least BASELINE_MIN_HOURS of them; otherwise the
    median over every user's active hours in that window (a newcomer is compared with the team),
    or their own median of fewer hours when it is higher;
    no history at all: no anomaly can be told.
    """
    out: list[Decision] = []
    if costs is None or costs.empty:
        return out
    c = costs.assign(hour=pd.to_datetime(costs["hour"], utc=True),
                     cost_usd=costs["cost_usd"].fillna(0).astype("float64"))
    if hour is None:
        hour = c["hour"].max()
    else:
        hour = pd.Timestamp(hour)
        hour = hour.tz_localize("UTC") if hour.tzinfo is None else hour.tz_convert("UTC")
    history = c[(c["hour"] < hour) & (c["hour"] >= hour - pd.Timedelta(hours=BASELINE_WINDOW_H))]
    if "requests" in history:
        history = history[history["requests"] > 0]
    if history.empty:
        return out
    team = float(history["cost_usd"].median())
    now = c[c["hour"] == hour].groupby("user_id", sort=True)["cost_usd"].sum()
    for user, cost in now.items():
        own = history.loc[history["user_id"] == user, "cost_usd"]
        if len(own) >= BASELINE_MIN_HOURS:
            baseline, source = float(own.median()), f"median of their {len(own)} active hours in the last 7 days"
        elif len(own) and float(own.median()) > team:
            # A heavy user's first hours already say the team's median is not their normal: without this
            # every heavy user is an "anomaly" in their second hour (seen in bench/simulate.py).
            baseline, source = float(own.median()), (f"median of their {len(own)} active hours in the last 7 days, "
                                                     "over the team's")
        else:
            baseline = team
            source = "the team's median active hour in the last 7 days (too little history of their own)"
        if cost > t.anomaly_cost_multiple * baseline and cost >= t.anomaly_min_cost_usd:
            multiple = cost / baseline if baseline > 0 else float("inf")
            out.append(Decision(
                f"throttle:{user}", "throttle", None, user, None, None,
                f"{user} spent ${cost:.2f} in the hour from {hour:%Y-%m-%d %H:00} UTC, "
                f"{'more than ' + format(multiple, '.1f') + 'x' if np.isfinite(multiple) else 'against'} a baseline of "
                f"${baseline:.2f} ({source}; limit {t.anomaly_cost_multiple:g}x, min ${t.anomaly_min_cost_usd:.2f}): "
                f"local models only until it passes.",
                {"hour": hour.isoformat(), "cost_usd": _r(cost, 6), "baseline_usd": _r(baseline, 6),
                 "baseline_source": "team" if source.startswith("the team") else "user",
                 "baseline_hours": int(len(own)), "anomaly_cost_multiple": t.anomaly_cost_multiple,
                 "anomaly_min_cost_usd": t.anomaly_min_cost_usd}))
    return out


def _swap_rules(versions: pd.DataFrame, t: Thresholds) -> list[Decision]:
    """model_versions: model (the fine-tune), base_model, task_type, eval_score, base_eval_score."""
    out: list[Decision] = []
    if versions is None or versions.empty:
        return out
    v = versions.assign(margin=(versions["eval_score"].astype("float64")
                                - versions["base_eval_score"].astype("float64")).round(_EPS_DIGITS))
    v = v[v["margin"].notna()]
    for (task_type, base), g in v.groupby(["task_type", "base_model"], sort=True):
        best = g.sort_values(["eval_score", "model"], ascending=[False, True], kind="stable").iloc[0]
        margin = float(best["margin"])
        # "Beats": strictly better, and by at least the configured margin.
        if margin > 0 and margin >= t.swap_min_margin:
            out.append(Decision(
                f"swap:{task_type}:{base}", "swap_model", task_type, None, base, best["model"],
                f"{best['model']} scored {best['eval_score']:.3f} on the {task_type} eval set against "
                f"{best['base_eval_score']:.3f} for {base} (margin {margin:.3f}, needs {t.swap_min_margin:.3f}): "
                f"route {task_type} traffic for {base} to it.",
                {"eval_score": _r(best["eval_score"]), "base_eval_score": _r(best["base_eval_score"]),
                 "margin": _r(margin), "swap_min_margin": t.swap_min_margin}))
    return out


def _shift_rules(quotas: pd.DataFrame | None) -> list[Decision]:
    """A provider whose quota is critical or exhausted: `auto` and presets move to another model of the
    chain while one can serve (the gateway applies it, tm_gateway/quota_routing.py)."""
    out: list[Decision] = []
    if quotas is None or quotas.empty:
        return out
    for _, q in quotas[quotas["state"].isin(SHIFT_STATES)].sort_values("provider", kind="stable").iterrows():
        out.append(Decision(
            f"shift:{q['provider']}", "shift", None, None, None, None,
            f"{q['summary']}: its quota is {q['state']}, so auto and presets use another model of their chain "
            "while one can serve.",
            {"provider": q["provider"], "state": q["state"], "used": _none_or(q["used"]),
             "limit": _none_or(q["quota_limit"]), "used_fraction": _none_or(q["used_fraction"]),
             "exhausts_at": None if pd.isna(q["exhausts_at"]) else pd.Timestamp(q["exhausts_at"]).isoformat(),
             "reset_at": None if pd.isna(q["reset_at"]) else pd.Timestamp(q["reset_at"]).isoformat()}))
    return out


def _none_or(x: Any) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def decide(type_model_patterns: pd.DataFrame, grades_df: pd.DataFrame | None, user_hour_costs: pd.DataFrame | None,
           model_versions: pd.DataFrame | None, thresholds: Thresholds, tiers: Mapping[str, object] | None,
           mode: Mode = "auto", *, frontier_model: str | None = None,
           hour: pd.Timestamp | None = None, provider_quotas: pd.DataFrame | None = None) -> list[Decision]:
    """Every decision the current data supports, ordered by ACTION_ORDER then rule_id.

    type_model_patterns: grading.patterns(...)[1] (task_type, model, samples, avg_quality; tier
    optional when `tiers` is given). grades_df: grading.grades(...). user_hour_costs:
    grading.user_hour_costs(...) over at least the 7 days before `hour` (default: its latest
    hour). model_versions: see _swap_rules (empty until a fine-tune is registered).
    frontier_model: where escalations go (config defaults.frontier_model); None: the best
    non-local model seen on that task type.

    Comparisons, as the thresholds are named in the config: quality < escalate_below with samples >=
    escalate_min_samples; > lock_above with >= lock_min_samples; daily prompt quality <
    coaching_below on >= coaching_days active days in a row; >= finetune_min_samples at >
    finetune_min_quality; cost > anomaly_cost_multiple x baseline and >= anomaly_min_cost_usd;
    fine-tune minus base > 0 and >= swap_min_margin. A type whose best local model has
    completion_min_samples+ judge verdicts (patterns' judged, avg_completion) is decided by
    _completion_rule instead of the composite.
    """
    if mode not in STATUS_BY_MODE:
        raise ValueError(f"mode must be one of {', '.join(STATUS_BY_MODE)}, not {mode!r}")
    decisions: list[Decision] = []
    if type_model_patterns is not None and not type_model_patterns.empty:
        pat = type_model_patterns.assign(_tier=_tiers_of(type_model_patterns, tiers))
        decisions += _type_rules(pat, thresholds, frontier_model)
        decisions += _finetune_rules(pat, thresholds, tiers)
    decisions += _coach_rules(grades_df, thresholds)
    decisions += _throttle_rules(user_hour_costs, thresholds, hour)
    decisions += _swap_rules(model_versions, thresholds)
    decisions += _shift_rules(provider_quotas)
    status = STATUS_BY_MODE[mode]
    decisions = [Decision(**{**d.__dict__, "status": status}) for d in decisions]
    return sorted(decisions, key=lambda d: (ACTION_ORDER.index(d.action), d.rule_id))

