"""The analysis behind tm analyze / tm optimize as plain functions: what counts as serving a type as well, when
capability scores stand in for evidence, and what is never proposed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from tests.conftest import make_config
from tm_resources.capabilities import Evidence, model_scores
from tm_resources.config import parse_config
from tm_resources.optimize import analyze, proposals

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def _config(**models):
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json", exclude_none=True)
    data["models"].update(models)
    return parse_config(data)


def _rows(user, model, task_type, qualities, *, agent=None, requested="auto", completion=None, days_ago=2.0):
    config = _CONFIG
    return [{"ts": NOW - timedelta(days=days_ago) + timedelta(minutes=i), "user_id": user, "agent": agent,
             "requested_model": requested, "model": model, "task_type": task_type, "quality": q,
             "completion": completion if completion is None else completion[i % len(completion)],
             "cost_usd": config.models[model].price.cost(1000, 500), "input_tokens": 1000, "output_tokens": 500,
             "cache_read_tokens": 0, "cache_write_tokens": 0} for i, q in enumerate(qualities)]


_CONFIG = _config(**{
    "mid-local": {"provider": "local", "tier": "local", "price": {"input": 0.5, "output": 1.0},
                  "capabilities": {"reasoning": 0.7}},
    "premium-cheap": {"provider": "anthropic", "tier": "premium", "price": {"input": 0.01, "output": 0.01}},
})


def test_a_worse_cheaper_model_is_not_proposed_and_the_judge_can_veto():
    df = pd.DataFrame(_rows("ann", "claude-test", "coding", [0.9] * 10)
                      + _rows("bo", "local-test", "coding", [0.8] * 30)          # 0.1 worse: no
                      + _rows("ann", "claude-test", "math", [0.8] * 10, completion=[1.0])
                      # as good on the composite, but the judge says it completes far fewer: no
                      + _rows("bo", "local-test", "math", [0.8] * 30, completion=[1.0, 0.0]))
    report = analyze(df, _CONFIG, now=NOW)
    assert report.opportunities == [] and report.scored_requests == 80


def test_premium_models_are_never_proposed_and_the_cheapest_good_one_wins():
    df = pd.DataFrame(_rows("ann", "claude-test", "coding", [0.8] * 10)
                      + _rows("bo", "local-test", "coding", [0.8] * 30)
                      + _rows("cy", "mid-local", "coding", [0.85] * 30)
                      + _rows("dee", "premium-cheap", "coding", [0.95] * 30))
    [o] = analyze(df, _CONFIG, now=NOW).opportunities
    assert (o.who, o.proposed_model, o.safe) == ("ann", "local-test", True)
    assert o.monthly_saving_usd == pytest.approx(o.saving_usd * 30 / 2, rel=1e-6)  # two days of traffic


def test_capability_scores_stand_in_when_a_model_has_no_answers_on_the_type():
    df = pd.DataFrame(_rows("ann", "claude-test", "reasoning", [0.7] * 10))
    config = _CONFIG
    scores = model_scores(config, Evidence(quality={("claude-test", "reasoning"): (10, 0.7)}))
    [o] = analyze(df, config, scores=scores, now=NOW).opportunities
    assert (o.proposed_model, o.basis, o.safe) == ("mid-local", "capabilities", False)
    assert o.evidence["proposed"]["capability"] == pytest.approx(0.7)
    assert "too few scored reasoning answers" in o.reason
    assert proposals(analyze(df, config, scores=scores, now=NOW), safe_only=True) == []
    [p] = proposals(analyze(df, config, scores=scores, now=NOW))
    assert (p.user_id, p.agent, p.task_type, p.target_model) == ("ann", None, "reasoning", "mid-local")


def test_requests_that_name_their_model_and_small_groups_are_left_alone():
    df = pd.DataFrame(_rows("ann", "claude-test", "coding", [0.8] * 10, requested="claude-test")
                      + _rows("ed", "claude-test", "coding", [0.8] * 4)          # under optimize.min_requests
                      + _rows("bo", "local-test", "coding", [0.8] * 30))
    assert analyze(df, _CONFIG, now=NOW).opportunities == []
