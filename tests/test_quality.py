"""Quality scoring: each signal behaves as a user would expect, the composite never invents a missing signal."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tm_resources.config import ScoringWeights
from tm_resources.quality import (
    brevity,
    coherence,
    composite,
    cost_efficiency,
    expected_output_tokens,
    judge_prompt,
    parse_judge,
    prompt_quality,
    reprompt_signal,
    score_requests,
)

T0 = pd.Timestamp("2025-03-04 10:00", tz="UTC")


def unit(*xs: float, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def pair_with_cosine(c: float, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors whose cosine is exactly c."""
    return unit(1.0, dim=dim), unit(c, np.sqrt(1 - c * c), dim=dim)


# --- coherence ---------------------------------------------------------------------------------

def test_coherence_is_monotone_and_maps_typical_good_cosines_high():
    cosines = [-0.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
    p, a = zip(*(pair_with_cosine(c) for c in cosines), strict=True)
    scores = coherence(np.array(p), np.array(a))
    assert np.all(np.diff(scores) > 0)
    assert scores.min() >= 0 and scores.max() <= 1
    by = dict(zip(cosines, scores, strict=True))
    assert by[0.7] >= 0.95 and by[0.5] > 0.7   # MiniLM cosines of a good pair are often only 0.3-0.7
    assert by[0.1] <= 0.05                     # an unrelated answer


def test_coherence_is_missing_not_guessed_for_absent_vectors_and_one_letter_answers():
    p, a = pair_with_cosine(0.6)
    prompts = np.array([p, p, np.zeros(8)])
    answers = np.array([a, a, a])
    scores = coherence(prompts, answers, ["B", "The answer is B, because the heat comes from friction.", "fine answer here, long enough"])
    assert np.isnan(scores[0]) and not np.isnan(scores[1]) and np.isnan(scores[2])


# --- completion (judge) ------------------------------------------------------------------------

def test_judge_prompt_carries_both_texts_and_asks_for_one_number():
    msgs = judge_prompt("List three primes and explain why 1 is not prime.", "2, 3, 5.")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "every element" in msgs[0]["content"] and "single integer from 0 to 10" in msgs[0]["content"]
    assert "List three primes" in msgs[1]["content"] and "2, 3, 5." in msgs[1]["content"]


def test_judge_prompt_clips_huge_texts():
    msgs = judge_prompt("x" * 100_000, "y" * 100_000)
    assert len(msgs[1]["content"]) < 15_000


@pytest.mark.parametrize("text,expected", [
    ("7", 0.7), ("10", 1.0), ("0", 0.0), (" 8\n", 0.8), ("Score: 6", 0.6), ("9/10", 0.9), ("**4**", 0.4),
    ('{"score": 3}', 0.3), ("I'd rate it 7/10 overall.", 0.7),
    ("11", None), ("-1", None), ("", None), (None, None), ("great answer", None),
    ("6/10 for part one, 9/10 for part two", None), ('{"score": "high"}', None), ("{not json", None),
])
def test_parse_judge_accepts_one_clear_score_only(text, expected):
    got = parse_judge(text)
    assert got == pytest.approx(expected) if expected is not None else got is None


# --- brevity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,tight,verbose", [
    ("What is the capital of France?", 20, 400),
    ("Write a Python function that reverses a linked list.", 250, 2500),
    ("Explain in detail how TCP congestion control works, step by step.", 500, 6000),
])
def test_a_verbose_answer_scores_lower_than_a_tight_one(prompt, tight, verbose):
    assert brevity(tight, prompt) == 1.0
    assert brevity(verbose, prompt) < 0.5


def test_a_very_short_answer_to_a_complex_prompt_is_not_rewarded():
    prompt = ("Write a Python class for an LRU cache.\n- get and put in O(1)\n- thread safe\n"
              "- explain the design in detail\n- add unit tests")
    assert brevity(10, prompt) < 0.5
    assert brevity(10, prompt) < brevity(expected_output_tokens(prompt), prompt) == 1.0


def test_a_one_letter_answer_to_a_letter_only_question_is_right_sized():
    prompt = 'Which gas do plants absorb?\nA) O2\nB) CO2\nPrint only a single choice from "A" or "B" without explanation.'
    assert brevity(1, prompt) > 0.9
    assert brevity(200, prompt) < 0.15


def test_complexity_grows_with_asks_code_and_detail():
    plain = expected_output_tokens("What is a monad?")
    assert expected_output_tokens("What is a monad? How is it used? Why does Haskell need it?") > plain
    assert expected_output_tokens("Write a function that parses a date.") > plain
    assert expected_output_tokens("Explain monads in detail.") > plain


def test_brevity_curve_halves_per_doubling_past_the_budget():
    assert brevity(300, "", expected=100) == pytest.approx(0.5)
    assert brevity(600, "", expected=100) == pytest.approx(0.25)
    assert brevity(150, "", expected=100) == 1.0 and brevity(50, "", expected=100) == 1.0
    assert np.isnan(brevity(float("nan"), "hi"))


# --- re-prompt ---------------------------------------------------------------------------------

def log(*rows: tuple) -> pd.DataFrame:
    """rows: (seconds after T0, user, session, prompt[, parent_id])"""
    out = []
    for i, r in enumerate(rows):
        out.append({"id": f"r{i}", "ts": T0 + pd.Timedelta(seconds=r[0]), "user_id": r[1], "session_id": r[2],
                    "prompt": r[3], "parent_id": r[4] if len(r) > 4 else None})
    return pd.DataFrame(out)


@pytest.mark.parametrize("follow_up", [
    "No, I meant the async version.", "That's wrong, the limit is 10.", "This is not what I asked.",
    "Try again with Python 3.11.", "You forgot the error handling.", "It still doesn't work.",
    "Actually, I meant the other file.",
])
def test_a_correction_zeroes_the_earlier_requests_signal(follow_up):
    df = log((0, "ann", "s1", "Write a retry decorator."), (60, "ann", "s1", follow_up))
    sig = reprompt_signal(df, reprompt_window_s=600)
    assert sig.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("rows,expected_first", [
    # an unrelated next question is no evidence against the first answer
    (((0, "ann", "s1", "Write a retry decorator."), (60, "ann", "s1", "Now what is the capital of Peru?")), 1.0),
    # a correction after the window is not about that answer any more
    (((0, "ann", "s1", "Write a retry decorator."), (601, "ann", "s1", "No, that's wrong.")), 1.0),
    # exactly at the window edge it still counts
    (((0, "ann", "s1", "Write a retry decorator."), (600, "ann", "s1", "No, that's wrong.")), 0.0),
    # another user's correction is theirs
    (((0, "ann", "s1", "Write a retry decorator."), (60, "bob", "s1", "No, that's wrong.")), 1.0),
    # another session of the same user is another thread
    (((0, "ann", "s1", "Write a retry decorator."), (60, "ann", "s2", "No, that's wrong.")), 1.0),
    # without a session, the user's next request is the follow-up
    (((0, "ann", None, "Write a retry decorator."), (60, "ann", "s9", "You forgot the jitter.")), 0.0),
    # doubt is weaker evidence
    (((0, "ann", "s1", "Write a retry decorator."), (60, "ann", "s1", "Are you sure about the backoff?")), 0.5),
    # the same prompt sent again (regenerate) is a re-prompt
    (((0, "ann", "s1", "Write a retry decorator in Python."), (30, "ann", "s1", "Write a retry decorator in Python.")), 0.0),
])
def test_reprompt_evidence(rows, expected_first):
    assert reprompt_signal(log(*rows), reprompt_window_s=600).iloc[0] == pytest.approx(expected_first)


@pytest.mark.parametrize("cosine,expected", [(0.95, 0.0), (0.90, 0.0), (0.825, 0.5), (0.75, 1.0), (0.3, 1.0)])
def test_a_near_duplicate_rephrasing_counts_by_prompt_embedding(cosine, expected):
    df = log((0, "ann", "s1", "How do I sort a dict by value?"), (45, "ann", "s1", "sorting a dictionary on its values how"))
    p, q = pair_with_cosine(cosine)
    assert reprompt_signal(df, np.array([p, q]), 600).iloc[0] == pytest.approx(expected)
    # the same vectors handed in as a column
    assert reprompt_signal(df.assign(prompt_vec=[p, q]), None, 600).iloc[0] == pytest.approx(expected)


def test_a_cascade_attempt_is_not_a_user_follow_up():
    df = log((0, "ann", "s1", "Prove the lemma."), (5, "ann", "s1", "Prove the lemma.", "r0"),
             (30, "ann", "s1", "Thanks! Now summarise it."))
    sig = reprompt_signal(df, reprompt_window_s=600)
    # the local attempt was never seen by the user: no evidence either way
    assert np.isnan(sig.iloc[0])
    assert sig.iloc[1] == 1.0


def test_attempts_logged_after_their_answer_are_not_its_follow_up():
    # The gateway writes a cascade's or a consensus's attempts with the request's own time and ids
    # made after the answer's: sorted by (ts, id) the answer comes first, and its attempts after it.
    df = log((0, "ann", "s1", "Which is heavier?", "r1"), (0, "ann", "s1", "Which is heavier?"),
             (30, "ann", "s1", "Thanks! And which floats?"))
    sig = reprompt_signal(df, reprompt_window_s=600)
    # The answer is judged by the user's next words, not by its own attempt's prompt.
    assert np.isnan(sig.iloc[1]) and sig.iloc[0] == 1.0


def test_the_escalated_answer_is_judged_by_the_users_next_request():
    df = log((0, "ann", "s1", "Prove the lemma."), (5, "ann", "s1", "Prove the lemma.", "r0"),
             (30, "ann", "s1", "That's wrong, the base case fails."))
    sig = reprompt_signal(df, reprompt_window_s=600)
    assert np.isnan(sig.iloc[0]) and sig.iloc[1] == 0.0 and sig.iloc[2] == 1.0


# --- cost efficiency ---------------------------------------------------------------------------

def test_cost_efficiency_is_quality_discounted_by_share_of_frontier_cost():
    got = cost_efficiency([0.8, 0.8, 0.8, 0.8], [0.0, 0.01, 0.03, 0.0], [0.01, 0.01, 0.01, np.nan])
    assert got.tolist() == pytest.approx([0.8, 0.4, 0.2, 0.8])


def test_a_missing_baseline_comes_from_the_batch():
    # known baselines cost 0.001 per token: a 100-token row missing one is compared with 0.1
    got = cost_efficiency([1.0, 1.0], [0.05, 0.1], [np.nan, 0.1], tokens=[100, 100])
    assert got.tolist() == pytest.approx([1 / 1.5, 0.5])
    # no baseline anywhere: the batch's 90th percentile of paid cost per token stands in
    got = cost_efficiency([1.0] * 11, [0.0] + [0.01 * i for i in range(1, 11)], [np.nan] * 11, tokens=[100] * 11)
    assert got[0] == 1.0 and got[-1] < got[1] < 1.0


# --- prompt quality ----------------------------------------------------------------------------

@pytest.mark.parametrize("vague,good", [
    ("fix it", "In `parse_config` (config.py) loading tm.yaml raises KeyError 'models' on Python 3.11. "
               "I tried adding a default. Fix it so a missing section gives a clear error; keep the signature."),
    ("make it better", "Rewrite this product description for a B2B audience in at most 80 words, keep the price "
                       "and the three features, and use a confident tone: \"Our tool syncs files...\""),
    ("why", "Why does my pandas groupby on 'user_id' drop rows with NaN keys? I'm using pandas 2.2 and need them kept."),
])
def test_a_specific_prompt_scores_higher_than_a_vague_one(vague, good):
    assert prompt_quality(vague) < 0.15
    assert prompt_quality(good) > 0.6
    assert 0 <= prompt_quality(vague) < prompt_quality(good) <= 1


def test_prompt_quality_of_an_empty_prompt_is_zero_and_of_no_prompt_missing():
    assert prompt_quality("") == 0.0
    # A request rejected before it had a prompt (the log holds NULL, pandas NaN) grades nobody's prompts.
    assert math.isnan(prompt_quality(None)) and math.isnan(prompt_quality(float("nan")))


# --- composite ---------------------------------------------------------------------------------

W = ScoringWeights()


def test_a_missing_judge_renormalizes_and_never_invents():
    signals = pd.DataFrame({"coherence": [0.8, 0.8], "completion": [np.nan, 0.0], "brevity": [1.0, 1.0],
                            "reprompt": [1.0, 1.0], "cost_efficiency": [0.5, 0.5]})
    q = composite(signals, W)
    expected_without_judge = (0.25 * 0.8 + 0.20 * 1.0 + 0.20 * 1.0 + 0.10 * 0.5) / 0.75
    assert q.iloc[0] == pytest.approx(expected_without_judge)
    # a judge that said 0 is a real 0, not a missing one
    assert q.iloc[1] == pytest.approx(0.25 * 0.8 + 0.20 + 0.20 + 0.05)


def test_composite_with_no_signal_is_missing_and_ignores_other_columns():
    signals = pd.DataFrame({"coherence": [np.nan], "completion": [np.nan], "brevity": [np.nan],
                            "reprompt": [np.nan], "cost_efficiency": [np.nan], "prompt_quality": [0.9]})
    assert composite(signals, W).isna().all()
    assert composite(pd.DataFrame({"brevity": [0.6], "prompt_quality": [0.0]}), W).iloc[0] == pytest.approx(0.6)


def test_weights_come_from_config():
    signals = pd.DataFrame({"coherence": [1.0], "brevity": [0.0]})
    assert composite(signals, ScoringWeights(coherence=3, brevity=1)).iloc[0] == pytest.approx(0.75)


# --- score_requests ----------------------------------------------------------------------------

def requests_frame() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    df = pd.DataFrame([
        {"id": "a", "ts": T0, "user_id": "ann", "session_id": "s1", "status": 200, "output_tokens": 40,
         "input_tokens": 20, "cost_usd": 0.0, "baseline_cost_usd": 0.002,
         "prompt": "What does HTTP status 429 mean and how should a client react?",
         "response_text": "429 Too Many Requests: the server is rate limiting you; back off and retry after Retry-After."},
        {"id": "b", "ts": T0 + pd.Timedelta(seconds=40), "user_id": "ann", "session_id": "s1", "status": 200,
         "output_tokens": 900, "input_tokens": 30, "cost_usd": 0.004, "baseline_cost_usd": np.nan,
         "prompt": "No, I meant for a gRPC client, not HTTP.",
         "response_text": "For gRPC, the equivalent status is RESOURCE_EXHAUSTED... " * 20},
        {"id": "c", "ts": T0 + pd.Timedelta(seconds=90), "user_id": "bob", "session_id": None, "status": 503,
         "output_tokens": 0, "input_tokens": 12, "cost_usd": 0.0, "baseline_cost_usd": np.nan,
         "prompt": "fix it", "response_text": None},
    ])
    p1, a1 = pair_with_cosine(0.6)
    p2, a2 = pair_with_cosine(0.4)
    prompts = np.array([p1, p2, p1])
    answers = np.array([a1, a2, np.zeros(8)])
    return df, prompts, answers


def test_score_requests_columns_ranges_and_failed_rows():
    df, pv, av = requests_frame()
    out = score_requests(df, pv, av, pd.Series({"a": 0.9, "c": 0.5}), W, 600)
    assert list(out.columns) == ["request_id", "coherence", "completion", "brevity", "reprompt",
                                 "cost_efficiency", "prompt_quality", "quality"]
    assert out["request_id"].tolist() == ["a", "b", "c"]
    sig = out.drop(columns="request_id")
    assert ((sig >= 0) & (sig <= 1) | sig.isna()).all().all()
    a, b, c = (out.iloc[i] for i in range(3))
    assert a["reprompt"] == 0.0 and b["reprompt"] == 1.0           # b corrected a
    assert a["completion"] == 0.9 and np.isnan(b["completion"])     # judge joined by id, missing stays missing
    assert b["brevity"] < a["brevity"]
    # a failed request gets no quality (left out of averages downstream), but its prompt is still graded
    assert np.isnan(c["quality"]) and np.isnan(c["completion"]) and c["prompt_quality"] < 0.15
    assert a["quality"] > b["quality"]


def test_score_requests_is_deterministic():
    df, pv, av = requests_frame()
    one = score_requests(df, pv, av, None, W, 600)
    two = score_requests(df.copy(), pv.copy(), av.copy(), None, W, 600)
    pd.testing.assert_frame_equal(one, two)
    assert one["completion"].isna().all() and one["quality"].iloc[:2].notna().all()


def test_score_requests_without_vectors_leaves_coherence_missing():
    df, _, _ = requests_frame()
    out = score_requests(df, None, None, None, W, 600)
    assert out["coherence"].isna().all() and out["quality"].iloc[0] > 0


def test_a_cache_hit_is_measured_by_its_answer_not_its_zero_billed_tokens():
    df, pv, av = requests_frame()
    hit = df.iloc[[0]].assign(output_tokens=0, cost_usd=0.0)
    out = score_requests(hit, pv[:1], av[:1], None, W, 600).iloc[0]
    assert out["brevity"] == 1.0
    # free: cost efficiency is the quality of the other signals, so it neither lifts nor lowers the composite
    assert out["cost_efficiency"] == pytest.approx(out["quality"])
