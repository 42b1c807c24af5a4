"""Realistic test traffic: coding and math prompts, with answers that are good or plainly off, so the loop
has something true to learn. Written here by hand: the tests read no data from outside the repository."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tm_gateway.ids import uuid7

CODING_TASKS = [
    "reverses a linked list in place", "parses a CSV file and returns the rows as dictionaries",
    "checks whether a string is a palindrome", "merges two sorted lists into one sorted list",
    "computes the nth Fibonacci number with memoization", "removes duplicate entries from a list while keeping order",
    "reads a JSON config file and validates required keys", "implements binary search on a sorted array",
    "counts word frequencies in a text file", "flattens a nested list of arbitrary depth",
    "converts a Roman numeral to an integer", "validates an email address with a regular expression",
    "retries an HTTP request with exponential backoff", "finds the longest common prefix of a list of strings",
    "serializes a binary tree to a string and back", "rotates a matrix by 90 degrees",
    "groups a list of records by a key", "implements an LRU cache class",
    "splits a list into chunks of size n", "detects a cycle in a directed graph",
    "computes the moving average over a window", "sorts a list of dictionaries by two keys",
    "downloads several URLs concurrently with asyncio", "tokenizes an arithmetic expression",
    "implements a thread-safe counter", "finds all anagrams of a word in a list",
    "converts snake_case identifiers to camelCase", "paginates the results of a SQL query",
]
MATH_QUESTIONS = [
    "What is the derivative of x^3 * sin(x)?", "Solve for x: 3x + 7 = 22.",
    "What is the integral of 1/(1+x^2) from 0 to 1?", "How many ways can 5 people be seated in a row?",
    "What is the probability of rolling two sixes with two fair dice?", "Find the eigenvalues of [[2, 1], [1, 2]].",
    "Compute the sum of the first 100 positive integers.", "What is the limit of (1 + 1/n)^n as n goes to infinity?",
    "Solve the quadratic equation x^2 - 5x + 6 = 0.", "What is the greatest common divisor of 84 and 126?",
    "Find the area of a circle with radius 7.", "What is 17 choose 4?",
    "Differentiate ln(x^2 + 1) with respect to x.", "What is the sum of the geometric series 1 + 1/2 + 1/4 + ...?",
    "Prove that the square root of 2 is irrational.", "What is the determinant of [[1, 2], [3, 4]]?",
    "Find the slope of the line through (1, 2) and (4, 11).", "What is the expected value of a fair six-sided die?",
    "Integrate x * e^x dx.", "How many prime numbers are there below 50?",
]


def coding_prompt(i: int) -> str:
    return f"Write a Python function that {CODING_TASKS[i % len(CODING_TASKS)]}."


def math_prompt(i: int) -> str:
    return MATH_QUESTIONS[i % len(MATH_QUESTIONS)]


def good_answer(prompt: str) -> str:
    """An on-topic answer of a sensible length."""
    if prompt.startswith("Write a Python function"):
        what = prompt.removeprefix("Write a Python function that ").rstrip(".")
        return (f"Here is a Python function that {what}:\n\n```python\ndef solution(data):\n"
                f"    # {what}\n    result = []\n    for item in data:\n        result.append(item)\n"
                f"    return result\n```\n\nIt {what} and runs in linear time.")
    return f"To answer '{prompt}': work it through step by step, and the result follows from the definition."


OFF_TOPIC = "I enjoy long walks on the beach and my favourite colour is a soft shade of green."


def bad_answer(prompt: str) -> str:
    return OFF_TOPIC


def log_row(*, user: str, prompt: str, answer: str, model: str, provider: str, ts: datetime,
            session: str | None = None, cost: float = 0.0, baseline: float | None = 0.002,
            input_tokens: int = 40, output_tokens: int = 60, status: int = 200) -> dict:
    """A row as the gateway writes it."""
    return {
        "id": uuid7(), "ts": ts, "user_id": user, "api_key_id": "k_test", "api_format": "openai",
        "endpoint": "/v1/chat/completions", "session_id": session, "requested_model": "auto", "model": model,
        "provider": provider, "upstream_model": model, "stream": False, "prompt": prompt,
        "messages": json.dumps([{"role": "user", "content": prompt}]),
        "params": "{}", "response_text": answer if status == 200 else None, "finish_reason": "stop",
        "input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost,
        "baseline_cost_usd": baseline, "latency_ms": 120.0, "status": status, "route": "default",
    }


def an_hour_of_traffic(hour: datetime, *, coding: int = 25, math: int = 15) -> list[dict]:
    """Local model answers coding well and math badly (and math users complain); frontier answers math."""
    rows = []
    step = timedelta(seconds=3600 / (coding + math + 5))
    t = hour + timedelta(seconds=1)
    for i in range(coding):
        user = ("ann", "bob")[i % 2]
        p = coding_prompt(i)
        rows.append(log_row(user=user, prompt=p, answer=good_answer(p), model="local-test", provider="local", ts=t))
        t += step
    for i in range(math):
        user = ("ann", "bob")[i % 2]
        p = math_prompt(i)
        rows.append(log_row(user=user, prompt=p, answer=bad_answer(p), model="local-test", provider="local", ts=t,
                            session=f"s-math-{i}"))
        # The user tells it off straight away: the answer was not what they asked for.
        rows.append(log_row(user=user, prompt="No, that's wrong. " + p, answer=good_answer(p),
                            model="claude-test", provider="anthropic", ts=t + timedelta(seconds=20),
                            session=f"s-math-{i}", cost=0.002, output_tokens=80))
        t += step
    return rows


def past_hour(hours_ago: int = 2) -> datetime:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(hours=hours_ago)
