"""The learned router: it learns from a log which model is good on which kind of prompt and sends
each kind to the cheapest model that gets it right; cascades try cheap first and escalate when the
gate fails; the RouterBench runner reports figures a user can check by hand."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from tm_gateway.router import Attempt, KnnRouter, Plan, candidate_plans, plan_outcomes, replay, routing_text
from tm_gateway.routerbench import load_routerbench, run_router_bench

# ------------------------------------------------------------------------------------------------
# A small RouterBench-format log, written by hand. Three kinds of prompt:
#   sums:    every model is right; `small` costs least
#   poems:   `small` refuses (the gate sees it); `mid` and `big` are right
#   riddles: `small` and `mid` answer, plausibly but wrongly; only `big` is right
MODELS = {"small": 0.0001, "mid": 0.001, "big": 0.01}
NUMBERS = [(17, 25), (3, 9), (41, 8), (12, 30), (7, 7), (66, 11), (23, 19), (5, 48), (90, 4), (14, 27),
           (38, 2), (51, 16), (8, 73), (29, 29), (60, 15), (2, 99), (44, 36), (31, 6)]
SUBJECTS = ["the sea", "a lighthouse", "autumn leaves", "a lost cat", "the moon", "city rain", "an old piano",
            "a mountain pass", "winter bread", "a paper boat", "the first snow", "a train station", "a garden",
            "a sleepless night", "the desert wind", "a fox at dawn", "a quiet library", "a broken clock"]
RIDDLES = ["What has keys but can't open locks?", "What gets wetter the more it dries?",
           "What has a neck but no head?", "What can travel around the world while staying in a corner?",
           "What has hands but can't clap?", "What has one eye but can't see?",
           "What goes up but never comes down?", "What has many teeth but can't bite?",
           "What can you catch but not throw?", "What has words but never speaks?",
           "What runs but never walks?", "What has a head and a tail but no body?",
           "What building has the most stories?", "What has legs but doesn't walk?",
           "What is full of holes but still holds water?", "What can fill a room but takes up no space?",
           "What comes once in a minute, twice in a moment, but never in a thousand years?",
           "What has cities but no houses, forests but no trees?"]


def _rows(kinds: dict[str, list[str]]) -> list[dict]:
    rows = []
    for kind, prompts in kinds.items():
        for i, prompt in enumerate(prompts):
            if kind == "sums":
                right = {"small": 1, "mid": 1, "big": 1}
                answers = {m: prompt.split("is ")[-1] and str(eval(prompt.split("is ")[-1].rstrip("?").replace("plus", "+")))
                           for m in MODELS}
            elif kind == "poems":
                right = {"small": 0, "mid": 1, "big": 1}
                poem = "Waves fold over waves,\nthe gulls write the wind in salt,\nand the shore forgets.\n"
                answers = {"small": "I'm sorry, but I can't help with writing poems.", "mid": poem, "big": poem}
            else:
                right = {"small": 0, "mid": 0, "big": 1}
                answers = {"small": "A door.", "mid": "A door.", "big": "A piano."}
            row = {"sample_id": f"{kind}.{i}", "prompt": repr([prompt]), "eval_name": kind}
            for m, price in MODELS.items():
                row[m] = right[m]
                row[f"{m}|model_response"] = repr([answers[m]])
                row[f"{m}|total_cost"] = price * (1 + 0.01 * i)
            cheapest_right = min((m for m in MODELS if right[m]), key=MODELS.get)
            row["oracle_model_to_route_to"] = cheapest_right
            rows.append(row)
    return rows


def _write(folder: Path, rows: list[dict], name: str = "synthetic_train.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["sample_id", "prompt", "eval_name", *MODELS, *(f"{m}|model_response" for m in MODELS),
              *(f"{m}|total_cost" for m in MODELS), "oracle_model_to_route_to"]
    with (folder / name).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return folder


def _kinds(start: int, stop: int) -> dict[str, list[str]]:
    return {
        "sums": [f"What is {a} plus {b}?" for a, b in NUMBERS[start:stop]],
        "poems": [f"Write a short poem about {s}." for s in SUBJECTS[start:stop]],
        "riddles": [f"Solve this riddle: {r}" for r in RIDDLES[start:stop]],
    }


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("routerbench")
    train_rows = _rows(_kinds(0, 13))
    # A row with a blank outcome, as the real files have: left out, and counted.
    blank = dict(train_rows[0], sample_id="blank.0", small="")
    train = _write(root / "train", train_rows + [blank])
    test = _write(root / "test", _rows(_kinds(13, 18)))
    return train, test


@pytest.fixture(scope="module")
def embed():
    from tm_resources.embedder import get_embedder

    return get_embedder().embed


def test_load_routerbench_decodes_and_drops_incomplete_rows(bench_dirs):
    data = load_routerbench(bench_dirs[0])
    assert data.models == ["small", "mid", "big"]
    assert len(data) == 39 and data.dropped == 1
    assert data.prompts[0] == "What is 17 plus 25?"
    assert data.answers[13]["small"].startswith("I'm sorry")
    assert data.quality.shape == data.cost.shape == (39, 3)


# A log of a dozen prompts per kind: a narrow neighbourhood and no pull towards the log-wide means
# (the defaults are tuned for logs of thousands of rows, and are cautious on tiny ones: see below).
SMALL_LOG = {"k": 5, "temperature": 0.1, "prior_weight": 0.0}


def test_router_sends_each_kind_to_the_cheapest_model_that_gets_it_right(bench_dirs, embed, tmp_path):
    out = run_router_bench(bench_dirs[0], train_share=0.6, seed=0, embed=embed, cache_dir=tmp_path, **SMALL_LOG)
    assert out["reference_model"] == "big"
    router, big = out["router"], out["single"]["big"]
    assert router["accuracy"] == 1.0
    # Sums go to `small`, poems to `mid`, riddles to `big`: a third of big's price or less.
    assert router["cost_per_query"] < big["cost_per_query"] / 2
    assert set(router["choices"]) == {"small", "mid", "big"}
    assert router["choices"]["big"] < 0.5
    assert out["target"]["router_met"] is True
    # Hand-checkable baselines on the same held-out rows.
    n = out["split"]["test_rows"]
    assert n == 39 - round(0.6 * 39)
    assert big["accuracy"] == 1.0
    assert out["single"]["small"]["accuracy"] < 0.6
    assert out["oracle"]["accuracy"] == 1.0
    assert out["oracle"]["cost_per_query"] <= router["cost_per_query"] + 1e-12
    mean_acc = np.mean([out["single"][m]["accuracy"] for m in MODELS])
    assert out["random"]["accuracy"] == pytest.approx(mean_acc, abs=1e-3)


def test_cascade_pays_for_every_attempt_and_escalates_on_gate_failure(bench_dirs, embed, tmp_path):
    out = run_router_bench(bench_dirs[0], bench_dirs[1], embed=embed, cache_dir=tmp_path, **SMALL_LOG)
    assert out["test"]["rows"] == 15 and out["data"]["rows"] == 39
    cascade = out["router_cascade"]
    assert cascade["accuracy"] == 1.0
    assert cascade["cost_per_query"] < out["single"]["big"]["cost_per_query"] / 2
    assert cascade["candidate_plans"] > 3

    # The same replay by hand: `small` refuses the poem, the gate fails it, `big` answers; both are paid.
    data = load_routerbench(bench_dirs[1])
    poem = next(i for i, p in enumerate(data.prompts) if p.startswith("Write a short poem"))
    plan = Plan(("small",), "big")
    called, served = replay(plan, data.prompts[poem], data.answers[poem])
    assert (called, served) == (["small", "big"], "big")
    q, c = plan_outcomes([plan], [data.prompts[poem]], [data.answers[poem]], data.quality[[poem]],
                         data.cost[[poem]], data.models)
    assert q[0, 0] == 1.0 and c[0, 0] == pytest.approx(data.cost[poem, 0] + data.cost[poem, 2])


def test_on_a_tiny_log_the_defaults_stay_with_the_best_model(bench_dirs, embed, tmp_path):
    out = run_router_bench(bench_dirs[0], bench_dirs[1], embed=embed, cache_dir=tmp_path)
    assert out["router"]["choices"] == {"big": 1.0}
    assert out["router"]["accuracy"] == 1.0


def test_vectors_are_cached_on_disk(bench_dirs, embed, tmp_path):
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return embed(texts)

    first = run_router_bench(bench_dirs[0], embed=counting, cache_dir=tmp_path, cascades=False)
    second = run_router_bench(bench_dirs[0], embed=counting, cache_dir=tmp_path, cascades=False)
    assert calls == [39]
    assert first["router"] == second["router"]
    assert list(tmp_path.glob("router-vectors-*.npy"))


def test_repeats_report_each_split_and_the_mean(bench_dirs, embed, tmp_path):
    out = run_router_bench(bench_dirs[0], repeats=3, seed=5, embed=embed, cache_dir=tmp_path, cascades=False,
                           **SMALL_LOG)
    assert [s["split"]["seed"] for s in out["splits"]] == [5, 6, 7]
    accs = [s["router"]["accuracy"] for s in out["splits"]]
    assert out["mean"]["router"]["accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-6)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_routerbench(tmp_path / "nothing-here")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="RouterBench"):
        load_routerbench(tmp_path)
    with pytest.raises(ValueError, match="train_share"):
        run_router_bench(tmp_path, train_share=1.0)


# ------------------------------------------------------------------------------------------------
# KnnRouter on hand-made vectors: two clusters of prompts, two models


def _clusters(n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = np.array([1, 0, 0, 0], dtype=np.float32) + 0.05 * rng.standard_normal((n, 4)).astype(np.float32)
    b = np.array([0, 1, 0, 0], dtype=np.float32) + 0.05 * rng.standard_normal((n, 4)).astype(np.float32)
    vecs = np.vstack([a, b])
    quality = np.array([[1.0, 1.0]] * n + [[0.0, 1.0]] * n)  # cheap is right on cluster a only
    cost = np.array([[1.0, 10.0]] * (2 * n))
    return vecs, quality, cost


def test_knn_router_learns_where_the_cheap_model_is_good():
    vecs, quality, cost = _clusters()
    router = KnnRouter(vecs, ["cheap", "dear"], quality, cost, k=5, temperature=0.05)
    on_a, on_b = np.array([1, 0.02, 0, 0]), np.array([0.02, 1, 0, 0])
    assert router.choose(on_a, min_quality=0.8).arm == "cheap"
    assert router.choose(on_b, min_quality=0.8).arm == "dear"
    # cost_weight 0.5: one dear call is worth 50 points of quality.
    assert router.choose(on_a, cost_weight=0.5).arm == "cheap"
    assert router.choose(on_b, cost_weight=0.5).arm == "dear"
    # Quality first: with no weight on cost, the better model wins, and the cheaper on a tie.
    assert router.choose(on_b).arm == "dear"
    q, c = router.predict(on_a)
    assert q.shape == c.shape == (1, 2)
    assert q[0, 0] > 0.8 and c[0, 1] == pytest.approx(10.0)
    # A bar no arm clears: the best predicted, said so.
    choice = router.choose(on_b, min_quality=1.5, explain=True)
    assert choice.arm == "dear" and "none predicted" in choice.reason and set(choice.scores) == {"cheap", "dear"}


def test_prior_keeps_a_thin_neighbourhood_from_swinging_the_choice():
    vecs, quality, cost = _clusters()
    shrunk = KnnRouter(vecs, ["cheap", "dear"], quality, cost, k=1, prior_weight=1000)
    q, _ = shrunk.predict(np.array([1, 0.02, 0, 0]))
    assert q[0, 0] == pytest.approx(0.5, abs=0.01)  # the cheap model's log-wide mean


def test_untried_arms_are_never_chosen_and_allowed_restricts():
    vecs, quality, cost = _clusters()
    quality = np.hstack([quality, np.full((len(vecs), 1), np.nan)])
    cost = np.hstack([cost, np.zeros((len(vecs), 1))])
    router = KnnRouter(vecs, ["cheap", "dear", "new"], quality, cost, k=5, temperature=0.05)
    on_b = np.array([0, 1, 0, 0])
    assert router.choose(on_b).arm == "dear"
    assert np.isnan(router.predict(on_b)[0][0, 2])
    assert router.choose(on_b, allowed=["cheap", "new"]).arm == "cheap"
    with pytest.raises(ValueError):
        router.choose(on_b, allowed=["new"])


def test_missing_outcomes_are_ignored_not_counted_as_failures():
    vecs, quality, cost = _clusters()
    quality[:20, 0] = np.nan  # cheap never tried on cluster a
    router = KnnRouter(vecs, ["cheap", "dear"], quality, cost, k=5, temperature=0.05, prior_weight=0.0)
    q, _ = router.predict(np.array([1, 0.02, 0, 0]))
    assert q[0, 1] == pytest.approx(1.0)
    assert q[0, 0] == pytest.approx(0.0, abs=1e-6)  # only the cluster-b failures were ever seen


def test_deterministic_and_reference_cost_from_the_best_arm():
    vecs, quality, cost = _clusters()
    r1 = KnnRouter(vecs, ["cheap", "dear"], quality, cost)
    r2 = KnnRouter(vecs, ["cheap", "dear"], quality, cost)
    probe = np.random.default_rng(1).standard_normal((10, 4))
    assert np.array_equal(r1.predict(probe)[0], r2.predict(probe)[0])
    assert r1.reference_cost == pytest.approx(10.0)


def test_refuses_an_empty_or_misshapen_log():
    with pytest.raises(ValueError):
        KnnRouter(np.zeros((0, 4)), ["a"], np.zeros((0, 1)), np.zeros((0, 1)))
    with pytest.raises(ValueError):
        KnnRouter(np.zeros((3, 4)), ["a", "b"], np.zeros((3, 1)), np.zeros((3, 1)))


def test_a_large_log_is_condensed_and_decides_in_under_a_millisecond():
    rng = np.random.default_rng(0)
    n, dim, arms = 8_000, 384, 11
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    label = rng.integers(0, 40, n)
    vecs = centers[label] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    skill = rng.random((40, arms))
    quality = (rng.random((n, arms)) < skill[label]).astype(float)
    cost = np.tile(np.geomspace(1e-4, 1e-2, arms), (n, 1))
    full = KnnRouter(vecs[:3000], [str(i) for i in range(arms)], quality[:3000], cost[:3000])
    condensed = KnnRouter(vecs, [str(i) for i in range(arms)], quality, cost, max_points=1024)
    assert len(condensed) <= 1024
    probe = centers[:5] + 0.3 * rng.standard_normal((5, dim)).astype(np.float32)
    # Same neighbourhoods, so nearly the same estimates (the full one saw fewer rows).
    assert np.abs(full.predict(probe)[0] - condensed.predict(probe)[0]).max() < 0.2
    for v in probe:
        condensed.choose(v, cost_weight=0.1)
    times = []
    for v in np.repeat(probe, 40, axis=0):
        t = time.perf_counter()
        condensed.choose(v, cost_weight=0.1)
        times.append(time.perf_counter() - t)
    # A low percentile: other processes on a busy CI machine preempt some calls, not the work itself.
    assert np.percentile(times, 25) < 0.001
    assert np.percentile(times, 50) < 0.005


# ------------------------------------------------------------------------------------------------
# Plans: the cascade as a pure state machine


def _drive(plan: Plan, prompt: str, answers: dict[str, str]) -> tuple[list[str], str, str]:
    attempts: list[Attempt] = []
    while True:
        step = plan.next_step(prompt, attempts)
        if step.action == "serve":
            return [a.model for a in attempts], step.model, step.reason
        attempts.append(Attempt(step.model, answers[step.model]))


def test_single_plan_calls_once():
    assert _drive(Plan(("m",)), "hi", {"m": "hello"})[:2] == (["m"], "m")


def test_cascade_serves_the_cheap_answer_when_it_passes_the_gate():
    called, served, reason = _drive(Plan(("local",), "frontier"), "Capital of France? One word.",
                                    {"local": "Paris", "frontier": "Paris"})
    assert (called, served) == (["local"], "local") and "gate" in reason


def test_cascade_escalates_when_the_gate_fails():
    called, served, _ = _drive(Plan(("local",), "frontier"), "Write a Python function that adds two numbers.",
                               {"local": "Sure, adding is easy.", "frontier": "```python\ndef add(a, b):\n    return a + b\n```"})
    assert (called, served) == (["local", "frontier"], "frontier")
    step = Plan(("local",), "frontier").next_step("Return JSON.", [Attempt("local", "no")])
    assert step.action == "call" and step.model == "frontier" and "JSON" in step.reason


def test_cut_off_answers_escalate():
    plan = Plan(("local",), "frontier")
    step = plan.next_step("Explain TCP.", [Attempt("local", "TCP is a protocol.", finish_reason="length")])
    assert (step.action, step.model) == ("call", "frontier")


def test_consensus_serves_when_the_cheap_answers_agree_and_escalates_when_not():
    prompt = 'Which is heavier?\nA) a feather\nB) a brick\nPrint only a single choice from "A" or "B".'
    plan = Plan(("a", "b"), "big")
    assert _drive(plan, prompt, {"a": "B", "b": "B) a brick", "big": "B"})[:2] == (["a", "b"], "a")
    assert _drive(plan, prompt, {"a": "B", "b": "A", "big": "B"})[:2] == (["a", "b", "big"], "big")


def test_consensus_calls_its_cheap_models_together_and_any_gate_failure_escalates():
    prompt = 'Which is heavier?\nA) a feather\nB) a brick\nPrint only a single choice from "A" or "B".'
    plan = Plan(("a", "b", "c"), "big")
    first = plan.next_step(prompt, [])
    assert (first.action, first.model, first.calls) == ("call", "a", ("a", "b", "c"))
    # The gateway calls them in parallel, so each is paid for even when the first fails the gate.
    called, served, reason = _drive(plan, prompt, {"a": "I do", "b": "B", "c": "B", "big": "B"})
    assert (called, served) == (["a", "b", "c", "big"], "big")
    step = plan.next_step(prompt, [Attempt("a", "B"), Attempt("b", "I do"), Attempt("c", "B")])
    assert (step.model, step.reason) == ("big", "b failed the gate: constraint: one of A/B asked")


def test_plans_are_named_and_validated():
    assert Plan(("a",)).name == "a" and Plan(("a",)).kind == "single"
    assert Plan(("a",), "z").name == "a>z" and Plan(("a",), "z").kind == "cascade"
    assert Plan(("a", "b"), "z").name == "a+b>z" and Plan(("a", "b"), "z").kind == "consensus"
    for bad in [((), None), (("a", "b"), None), (("a",), "a"), (("a", "a"), "z")]:
        with pytest.raises(ValueError):
            Plan(*bad)


def test_candidate_plans_cascade_from_cheap_to_strong():
    q = {"tiny": 0.5, "small": 0.6, "mid": 0.7, "big": 0.9}
    c = {"tiny": 0.0001, "small": 0.0005, "mid": 0.004, "big": 0.01}
    plans = candidate_plans(list(q), q, c, escalation_targets=1, max_consensus=2)
    names = [p.name for p in plans]
    assert names[:4] == ["big", "mid", "small", "tiny"]
    assert "small>big" in names and "tiny>big" in names and "small+tiny>big" in names
    assert not any(n.endswith(">mid") for n in names)
    assert len(names) == len(set(names))


def test_routing_text_keeps_the_question_of_a_few_shot_prompt():
    question = ("Q: Which gas do green plants take in from the air to make their food in sunlight, and which "
                "gas do they give off in the process?\nA:")
    few_shot = ("Q: What is 2+2?\nA: 4\n\n" * 30) + question
    assert routing_text(few_shot) == question
    assert routing_text("  short prompt  ") == "short prompt"
    assert len(routing_text("word " * 1000)) == 1000
    assert routing_text("") == ""


def test_routing_text_adds_context_before_a_short_question():
    code = "Here is my code:\n\n```python\ndef add(a, b):\n\n    return a - b\n```\n\nWhat's wrong?"
    assert routing_text(code) == code
    document = "Some report text. " * 500
    text = routing_text(document + "\n\nSummarize it.")
    # The question stays within what the embedder reads (its first 128 tokens, ~500 characters).
    assert text.endswith("Summarize it.") and len(text) <= 400
