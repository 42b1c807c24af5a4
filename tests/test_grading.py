"""Patterns and grades: aggregates, letter bands, local-midnight resets, wrong-model rate, weak-prompt runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tm_resources.grading import DEFAULT_GRADE_BANDS, grade_for, grades, low_prompt_streak, patterns, user_hour_costs

TIERS = {"llama3.2": "local", "qwen2.5-coder": "local", "claude-sonnet-4-5": "included"}
NOW = pd.Timestamp("2025-03-04 12:00", tz="UTC")


def req(id, ts, user="ann", model="llama3.2", task_type="coding", quality=0.7, status=200, cost=0.0,
        input_tokens=100, output_tokens=50, parent_id=None, route=None, prompt="Write a function that adds two numbers.",
        prompt_quality=0.6) -> dict:
    return {"id": id, "ts": pd.Timestamp(ts, tz="UTC") if isinstance(ts, str) else ts, "user_id": user, "model": model,
            "task_type": task_type, "quality": quality, "status": status, "cost_usd": cost, "input_tokens": input_tokens,
            "output_tokens": output_tokens, "parent_id": parent_id, "route": route, "prompt": prompt,
            "prompt_quality": prompt_quality}


# --- patterns ----------------------------------------------------------------------------------

def traffic() -> pd.DataFrame:
    return pd.DataFrame([
        req("a", NOW, quality=0.9),
        req("b", NOW, quality=0.5, user="bob"),
        req("c", NOW, quality=np.nan, status=503, cost=0.0),           # failed: no sample, still a request
        req("d", NOW, quality=0.3, cost=0.0),                          # escalated away below
        req("e", NOW, model="claude-sonnet-4-5", quality=0.95, cost=0.02, parent_id="d", route="escalated"),
        req("f", NOW, model=None, quality=np.nan, status=429),         # refused before any model
        req("g", NOW, task_type="chat", quality=0.8, cost=0.001),
    ])


def test_patterns_per_type_model_and_per_user():
    by_user, by_type = patterns(traffic(), TIERS)
    assert list(by_type.columns) == ["task_type", "model", "tier", "requests", "samples", "avg_quality", "total_cost_usd",
                                     "avg_cost_usd", "input_tokens", "output_tokens", "escalations", "escalated_away",
                                     "judged", "avg_completion"]
    assert list(by_user.columns[:4]) == ["task_type", "model", "tier", "user_id"]
    row = by_type.set_index(["task_type", "model"]).loc[("coding", "llama3.2")]
    assert (row.requests, row.samples) == (4, 3)                  # the failed call counts as a request, not a sample
    assert row.avg_quality == pytest.approx((0.9 + 0.5 + 0.3) / 3)
    assert row.tier == "local" and row.escalated_away == 1 and row.escalations == 0
    assert (row.input_tokens, row.output_tokens) == (400, 200)
    frontier = by_type.set_index(["task_type", "model"]).loc[("coding", "claude-sonnet-4-5")]
    assert frontier.escalations == 1 and frontier.total_cost_usd == pytest.approx(0.02) and frontier.tier == "included"
    assert by_user.set_index(["task_type", "model", "user_id"]).loc[("coding", "llama3.2", "bob")].samples == 1
    assert len(by_type) == 3 and len(by_user) == 4                 # the row without a model is nowhere


def test_patterns_count_the_judges_verdicts_apart_from_the_composite():
    df = traffic().assign(completion=[1.0, 0.0, np.nan, np.nan, 1.0, np.nan, 1.0])
    row = patterns(df, TIERS)[1].set_index(["task_type", "model"]).loc[("coding", "llama3.2")]
    # The unjudged answer (d) is a sample of the composite but no verdict: one of two judged answers was right.
    assert (row.samples, row.judged, row.avg_completion) == (3, 2, 0.5)
    assert patterns(traffic(), TIERS)[1]["judged"].eq(0).all()     # no judge: no verdicts, no rate


def test_patterns_is_deterministic_whatever_the_row_order():
    df = traffic()
    one = patterns(df, TIERS)
    two = patterns(df.sample(frac=1, random_state=3), TIERS)
    for a, b in zip(one, two, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_patterns_of_nothing_are_empty_frames_with_the_columns():
    by_user, by_type = patterns(traffic().iloc[0:0], TIERS)
    assert by_user.empty and by_type.empty and "avg_quality" in by_type.columns


def test_user_hour_costs_sum_per_utc_hour():
    df = pd.DataFrame([req("a", "2025-03-04 10:05", cost=0.1), req("b", "2025-03-04 10:55", cost=0.2),
                       req("c", "2025-03-04 11:00", cost=0.4)])
    out = user_hour_costs(df)
    assert out["cost_usd"].tolist() == pytest.approx([0.3, 0.4]) and out["requests"].tolist() == [2, 1]


# --- grades ------------------------------------------------------------------------------------

@pytest.mark.parametrize("avg,letter", [
    (0.95, "A"), (0.80, "A"), (0.7999, "B"), (0.70, "B"), (0.65, "C"), (0.60, "C"), (0.50, "D"), (0.4999, "F"), (0.0, "F"),
])
def test_default_grade_bands(avg, letter):
    assert grade_for(avg) == letter


def test_grade_bands_are_configurable():
    assert grade_for(0.85, (("A", 0.9), ("B", 0.8))) == "B"
    assert grade_for(0.85, DEFAULT_GRADE_BANDS) == "A"


def test_grade_comes_from_the_trailing_24_hours_and_needs_enough_answers():
    rows = [req(f"old{i}", NOW - pd.Timedelta(hours=25), quality=0.1) for i in range(5)]
    rows += [req(f"new{i}", NOW - pd.Timedelta(hours=i), quality=0.9) for i in range(3)]
    rows += [req("bob1", NOW, user="bob", quality=0.9), req("bob2", NOW, user="bob", quality=0.9)]
    g = grades(pd.DataFrame(rows), NOW, "UTC").set_index("user_id")
    assert g.loc["ann", "grade"] == "A" and g.loc["ann", "samples"] == 3
    assert g.loc["ann", "avg_quality_score"] == pytest.approx(0.9)
    assert pd.isna(g.loc["bob", "grade"]) and g.loc["bob", "avg_quality_score"] == pytest.approx(0.9)


@pytest.mark.parametrize("tz,expected", [("America/New_York", 1), ("UTC", 2), ("Asia/Tokyo", 3)])
def test_requests_today_reset_at_local_midnight(tz, expected):
    # NOW is 07:00 in New York (midnight there was 05:00 UTC) and 21:00 in Tokyo (midnight 15:00 UTC the day before).
    rows = [req("tokyo_day", "2025-03-03 16:00"), req("ny_yesterday", "2025-03-04 03:00"), req("ny_today", "2025-03-04 06:00")]
    g = grades(pd.DataFrame(rows), NOW, tz).iloc[0]
    assert g["requests_today"] == expected
    assert g["tokens_today"] == 150 * expected


def test_today_counts_a_cascade_once_but_both_rows_cost_and_tokens():
    rows = [req("d", NOW, quality=0.3, cost=0.0), req("e", NOW, model="claude-sonnet-4-5", cost=0.02, parent_id="d")]
    g = grades(pd.DataFrame(rows), NOW, "UTC").iloc[0]
    assert g["requests_today"] == 1 and g["tokens_today"] == 300 and g["cost_today"] == pytest.approx(0.02)
    # the user saw the escalated answer, not the local attempt
    assert g["avg_quality_score"] == pytest.approx(0.7)


def test_rows_after_now_are_ignored():
    rows = [req("a", NOW), req("later", NOW + pd.Timedelta(minutes=1))]
    assert grades(pd.DataFrame(rows), NOW, "UTC").iloc[0]["requests_today"] == 1


@pytest.mark.parametrize("parent_quality,rate", [(0.95, 1.0), (0.81, 1.0), (0.80, 0.0), (0.3, 0.0), (np.nan, 0.0)])
def test_wrong_model_rate_is_the_share_of_escalations_whose_local_answer_was_good(parent_quality, rate):
    rows = [req("local", NOW, quality=parent_quality, status=200 if parent_quality == parent_quality else 504),
            req("frontier", NOW, model="claude-sonnet-4-5", quality=0.9, parent_id="local", route="escalated")]
    g = grades(pd.DataFrame(rows), NOW, "UTC").iloc[0]
    assert g["escalations"] == 1 and g["wrong_model_rate"] == pytest.approx(rate)


def test_wrong_model_rate_is_missing_without_escalations():
    assert np.isnan(grades(pd.DataFrame([req("a", NOW)]), NOW, "UTC").iloc[0]["wrong_model_rate"])


def test_prompt_quality_avg_covers_72_hours():
    rows = [req("in1", NOW - pd.Timedelta(hours=71), prompt_quality=0.2), req("in2", NOW, prompt_quality=0.4),
            req("out", NOW - pd.Timedelta(hours=73), prompt_quality=1.0)]
    assert grades(pd.DataFrame(rows), NOW, "UTC").iloc[0]["prompt_quality_avg"] == pytest.approx(0.3)


def test_low_prompt_days_is_the_latest_run_of_weak_active_days():
    day = pd.Timedelta(days=1)
    rows = [req("d0", NOW - 5 * day, prompt_quality=0.9),
            req("d1", NOW - 4 * day, prompt_quality=0.2, prompt="fix it"),
            req("d3", NOW - 2 * day, prompt_quality=0.3),                   # day -3: no requests, no break
            req("d5a", NOW, prompt_quality=0.1, prompt="do it again"), req("d5b", NOW, prompt_quality=0.6)]
    g = grades(pd.DataFrame(rows), NOW, "UTC", coaching_below=0.4).iloc[0]
    assert g["low_prompt_days"] == 3
    assert list(g["prompt_quality_daily"]) == ["2025-02-27", "2025-02-28", "2025-03-02", "2025-03-04"]
    assert g["prompt_quality_daily"]["2025-03-04"] == pytest.approx(0.35)
    assert g["coaching_example"] == "do it again" and g["prompt_weakness"] in {"specificity", "context", "constraints"}
    # a stricter bar: the day averaging exactly 0.35 is no longer under it, the run is broken there
    assert grades(pd.DataFrame(rows), NOW, "UTC", coaching_below=0.35).iloc[0]["low_prompt_days"] == 0


def test_low_prompt_streak_boundary():
    daily = {"2025-03-01": 0.39, "2025-03-02": 0.4, "2025-03-03": 0.39}
    assert low_prompt_streak(daily, 0.4) == ["2025-03-03"]
    assert low_prompt_streak(daily, 0.41) == ["2025-03-01", "2025-03-02", "2025-03-03"]


def test_grades_are_deterministic():
    df = traffic()
    pd.testing.assert_frame_equal(grades(df, NOW, "Europe/Paris"), grades(df.iloc[::-1], NOW, "Europe/Paris"))
