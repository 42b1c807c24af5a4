"""Patterns and grades: what each (task type, model, user) costs and earns, and each user's rolling grade."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tm_resources.escalation import escalated, escalated_away, first_attempt, served
from tm_resources.quality import PROMPT_PART_WEIGHTS, prompt_quality, prompt_quality_parts

# Lower bounds of average quality over the trailing 24 h; below the last band: F. D's floor is
# the engine's default escalate_below (0.5) and A's its default lock_above (0.8), so a grade reads
# the same way as the routing thresholds.
DEFAULT_GRADE_BANDS: tuple[tuple[str, float], ...] = (("A", 0.80), ("B", 0.70), ("C", 0.60), ("D", 0.50))
MIN_GRADE_SAMPLES = 3          # fewer answered requests in 24 h: no grade (too noisy), averages still shown
WRONG_MODEL_ABOVE = 0.8        # a local answer this good did not need escalating
COACHING_HISTORY_DAYS = 7      # local days looked back over for a run of weak-prompt days
COACHING_EXAMPLE_CHARS = 160

PATTERN_COLUMNS = ["task_type", "model", "tier", "requests", "samples", "avg_quality", "total_cost_usd",
                   "avg_cost_usd", "input_tokens", "output_tokens", "escalations", "escalated_away", "judged",
                   "avg_completion"]
GRADE_COLUMNS = ["user_id", "grade", "avg_quality_score", "samples", "requests_today", "tokens_today", "cost_today",
                 "escalations", "wrong_model_rate", "prompt_quality_avg", "low_prompt_days", "prompt_quality_daily",
                 "coaching_example", "prompt_weakness"]
_TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


def tier_name(model: str | None, tiers: Mapping[str, object] | None) -> str | None:
    """The tier of a model as a plain string ('local', 'included', 'premium'), None when unknown."""
    if model is None or not tiers or model not in tiers:
        return None
    t = tiers[model]
    return str(getattr(t, "value", t))


def _utc(ts: pd.Series | pd.Timestamp):
    if isinstance(ts, pd.Timestamp):
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    ts = pd.to_datetime(ts)
    return ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")


def patterns(df: pd.DataFrame, tiers: Mapping[str, object] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aggregates per (task_type, model, user_id) and per (task_type, model).

    df: scored, classified requests (task_type, model, user_id, quality, cost_usd, input_tokens,
    output_tokens; optional id, parent_id, served, route_reason). Rows without a model (nothing answered) or a
    task type are left out. `requests` counts every row and carries all cost and tokens;
    `samples` and `avg_quality` count only rows with a quality (answered, status 200), so a
    failed call costs but never drags an average; `judged` and `avg_completion` count the rows
    the completion judge gave a verdict (optional column `completion`); `escalations` are escalated
    requests' answers (they sit under the model escalated to); `escalated_away` are the cheap attempts
    an escalation replaced (they sit under the models that tried first). Both as tm_resources.escalation
    defines them: a passed cascade or an agreed consensus is neither, nor is its partner's row.
    """
    df = df.reset_index(drop=True)
    d = df[df["model"].notna() & df["task_type"].notna()].copy()
    d["_quality"] = d["quality"].astype("float64") if "quality" in d else np.nan
    d["_scored"] = d["_quality"].notna().astype("int64")
    # The judge's task-completion verdict alone: the one signal that sees whether an answer is right.
    d["_completion"] = d["completion"].astype("float64") if "completion" in d else np.nan
    d["_judged"] = d["_completion"].notna().astype("int64")
    d["_cost"] = d["cost_usd"].fillna(0).astype("float64") if "cost_usd" in d else 0.0
    d["_in"] = d["input_tokens"].fillna(0).astype("int64") if "input_tokens" in d else 0
    d["_out"] = d["output_tokens"].fillna(0).astype("int64") if "output_tokens" in d else 0
    d["_esc"] = escalated(df).loc[d.index].astype("int64")
    d["_away"] = escalated_away(df).loc[d.index].astype("int64")

    def aggregate(keys: list[str]) -> pd.DataFrame:
        columns = keys[:2] + PATTERN_COLUMNS[2:3] + keys[2:] + PATTERN_COLUMNS[3:]
        if d.empty:
            return pd.DataFrame({c: pd.Series(dtype="float64" if c.startswith(("avg", "total")) else "object")
                                 for c in columns})
        g = d.groupby(keys, sort=True, dropna=False)
        out = pd.DataFrame({
            "requests": g.size(),
            "samples": g["_scored"].sum(),
            "avg_quality": g["_quality"].mean(),
            "total_cost_usd": g["_cost"].sum(),
            "input_tokens": g["_in"].sum(),
            "output_tokens": g["_out"].sum(),
            "escalations": g["_esc"].sum(),
            "escalated_away": g["_away"].sum(),
            "judged": g["_judged"].sum(),
            "avg_completion": g["_completion"].mean(),
        }).reset_index()
        out["avg_cost_usd"] = out["total_cost_usd"] / out["requests"]
        out["tier"] = [tier_name(m, tiers) for m in out["model"]]
        for c in ("requests", "samples", "input_tokens", "output_tokens", "escalations", "escalated_away", "judged"):
            out[c] = out[c].astype("int64")
        return out[columns].sort_values(keys, kind="stable").reset_index(drop=True)

    return aggregate(["task_type", "model", "user_id"]), aggregate(["task_type", "model"])


def user_hour_costs(df: pd.DataFrame) -> pd.DataFrame:
    """Cost and request count per (user_id, UTC hour): the input of the anomaly rule."""
    if df.empty:
        return pd.DataFrame({"user_id": pd.Series(dtype="object"), "hour": pd.Series(dtype="datetime64[ns, UTC]"),
                             "cost_usd": pd.Series(dtype="float64"), "requests": pd.Series(dtype="int64")})
    d = df.assign(hour=_utc(df["ts"]).dt.floor("h"), _cost=df["cost_usd"].fillna(0).astype("float64"))
    g = d.groupby(["user_id", "hour"], sort=True)
    return pd.DataFrame({"cost_usd": g["_cost"].sum(), "requests": g.size().astype("int64")}).reset_index()


def grade_for(avg_quality: float, bands: Sequence[tuple[str, float]] = DEFAULT_GRADE_BANDS) -> str | None:
    """The letter for an average quality: the first band whose floor it reaches, else F."""
    if avg_quality is None or np.isnan(avg_quality):
        return None
    for letter, floor in sorted(bands, key=lambda b: -b[1]):
        if avg_quality >= floor:
            return letter
    return "F"


def low_prompt_streak(daily: Mapping[str, float], below: float) -> list[str]:
    """The latest run of active days whose prompt-quality average was under `below`, oldest first.

    Days without requests neither break nor extend a run: someone who writes vague prompts on
    Monday, is away Tuesday and does it again Wednesday has two weak days in a row.
    """
    run: list[str] = []
    for day in sorted(daily, reverse=True):
        value = daily[day]
        if value is None or np.isnan(value):
            continue
        if value < below:
            run.append(day)
        else:
            break
    return sorted(run)


def _weakest_part(prompts: Sequence[str]) -> str | None:
    if not prompts:
        return None
    parts = pd.DataFrame([prompt_quality_parts(p) for p in prompts])
    # What would lift the score most: the part with the largest weighted shortfall.
    shortfall = {k: PROMPT_PART_WEIGHTS[k] * (1 - parts[k].mean()) for k in PROMPT_PART_WEIGHTS}
    return max(shortfall, key=lambda k: (shortfall[k], -list(PROMPT_PART_WEIGHTS).index(k)))


def grades(df: pd.DataFrame, now: pd.Timestamp, tz: str = "UTC", *,
           bands: Sequence[tuple[str, float]] = DEFAULT_GRADE_BANDS,
           coaching_below: float = 0.4,
           wrong_model_above: float = WRONG_MODEL_ABOVE,
           min_grade_samples: int = MIN_GRADE_SAMPLES,
           history_days: int = COACHING_HISTORY_DAYS) -> pd.DataFrame:
    """One row per user active in the last `history_days` local days up to `now`.

    df: scored requests (id, ts, user_id, quality, prompt_quality or prompt, cost_usd, token
    columns, status; optional parent_id, served, route_reason). Rows after `now` are ignored, so re-grading a
    past hour gives what it gave then.

    - grade, avg_quality_score, samples: answers the user received in the trailing 24 h (quality
      present, served: a cascade's unserved attempt is not one); grade None under min_grade_samples.
    - requests_today, tokens_today, cost_today: since local midnight in `tz`. A cascade or consensus is
      one request but a row per attempt: every row's tokens and cost count, the request once (its served row).
    - escalations, wrong_model_rate: over the trailing 24 h, the user's escalated requests
      (tm_resources.escalation: an agreed consensus or a passed cascade is none) and the share of them
      whose first cheap attempt (the answer the plan would have served) scored above wrong_model_above;
      an attempt that failed or has no score counts as rightly escalated; NaN when there were none.
    - prompt_quality_avg: trailing 72 h. prompt_quality_daily: {local date: average} over the
      history; low_prompt_days: the latest run of active days under coaching_below (see
      low_prompt_streak); coaching_example: the user's weakest prompt in that run;
      prompt_weakness: the part of prompt_quality (specificity, context, constraints, length,
      ask) whose improvement would help most over that run.
    """
    now = _utc(pd.Timestamp(now))
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in GRADE_COLUMNS})
    df = df.reset_index(drop=True)
    d = df.copy()
    d["_ts"] = _utc(d["ts"])
    local_now = now.tz_convert(tz)
    today_start = local_now.normalize()
    history_start = (local_now - pd.Timedelta(days=history_days - 1)).normalize()
    d = d[(d["_ts"] <= now) & (d["_ts"] >= history_start.tz_convert("UTC"))]
    if "prompt_quality" not in d:
        d["prompt_quality"] = [prompt_quality(p) for p in d["prompt"]] if "prompt" in d else np.nan
    quality_by_id = (df.assign(_id=df["id"].astype(str)).set_index("_id")["quality"].astype("float64")
                     if "id" in df and "quality" in df else pd.Series(dtype="float64"))

    d["_quality"] = d["quality"].astype("float64") if "quality" in d else np.nan
    d["_user"] = served(df).loc[d.index]
    d["_delivered"] = d["_quality"].notna() & d["_user"]
    d["_esc"] = escalated(df).loc[d.index]
    d["_first"] = first_attempt(df).loc[d.index]
    d["_tokens"] = sum(d[c].fillna(0).astype("int64") for c in _TOKEN_COLUMNS if c in d) \
        if any(c in d for c in _TOKEN_COLUMNS) else 0
    d["_cost"] = d["cost_usd"].fillna(0).astype("float64") if "cost_usd" in d else 0.0
    d["_day"] = d["_ts"].dt.tz_convert(tz).dt.strftime("%Y-%m-%d")
    last24 = d["_ts"] > now - pd.Timedelta(hours=24)
    last72 = d["_ts"] > now - pd.Timedelta(hours=72)
    today = d["_ts"] >= today_start.tz_convert("UTC")

    rows = []
    for user, u in d.groupby("user_id", sort=True):
        q = u.loc[last24[u.index] & u["_delivered"], "_quality"]
        avg_q = float(q.mean()) if len(q) else float("nan")
        t = u[today[u.index]]
        esc = u[last24[u.index] & u["_esc"]]
        if len(esc):
            first_q = esc["_first"].map(quality_by_id).astype("float64")
            wrong = float((first_q.fillna(-1.0) > wrong_model_above).mean())
        else:
            wrong = float("nan")
        mine = u[u["_user"]]
        pq72 = mine.loc[last72[mine.index], "prompt_quality"].astype("float64")
        daily_series = mine.groupby("_day", sort=True)["prompt_quality"].mean().dropna()
        daily = {day: float(v) for day, v in daily_series.items()}
        streak = low_prompt_streak(daily, coaching_below)
        example = weakness = None
        if streak and "prompt" in mine:
            weak_rows = mine[mine["_day"].isin(streak) & mine["prompt"].notna()]
            if len(weak_rows):
                worst = weak_rows.sort_values(["prompt_quality", "_ts", "id"], kind="stable").iloc[0]
                example = " ".join(str(worst["prompt"]).split())[:COACHING_EXAMPLE_CHARS]
                weakness = _weakest_part(weak_rows["prompt"].tolist())
        rows.append({
            "user_id": user,
            "grade": grade_for(avg_q, bands) if len(q) >= min_grade_samples else None,
            "avg_quality_score": avg_q,
            "samples": int(len(q)),
            "requests_today": int(t["_user"].sum()),
            "tokens_today": int(t["_tokens"].sum()),
            "cost_today": float(t["_cost"].sum()),
            "escalations": int(len(esc)),
            "wrong_model_rate": wrong,
            "prompt_quality_avg": float(pq72.mean()) if pq72.notna().any() else float("nan"),
            "low_prompt_days": len(streak),
            "prompt_quality_daily": daily,
            "coaching_example": example,
            "prompt_weakness": weakness,
        })
    return pd.DataFrame(rows, columns=GRADE_COLUMNS)
