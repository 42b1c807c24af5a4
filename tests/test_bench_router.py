"""`tm bench router`: the learned router judged on RouterBench-format data from the command line, as a
user runs it: JSON figures on stdout (and in --output), one clear line and exit 2 for input it cannot
use. The data is a small synthetic folder written here: a cheap model right on arithmetic only, a
cheap model right on code only, and a dear model right on everything, so a router that learns which
kind of prompt is which can match the dear model's accuracy for a fraction of its cost."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MATH, CODE, BIG = "acme/math-7b", "acme/code-7b", "acme/frontier"
PRICE = {MATH: 0.0002, CODE: 0.0003, BIG: 0.01}
RIGHT = {"math": {MATH: 1, CODE: 0, BIG: 1}, "code": {MATH: 0, CODE: 1, BIG: 1}}

NUMBERS = [(17, 25), (3, 9), (41, 8), (12, 30), (7, 7), (66, 11), (23, 19), (5, 48), (90, 4), (14, 27),
           (38, 2), (51, 16), (8, 73), (29, 29), (60, 15), (2, 99), (44, 36), (31, 6), (72, 13), (9, 64),
           (18, 18), (55, 3)]
TASKS = ["reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
         "removes duplicates from a list while keeping the order", "counts the vowels in a string",
         "merges two sorted lists", "flattens a nested list", "finds the longest word in a sentence",
         "converts Celsius to Fahrenheit", "checks whether a string is a palindrome",
         "computes the factorial of n", "sorts a dictionary by its values", "returns the second largest number",
         "counts the words in a text", "capitalizes the first letter of every word", "rotates a list by k places",
         "checks whether two strings are anagrams", "returns the sum of the digits of an integer",
         "finds the common elements of two lists", "converts a binary string to an integer",
         "returns the indices of the two numbers that add up to a target", "validates an email address with a regex"]


def _math_prompt(i: int) -> tuple[str, str]:
    a, b = NUMBERS[i]
    templates = [(f"What is {a} times {b}? Answer with the number only.", str(a * b)),
                 (f"Compute {a} + {b} * 3 and give the result.", str(a + b * 3)),
                 (f"Solve for x: {a}x + {b} = {a * 5 + b}. What is x?", "x = 5")]
    return templates[i % 3]


def _rows(math: range, code: range) -> list[dict]:
    rows = []
    for kind, indices in (("math", math), ("code", code)):
        for i in indices:
            if kind == "math":
                prompt, answer = _math_prompt(i)
                answers = {MATH: answer, CODE: "The answer is 42.", BIG: answer}
            else:
                task = TASKS[i]
                prompt = f"Write a Python function that {task}."
                code = f"```python\ndef solve(x):\n    # {task}\n    return x\n```"
                answers = {MATH: "I'm sorry, but I can't help with writing code.", CODE: code, BIG: code}
            row = {"sample_id": f"{kind}.{i}", "prompt": repr([prompt]), "eval_name": kind}
            for m, price in PRICE.items():
                row[m] = RIGHT[kind][m]
                row[f"{m}|model_response"] = repr([answers[m]])
                row[f"{m}|total_cost"] = round(price * (1 + 0.05 * (i % 7)), 8)
            row["oracle_model_to_route_to"] = min((m for m in PRICE if RIGHT[kind][m]), key=PRICE.get)
            rows.append(row)
    return rows


def _write(folder: Path, rows: list[dict], name: str = "synthetic_train.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with (folder / name).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("routerbench")
    train_rows = _rows(range(0, 16), range(0, 16))
    # A row with a blank outcome, as the real files have: left out, and counted.
    blank = dict(train_rows[0], sample_id="blank.0", **{CODE: ""})
    train = _write(root / "train", train_rows + [blank])
    test = _write(root / "test", _rows(range(16, 22), range(16, 22)), "synthetic_test.csv")
    return train, test


def tm(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The real command line, as `tm` runs it, in its own process with its own TM_HOME."""
    env = {**os.environ, "TM_HOME": str(home)}
    env.pop("TM_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "tm_gateway.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _check_figures(out: dict) -> None:
    """The relationships every benchmark must show, whatever the data."""
    single = out["single"]
    assert set(single) == set(PRICE)
    accs = [s["accuracy"] for s in single.values()]
    router, random_router, oracle = out["router"], out["random"], out["oracle"]
    assert oracle["accuracy"] >= max(accs)
    assert oracle["accuracy"] >= router["accuracy"]
    assert min(accs) - 1e-4 <= random_router["accuracy"] <= max(accs) + 1e-4
    for block in (router, random_router, oracle, *single.values()):
        assert 0 <= block["accuracy"] <= 1
        assert block["cost_per_query"] > 0
    # The perfect router pays for the cheapest right answer: never more than the dear model.
    assert oracle["cost_per_query"] < single[BIG]["cost_per_query"]
    assert out["reference_model"] == BIG


def test_bench_router_learns_which_model_answers_which_kind(bench_dirs, tmp_path):
    train, _ = bench_dirs
    output = tmp_path / "figures.json"
    # A dozen prompts per kind: a narrow neighbourhood and no pull towards the log-wide means (the
    # defaults are tuned for logs of thousands of rows).
    run = tm("bench", "router", "--data", str(train), "--train-share", "0.6", "--seed", "3", "--k", "5",
             "--temperature", "0.1", "--prior-weight", "0", "--output", str(output), home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert json.loads(output.read_text()) == out

    assert out["data"]["rows"] == 32 and out["data"]["dropped_incomplete"] == 1
    assert out["data"]["models"] == [MATH, CODE, BIG]
    assert out["split"] == {"seed": 3, "train_rows": 19, "test_rows": 13}
    assert out["settings"]["k"] == 5 and out["settings"]["cascades"] is True
    _check_figures(out)
    single, router = out["single"], out["router"]
    assert single[BIG]["accuracy"] == 1.0
    assert router["accuracy"] > out["random"]["accuracy"]
    # Arithmetic goes to the math model, code to the code model: the dear model's accuracy for a
    # fraction of its cost.
    assert router["accuracy"] == 1.0
    assert router["cost_per_query"] < single[BIG]["cost_per_query"] / 4
    assert set(router["choices"]) >= {MATH, CODE}
    assert out["target"]["router_met"] is True
    cascade = out["router_cascade"]
    assert cascade["cost_per_query"] > 0 and cascade["candidate_plans"] > len(PRICE)
    # The prompt vectors are cached under TM_HOME.
    assert list((tmp_path / "home" / "bench-cache").glob("router-vectors-*.npy"))


def test_bench_router_with_a_test_folder_and_the_default_settings(bench_dirs, tmp_path):
    train, test = bench_dirs
    cache = tmp_path / "vectors"
    run = tm("bench", "router", "--data", str(train), "--test", str(test), "--no-cascades",
             "--cache-dir", str(cache), "--text", "prompt", home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["data"]["rows"] == 32 and out["test"]["rows"] == 12
    assert "router_cascade" not in out and out["settings"]["cascades"] is False
    assert "the gateway's vector" in out["settings"]["text"]
    _check_figures(out)
    # On a tiny log the cautious defaults stay with the model that is right everywhere: still well
    # above a random pick.
    assert out["router"]["accuracy"] > out["random"]["accuracy"]
    assert out["single"][MATH]["accuracy"] == out["single"][CODE]["accuracy"] == 0.5
    assert out["oracle"]["accuracy"] == 1.0
    assert list(cache.glob("router-vectors-*.npy"))


def _bad_folder(root: Path, case: str, train: Path) -> list[str]:
    """Arguments of `tm bench router` for one kind of bad input."""
    rows = _rows(range(0, 4), range(0, 4))
    if case == "missing":
        return ["--data", str(root / "nothing-here")]
    if case == "no-csv":
        (root / "empty").mkdir()
        (root / "empty" / "notes.txt").write_text("not a CSV\n")
        return ["--data", str(root / "empty")]
    if case == "no-correctness-column":
        return ["--data", str(_write(root / "bad", [{k: v for k, v in r.items() if k != CODE} for r in rows]))]
    if case == "no-prompt-column":
        return ["--data", str(_write(root / "bad", [{k: v for k, v in r.items() if k != "prompt"} for r in rows]))]
    if case == "not-numeric":
        return ["--data", str(_write(root / "bad", [dict(r, **{f"{BIG}|total_cost": "free"}) for r in rows]))]
    if case == "other-models":
        renamed = [{k.replace(BIG, "acme/other"): v for k, v in r.items()} for r in rows]
        return ["--data", str(train), "--test", str(_write(root / "other", renamed))]
    if case == "bad-share":
        return ["--data", str(train), "--train-share", "1.5"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("missing", "nothing-here: no such folder"),
    ("no-csv", "no CSV files"),
    ("no-correctness-column", f"column '{CODE}' is missing"),
    ("no-prompt-column", "no 'prompt' column"),
    ("not-numeric", f"column '{BIG}|total_cost' must be numeric"),
    ("other-models", "has other models than"),
    ("bad-share", "train_share must be between 0 and 1"),
])
def test_bad_input_is_refused_with_one_clear_line(bench_dirs, tmp_path, case, message):
    run = tm("bench", "router", *_bad_folder(tmp_path, case, bench_dirs[0]), home=tmp_path / "home")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tm: ") and "Traceback" not in run.stderr, run.stderr
    assert message in lines[0]
    if case == "other-models":
        assert "only in the test data: acme/other" in lines[0] and f"missing from the test data: {BIG}" in lines[0]
