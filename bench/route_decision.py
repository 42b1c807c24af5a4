"""Benchmark: the two steps the gateway adds for `model: "auto"`: finding a request's task type
(embed the prompt + nearest seed examples, the loop's own classifier) and looking up the rule in force.

    .venv/bin/python bench/route_decision.py [--prompts 400]

Prompts are real user prompts from ../shared/data/arena-hard when present (else built-in ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARENA = ROOT.parent / "shared" / "data" / "arena-hard" / "question-v2.jsonl"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--lookups", type=int, default=200_000)
    args = ap.parse_args()

    from tm_gateway.app import prompt_classifier
    from tm_resources.config import EXAMPLE_CONFIG, load_config
    from tm_resources.rules import Rule, RuleBook, route_request

    config = load_config(EXAMPLE_CONFIG)
    if ARENA.exists():
        prompts = [json.loads(line)["prompt"] for line in ARENA.read_text().split("\n") if line.strip()][: args.prompts]
    else:
        prompts = ["Write a Python function that reverses a list.", "What is 17 choose 4?"] * (args.prompts // 2)

    t0 = time.perf_counter()
    classify = prompt_classifier(config)
    load_s = time.perf_counter() - t0
    for p in prompts[:20]:
        classify(p)  # warm-up
    times = []
    for p in prompts:
        t = time.perf_counter()
        classify(p)
        times.append(time.perf_counter() - t)
    classify_figures = percentiles(times)

    # A rule book the size a busy team would have: rules for every type, throttles for 50 users.
    types = ["coding", "math", "writing", "summarization", "extraction", "chat", "reasoning"]
    rules = [Rule(f"escalate:{t}", "escalate", t, None, None, "claude-sonnet-4-5", "r") for t in types[:3]]
    rules += [Rule(f"lock_local:{t}", "lock_local", t, None, None, "llama3.2", "r") for t in types[3:]]
    rules += [Rule(f"throttle:u{i}", "throttle", None, f"u{i}", None, None, "r") for i in range(50)]
    book = RuleBook.from_rules(rules)
    users = [f"u{i}" for i in range(100)]
    lookups = []
    for i in range(args.lookups):
        t = time.perf_counter()
        route_request("auto", types[i % 7], users[i % 100], book, config)
        lookups.append(time.perf_counter() - t)
    rule_figures = percentiles(lookups)

    figures = {
        "classify_embed_plus_knn": classify_figures,
        "classifier_load_s": round(load_s, 2),
        "rule_lookup": rule_figures,
        "prompts": len(prompts),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    print(f"task type (embed + k-NN), per prompt: p50 {classify_figures['p50_ms']:.2f} ms, "
          f"p99 {classify_figures['p99_ms']:.2f} ms  (target p50 < 5 ms)")
    print(f"rule lookup, per request: p50 {rule_figures['p50_ms'] * 1000:.1f} µs, "
          f"p99 {rule_figures['p99_ms'] * 1000:.1f} µs  (target p99 < 100 µs)")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
