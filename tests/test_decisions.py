"""The decision engine: each of the seven rules fires exactly past its threshold, never below it, in every mode."""

from __future__ import annotations

import pandas as pd
import pytest

from tm_assets.decisions import Decision, coaching_brief, decide
from tm_gateway.rules import Rule, RuleBook, explore_draw, route_request
from tm_resources.config import EXAMPLE_CONFIG, Thresholds, load_config
from tm_resources.grading import grades

TIERS = {"llama3.2": "local", "qwen2.5-coder": "local", "claude-sonnet-4-5": "included", "claude-opus-4-1": "premium"}
T = Thresholds()
HOUR = pd.Timestamp("2025-03-04 12:00", tz="UTC")


def pats(*rows: tuple) -> pd.DataFrame:
    """rows: (task_type, model, samples, avg_quality)"""
    return pd.DataFrame(rows, columns=["task_type", "model", "samples", "avg_quality"])


def run(patterns=None, grades_df=None, costs=None, versions=None, thresholds=T, mode="auto", **kw) -> list[Decision]:
    return decide(patterns if patterns is not None else pats(), grades_df, costs, versions, thresholds, TIERS, mode, **kw)


def actions(decisions: list[Decision]) -> list[str]:
    return [d.rule_id for d in decisions]


# --- 1. escalate / 2. lock ----------------------------------------------------------------------

@pytest.mark.parametrize("samples,quality,fires", [
    (10, 0.49, True), (10, 0.5, False), (9, 0.49, False), (500, 0.1, True), (10, 0.51, False),
])
def test_escalate_boundary(samples, quality, fires):
    got = run(pats(("coding", "llama3.2", samples, quality)), frontier_model="claude-sonnet-4-5")
    assert ("escalate:coding" in actions(got)) is fires
    if fires:
        d = got[0]
        assert (d.action, d.task_type, d.target_model) == ("escalate", "coding", "claude-sonnet-4-5")
        assert d.evidence["escalate_below"] == 0.5 and d.evidence["local_samples"] == samples
        assert f"{quality:.2f}" in d.reason and str(samples) in d.reason


@pytest.mark.parametrize("samples,quality,fires", [
    (20, 0.81, True), (20, 0.8, False), (19, 0.81, False), (20, 1.0, True),
])
def test_lock_local_boundary(samples, quality, fires):
    got = run(pats(("chat", "llama3.2", samples, quality)))
    assert ("lock_local:chat" in actions(got)) is fires
    if fires:
        assert got[0].target_model == "llama3.2"


def test_type_rules_pool_every_local_model_and_ignore_frontier_ones():
    # 6 + 4 local samples pool to 10 at (0.4*6 + 0.6*4)/10 = 0.48; the frontier row does not count
    p = pats(("coding", "llama3.2", 6, 0.4), ("coding", "qwen2.5-coder", 4, 0.6), ("coding", "claude-sonnet-4-5", 50, 0.95))
    got = run(p)
    assert actions(got) == ["escalate:coding", "finetune:coding:claude-sonnet-4-5"]
    assert got[0].evidence["local_avg_quality"] == pytest.approx(0.48)
    # without a configured frontier model, the best non-local model seen on the type
    assert got[0].target_model == "claude-sonnet-4-5"


def test_thresholds_are_configuration_not_literals():
    p = pats(("coding", "llama3.2", 5, 0.55))
    assert actions(run(p)) == []
    assert actions(run(p, thresholds=Thresholds(escalate_below=0.6, escalate_min_samples=5))) == ["escalate:coding"]


def test_escalate_wins_if_thresholds_overlap():
    p = pats(("coding", "llama3.2", 30, 0.7))
    assert actions(run(p, thresholds=Thresholds(escalate_below=0.75, lock_above=0.6))) == ["escalate:coding"]


@pytest.mark.parametrize("samples,quality,fires", [
    (10, 0.5, True), (10, 0.8, True), (9, 0.6, False), (10, 0.49, False), (20, 0.81, False), (500, 0.65, True),
])
def test_cascade_boundary_between_escalate_and_lock(samples, quality, fires):
    got = run(pats(("coding", "llama3.2", samples, quality)), frontier_model="claude-sonnet-4-5")
    assert ("cascade:coding" in actions(got)) is fires
    if fires:
        d = got[0]
        assert (d.action, d.model, d.target_model) == ("cascade", "llama3.2", "claude-sonnet-4-5")
        assert f"{quality:.2f}" in d.reason and "quick gate" in d.reason and d.evidence["local_samples"] == samples


def test_cascades_can_be_switched_off_and_go_to_the_best_local_model():
    p = pats(("coding", "llama3.2", 6, 0.6), ("coding", "qwen2.5-coder", 6, 0.7))
    [d] = run(p)
    assert d.rule_id == "cascade:coding" and d.model == "qwen2.5-coder"
    assert run(p, thresholds=Thresholds(cascade_borderline=False)) == []


# --- 1-2 on the judge's verdicts ---------------------------------------------------------------

def jpats(*rows: tuple) -> pd.DataFrame:
    """rows: (task_type, model, judged, avg_completion); the composite is set where it would cascade."""
    return pd.DataFrame([(t, m, n, 0.7, n, c) for t, m, n, c in rows],
                        columns=["task_type", "model", "samples", "avg_quality", "judged", "avg_completion"])


ON_ESTIMATES = T.model_copy(update={"completion_confidence_z": 0.0})   # the gap without its error bar


@pytest.mark.parametrize("local,frontier,action", [
    (0.59, None, "escalate"), (0.6, None, "cascade"), (0.9, None, "cascade"), (0.91, None, "lock_local"),
    (0.79, 0.9, "escalate"), (0.8, 0.9, "cascade"), (0.87, 0.9, "lock_local"), (0.86, 0.9, "cascade"),
    (0.95, 0.9, "lock_local"), (0.55, 0.6, "escalate"), (0.5, 0.52, "lock_local"),
])
def test_judge_completion_decides_the_type(local, frontier, action):
    # A composite of 0.7 alone would cascade every one of these: the judge's rate decides instead,
    # against the frontier's rate on the same type first (a frontier no better is no reason to
    # pay for it), then against absolute bars.
    rows = [("reasoning", "llama3.2", 10, local)] + ([("reasoning", "claude-sonnet-4-5", 10, frontier)] if frontier else [])
    got = run(jpats(*rows), thresholds=ON_ESTIMATES, frontier_model="claude-sonnet-4-5")
    assert [d.rule_id for d in got if d.task_type == "reasoning"] == [f"{action}:reasoning"]
    assert got[0].evidence["local_completion"] == local and f"{local:.0%}" in got[0].reason


def test_too_few_verdicts_fall_back_to_the_composite():
    # 9 verdicts on the local model of 12 answers (10 verdicts needed): the composite of 0.45 escalates; the frontier's
    # 50 verdicts alone do not switch the type to the judge's rule.
    p = jpats(("coding", "llama3.2", 9, 0.95), ("coding", "claude-sonnet-4-5", 50, 0.5)).assign(avg_quality=0.45, samples=12)
    got = run(p, frontier_model="claude-sonnet-4-5")
    assert [d.rule_id for d in got] == ["escalate:coding"] and "local_completion" not in got[0].evidence
    # Too few frontier verdicts: the local rate is judged on the absolute bars only.
    got = run(jpats(("coding", "llama3.2", 10, 0.95), ("coding", "claude-sonnet-4-5", 9, 1.0)),
              frontier_model="claude-sonnet-4-5")
    assert [d.rule_id for d in got] == ["lock_local:coding"] and got[0].evidence["frontier_completion"] is None


def test_the_local_model_the_judge_finds_right_most_often_serves_the_type():
    # qwen has the better composite but llama the better completion rate: llama is kept, and the
    # model with too few verdicts (though perfect) is not picked on noise.
    p = pd.DataFrame([("math", "llama3.2", 30, 0.7, 30, 0.92), ("math", "qwen2.5-coder", 30, 0.9, 30, 0.7),
                      ("math", "mistral-x", 3, 0.9, 3, 1.0)],
                     columns=["task_type", "model", "samples", "avg_quality", "judged", "avg_completion"])
    got = decide(p, None, None, None, T, TIERS | {"mistral-x": "local"})
    assert [(d.rule_id, d.target_model) for d in got if d.task_type == "math"] == [("lock_local:math", "llama3.2")]


@pytest.mark.parametrize("verdicts,action", [(30, "escalate"), (300, "escalate"), (3000, "cascade")])
def test_a_type_goes_local_only_when_the_gap_is_within_the_allowance_on_its_evidence(verdicts, action):
    # 8 points behind is within the 10 allowed, but on 30 or 300 verdicts a side the gap could be
    # over 10 (one standard error of the gap: 11 and 3.5 points); on 3,000 it is not (1.1 points).
    rows = jpats(("reasoning", "llama3.2", verdicts, 0.72), ("reasoning", "claude-sonnet-4-5", verdicts, 0.8))
    got = run(rows, frontier_model="claude-sonnet-4-5")
    assert actions(got) == [f"{action}:reasoning"]
    assert ("up to" in got[0].reason) is (action == "escalate")


def test_judge_thresholds_are_configuration():
    rows = jpats(("chat", "llama3.2", 10, 0.8), ("chat", "claude-sonnet-4-5", 10, 0.9))
    assert actions(run(rows, frontier_model="claude-sonnet-4-5")) == ["escalate:chat"]
    T = ON_ESTIMATES  # noqa: N806 - the rest on the estimates alone
    assert actions(run(rows, thresholds=T, frontier_model="claude-sonnet-4-5")) == ["cascade:chat"]
    loose = T.model_copy(update={"completion_lock_gap": 0.1})
    assert actions(run(rows, thresholds=loose, frontier_model="claude-sonnet-4-5")) == ["lock_local:chat"]
    strict = T.model_copy(update={"completion_max_gap": 0.05})
    assert actions(run(rows, thresholds=strict, frontier_model="claude-sonnet-4-5")) == ["escalate:chat"]
    off = T.model_copy(update={"cascade_borderline": False})
    assert actions(run(rows, thresholds=off, frontier_model="claude-sonnet-4-5")) == []


# --- 3. coach -----------------------------------------------------------------------------------

def grade_row(user: str, daily: dict[str, float], example: str | None = "fix it", weakness: str | None = "context") -> dict:
    return {"user_id": user, "prompt_quality_daily": daily, "low_prompt_days": 0, "prompt_quality_avg": 0.3,
            "coaching_example": example, "prompt_weakness": weakness}


@pytest.mark.parametrize("daily,fires", [
    ({"2025-03-02": 0.3, "2025-03-03": 0.3, "2025-03-04": 0.39}, True),
    ({"2025-03-02": 0.3, "2025-03-03": 0.4, "2025-03-04": 0.39}, False),    # a day at the bar breaks the run
    ({"2025-03-03": 0.3, "2025-03-04": 0.3}, False),                        # two days are not three
    ({"2025-02-20": 0.1, "2025-03-01": 0.2, "2025-03-04": 0.3}, True),      # days off do not break it
    ({"2025-03-01": 0.2, "2025-03-02": 0.2, "2025-03-03": 0.2, "2025-03-04": 0.9}, False),  # recovered today
])
def test_coaching_boundary(daily, fires):
    got = run(grades_df=pd.DataFrame([grade_row("ann", daily)]))
    assert ("coach:ann" in actions(got)) is fires


def test_a_coaching_brief_says_what_to_improve_with_the_users_own_prompt():
    g = pd.DataFrame([grade_row("ann", {"2025-03-02": 0.2, "2025-03-03": 0.2, "2025-03-04": 0.2}, "make the chart nicer")])
    d = run(grades_df=g)[0]
    assert d.action == "coach" and d.user_id == "ann"
    brief = d.evidence["brief"]
    assert "make the chart nicer" in brief and "what you are working on" in brief and "0.20" in brief
    assert coaching_brief("ann", None, None, 0.2, 3, 0.4)  # no example: still a useful brief


def test_coaching_from_grades_end_to_end():
    now = pd.Timestamp("2025-03-04 18:00", tz="UTC")
    rows = [{"id": f"r{i}", "ts": now - pd.Timedelta(days=i), "user_id": "ann", "quality": 0.7, "status": 200,
             "cost_usd": 0.0, "input_tokens": 10, "output_tokens": 10, "prompt": p}
            for i, p in enumerate(["fix it", "do it again", "make it better"])]
    got = run(grades_df=grades(pd.DataFrame(rows), now, "UTC", coaching_below=T.coaching_below))
    assert actions(got) == ["coach:ann"]
    assert got[0].evidence["example"] in {"fix it", "do it again", "make it better"}


# --- 4. fine-tune candidate ---------------------------------------------------------------------

@pytest.mark.parametrize("samples,quality,fires", [(50, 0.76, True), (50, 0.75, False), (49, 0.9, False)])
def test_finetune_boundary(samples, quality, fires):
    got = run(pats(("sql", "claude-sonnet-4-5", samples, quality)))
    assert ("finetune:sql:claude-sonnet-4-5" in actions(got)) is fires
    if fires:
        # a frontier pattern is distilled into a local model
        assert got[0].model == "claude-sonnet-4-5" and got[0].target_model in {"llama3.2", "qwen2.5-coder"}


# --- 5. throttle --------------------------------------------------------------------------------

def hours(user: str, costs: list[float], now_cost: float) -> list[dict]:
    rows = [{"user_id": user, "hour": HOUR - pd.Timedelta(hours=k + 1), "cost_usd": c, "requests": 3}
            for k, c in enumerate(costs)]
    return rows + [{"user_id": user, "hour": HOUR, "cost_usd": now_cost, "requests": 3}]


@pytest.mark.parametrize("now_cost,fires", [(0.2, False), (0.2001, True), (1.0, True), (0.15, False)])
def test_throttle_boundary(now_cost, fires):
    # baseline: median of the user's active hours = 0.10; limit 2x
    costs = pd.DataFrame(hours("ann", [0.1, 0.1, 0.05, 0.3], now_cost))
    got = run(costs=costs)
    assert ("throttle:ann" in actions(got)) is fires
    if fires:
        assert got[0].evidence["baseline_usd"] == pytest.approx(0.1) and got[0].evidence["baseline_source"] == "user"


@pytest.mark.parametrize("now_cost,fires", [(0.05, True), (0.0499, False)])
def test_throttle_ignores_cheap_anomalies(now_cost, fires):
    costs = pd.DataFrame(hours("ann", [0.01, 0.01, 0.01], now_cost))
    assert ("throttle:ann" in actions(run(costs=costs))) is fires


def test_throttle_baseline_ignores_hours_older_than_a_week_and_newcomers_use_the_team():
    rows = hours("ann", [0.1] * 3, 0.25)
    rows += [{"user_id": "ann", "hour": HOUR - pd.Timedelta(hours=200), "cost_usd": 10.0, "requests": 1}]
    rows += [{"user_id": "new", "hour": HOUR, "cost_usd": 0.25, "requests": 4}]
    got = run(costs=pd.DataFrame(rows))
    assert actions(got) == ["throttle:ann", "throttle:new"]
    assert got[1].evidence["baseline_source"] == "team"


@pytest.mark.parametrize("now_cost,fires", [(0.6, False), (0.61, True)])
def test_a_heavy_users_short_history_beats_the_teams_lower_median(now_cost, fires):
    # bob has one active hour at $0.30, the team's median hour is $0.10 (ann's three): bob's own
    # hour is his baseline, so doubling it is needed, not 2 x $0.10.
    rows = hours("ann", [0.1] * 3, 0.1) + hours("bob", [0.3], now_cost)
    got = [d for d in run(costs=pd.DataFrame(rows)) if d.user_id == "bob"]
    assert bool(got) is fires
    if fires:
        assert got[0].evidence["baseline_usd"] == pytest.approx(0.3) and got[0].evidence["baseline_source"] == "user"


# --- 6. swap ------------------------------------------------------------------------------------

def versions(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["model", "base_model", "task_type", "eval_score", "base_eval_score"])


@pytest.mark.parametrize("score,margin,fires", [
    (0.71, 0.0, True), (0.70, 0.0, False), (0.75, 0.05, True), (0.7499, 0.05, False), (0.6, 0.0, False),
])
def test_swap_boundary(score, margin, fires):
    got = run(versions=versions(("llama3.2-ft-sql", "llama3.2", "sql", score, 0.70)),
              thresholds=Thresholds(swap_min_margin=margin))
    assert ("swap:sql:llama3.2" in actions(got)) is fires
    if fires:
        assert (got[0].model, got[0].target_model) == ("llama3.2", "llama3.2-ft-sql")


def test_no_model_versions_yet_means_no_swap():
    assert run(versions=versions()) == [] and run(versions=None) == []


# --- modes, ids, determinism, conflicts ---------------------------------------------------------

def everything() -> dict:
    return dict(
        patterns=pats(("coding", "llama3.2", 12, 0.3), ("chat", "llama3.2", 60, 0.9)),
        grades_df=pd.DataFrame([grade_row("ann", {"2025-03-02": 0.1, "2025-03-03": 0.1, "2025-03-04": 0.1})]),
        costs=pd.DataFrame(hours("bob", [0.1] * 5, 5.0)),
        versions=versions(("llama3.2-ft", "llama3.2", "chat", 0.9, 0.8)),
    )


@pytest.mark.parametrize("mode,status", [("auto", "active"), ("dry-run", "proposed"), ("manual", "inactive")])
def test_every_mode_computes_the_same_decisions_only_the_status_differs(mode, status):
    got = run(**everything(), mode=mode)
    assert actions(got) == ["throttle:bob", "escalate:coding", "lock_local:chat", "swap:chat:llama3.2",
                            "finetune:chat:llama3.2", "coach:ann"]
    assert {d.status for d in got} == {status}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        run(mode="yolo")


def test_same_input_twice_gives_identical_decisions():
    assert run(**everything()) == run(**everything())
    shuffled = everything()
    shuffled["patterns"] = shuffled["patterns"].iloc[::-1]
    assert run(**shuffled) == run(**everything())


def _route(decided, task_type, user):
    rules = [Rule(d.rule_id, d.action, d.task_type, d.user_id, d.model, d.target_model, d.reason)
             for d in decided if d.status == "active"]
    config = load_config(EXAMPLE_CONFIG)
    known = lambda m: m in config.models or m == "llama3.2-ft"  # noqa: E731 - a registered fine-tune
    r = route_request("auto", task_type, user, RuleBook.from_rules(rules), config, known)
    return r.model, r.route


def test_a_throttled_user_goes_local_even_on_an_escalated_type():
    got = run(**everything(), frontier_model="claude-sonnet-5-5")
    assert _route(got, "coding", "bob") == ("llama3.2", "rule:throttle:bob")
    assert _route(got, "coding", "ann") == ("claude-sonnet-5-5", "rule:escalate:coding")
    # the locked type's local model is replaced by the fine-tune that beat it, throttled or not
    assert _route(got, "chat", "ann")[0] == "llama3.2-ft"
    assert _route(got, "chat", "bob")[0] == "llama3.2-ft"
    assert _route(got, "poetry", "ann") == ("llama3.2", "default")


def test_a_cascade_rule_routes_local_first_with_the_frontier_behind_it():
    config = load_config(EXAMPLE_CONFIG)
    local = config.defaults.model
    frontier = config.defaults.frontier_model
    rule = Rule("cascade:coding", "cascade", "coding", None, local, frontier, "borderline")
    book = RuleBook.from_rules([rule])
    r = route_request("auto", "coding", "ann", book, config)
    assert (r.model, r.route, r.escalate_to) == (local, "rule:cascade:coding", frontier)
    # a named model is the client's choice; another type is not touched
    assert route_request(frontier, "coding", "ann", book, config).escalate_to is None
    assert route_request("auto", "poetry", "ann", book, config).escalate_to is None
    # a fine-tune that beat the local model answers first; the frontier still stands behind it
    swap = Rule("swap:coding:" + local, "swap_model", "coding", None, local, "ft-1", "won")
    r = route_request("auto", "coding", "ann", RuleBook.from_rules([rule, swap]), config,
                      lambda m: m in config.models or m == "ft-1")
    assert (r.model, r.escalate_to) == ("ft-1", frontier)
    # escalate beats cascade on one type
    esc = Rule("escalate:coding", "escalate", "coding", None, None, frontier, "bad")
    assert route_request("auto", "coding", "ann", RuleBook.from_rules([rule, esc]), config).escalate_to is None


def test_rules_that_are_not_active_do_not_route():
    got = run(**everything(), mode="dry-run")
    assert _route(got, "coding", "bob") == ("llama3.2", "default")


def test_a_small_share_of_a_ruled_types_traffic_explores_the_other_side():
    config = load_config(EXAMPLE_CONFIG)
    local, frontier = config.defaults.model, config.defaults.frontier_model
    share = config.loop.thresholds.explore_share
    esc = RuleBook.from_rules([Rule("escalate:coding", "escalate", "coding", None, local, frontier, "bad")])
    lock = RuleBook.from_rules([Rule("lock_local:chat", "lock_local", "chat", None, frontier, local, "good")])
    # Over the share the rule holds; under it an escalated type tries the local model the rule names,
    # a locked one the frontier.
    assert route_request("auto", "coding", "ann", esc, config, explore=share).model == frontier
    r = route_request("auto", "coding", "ann", esc, config, explore=share / 2)
    assert (r.model, r.route) == (local, "explore:escalate:coding")
    assert route_request("auto", "chat", "ann", lock, config, explore=0.0).model == frontier
    # An escalation that names no local model (far behind), no share, a throttled user or a named
    # model: no exploration.
    hopeless = RuleBook.from_rules([Rule("escalate:coding", "escalate", "coding", None, None, frontier, "bad")])
    assert route_request("auto", "coding", "ann", hopeless, config, explore=0.0).model == frontier
    off = config.model_copy(update={"loop": config.loop.model_copy(
        update={"thresholds": config.loop.thresholds.model_copy(update={"explore_share": 0.0})})})
    assert route_request("auto", "coding", "ann", esc, off, explore=0.0).model == frontier
    throttled = RuleBook.from_rules([*esc.by_type.values(), Rule("throttle:ann", "throttle", None, "ann", None, None, "x")])
    assert config.models[route_request("auto", "chat", "ann", throttled, config, explore=0.0).model].tier.value == "local"
    assert route_request(frontier, "coding", "ann", esc, config, explore=0.0).route == "requested"


@pytest.mark.parametrize("local,frontier,explored", [(0.72, 0.8, "llama3.2"), (0.4, 0.8, None), (0.58, None, "llama3.2"),
                                                     (0.2, None, None)])
def test_an_escalation_names_its_local_model_for_exploration_only_while_it_could_win(local, frontier, explored):
    rows = [("reasoning", "llama3.2", 300, local)] + ([("reasoning", "claude-sonnet-4-5", 300, frontier)] if frontier else [])
    got = run(jpats(*rows), frontier_model="claude-sonnet-4-5")
    assert [(d.action, d.model) for d in got] == [("escalate", explored)]


@pytest.mark.parametrize("local,verdicts,frontier,explored", [
    (1.0, 20, None, None), (0.95, 20, None, "claude-sonnet-4-5"), (0.88, 300, 0.9, "claude-sonnet-4-5"),
    (0.99, 3000, 0.9, None)])
def test_a_lock_names_the_frontier_for_exploration_only_while_it_could_be_ahead(local, verdicts, frontier, explored):
    rows = [("chat", "llama3.2", verdicts, local)] + ([("chat", "claude-sonnet-4-5", verdicts, frontier)] if frontier else [])
    got = run(jpats(*rows), frontier_model="claude-sonnet-4-5")
    assert [(d.action, d.model) for d in got] == [("lock_local", explored)]


def test_exploration_draws_spread_evenly_and_repeat_per_prompt():
    draws = [explore_draw(f"question {i}") for i in range(2000)]
    assert all(0 <= d < 1 for d in draws) and explore_draw("question 7") == draws[7]
    assert 0.04 < sum(d < 0.05 for d in draws) / len(draws) < 0.065
