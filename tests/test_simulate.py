"""The simulated agency (bench/simulate.py) on a small RouterBench-format folder written here: real
gateway, real loop, two simulated hours. A local model that writes good code and answers extraction
requests off the point; the frontier right on both, and dear on code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.simulate import poor_prompt, simulate, usage_for
from tests.traffic import CODING_TASKS, OFF_TOPIC, good_answer

pytestmark = pytest.mark.slow  # about 27 s: two simulated hours through the real gateway and loop

LOCAL, FRONTIER = "open/small-local", "big/frontier"
TOPICS = ["the quarterly sales meeting", "our new vacation policy", "the server outage", "the spring campaign",
          "the billing complaint", "the office move", "the hiring plan", "the security audit"]


def write_routerbench(folder: Path) -> None:
    """Prompts, each model's answer, its 0/1 correctness and its cost, as RouterBench stores them."""
    folder.mkdir()
    rows = []
    for task in CODING_TASKS:
        for phrasing in ("Write a Python function that {}.", "I need a Python function that {}."):
            prompt = phrasing.format(task)
            answer = good_answer(f"Write a Python function that {task}.")
            rows.append({"prompt": str([prompt]), "eval_name": "coding", LOCAL: 1, FRONTIER: 1,
                         f"{LOCAL}|model_response": answer, f"{FRONTIER}|model_response": answer + "\n",
                         f"{LOCAL}|total_cost": 0.0002, f"{FRONTIER}|total_cost": 0.012})
    for i in range(80):
        topic, day, amount = TOPICS[i % len(TOPICS)], 1 + i % 28, 13 * (i + 3)
        prompt = f"Extract the date and the amount from this line: paid {amount} dollars on 2026-03-{day:02d} for {topic}."
        rows.append({"prompt": str([prompt]), "eval_name": "extraction", LOCAL: 0, FRONTIER: 1,
                     f"{LOCAL}|model_response": OFF_TOPIC,
                     f"{FRONTIER}|model_response": f"Date: 2026-03-{day:02d}. Amount: {amount} dollars.",
                     f"{LOCAL}|total_cost": 0.0001, f"{FRONTIER}|total_cost": 0.001})
    with (folder / "sample_train.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_usage_reproduces_the_recorded_cost():
    price = {"input": 10.0, "output": 30.0}
    for cost, answer in ((0.00504, "D"), (0.0123, "x" * 4000), (0.0001, "a long answer " * 50)):
        n_in, n_out = usage_for(cost, answer, price)
        assert abs(n_in * 10.0 / 1e6 + n_out * 30.0 / 1e6 - cost) <= 10.0 / 1e6  # one input token at most


def test_the_poor_prompters_version_of_a_prompt_scores_lower():
    from tm_resources.quality import prompt_quality

    prompt = ("You are an expert Python programmer, and here is your task: Write a function to find the "
              "shared elements from the given two lists.\n\nYour code should pass these tests: assert f([1], [1]) == [1]")
    assert prompt_quality(poor_prompt(prompt)) < 0.4 < prompt_quality(prompt)


def test_a_small_simulation_cuts_spend_escalates_the_bad_type_and_keeps_accuracy(db_url, tmp_path: Path):
    data = tmp_path / "routerbench"
    write_routerbench(data)
    report = simulate(data, hours=2, users=4, requests_per_hour=110, judge_noise=0.0, followup=1.0, seed=3,
                      local=[LOCAL], frontier=FRONTIER, spike_hour=None, router_reference=False, final_loop=False,
                      home=tmp_path / "home", database_url=db_url, progress=lambda *a: None)
    first, second = report["hours"]
    assert first["requests"] >= 80 and second["requests"] >= 80
    # Before any rule the tiers send complex coding prompts to the frontier; the first loop run keeps
    # coding local (it is served well there) and sends extraction (served badly) to the frontier.
    assert second["cost_vs_frontier"] < first["cost_vs_frontier"]
    assert "extraction" in report["escalation"], json.dumps(report["hours"], default=str)[:3000]
    assert report["escalation"]["extraction"]["loop_runs_needed"] == 1
    assert second["rules_in_force"].get("escalate", 0) >= 1 and second["escalated_by_rule"] > 0
    assert second["accuracy_vs_frontier"] >= 0.97
    assert first["accuracy"] < second["accuracy"]
    assert report["every_request_has_its_row"]["ok"], report["every_request_has_its_row"]
