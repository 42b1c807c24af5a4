"""Benchmark: the steps the gateway adds for `model: "auto"`: finding a request's task type (embed
the prompt + nearest seed examples, the loop's own classifier), looking up the rule in force, and the
whole rule path when no rule applies (rules + tier classifier + chain / cascade choice, what
`Proxy.choose_model` runs after the embedding).

    .venv/bin/python bench/route_decision.py [--prompts 400]

Prompts are real user prompts from ../shared/data/arena-hard (optional, outside the repository) when
present (else built-in ones).
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
    from tm_gateway.rules import Rule, RuleBook, route_request
    from tm_resources.config import EXAMPLE_CONFIG, load_config

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

    # The rule path of an `auto` request no rule covers: the rule book, then the tier classifier's
    # signals (the task type already known) and the chain or cascade it picks.
    from tm_gateway.rules import auto_route, tier_of
    from tm_resources.config import parse_config

    data = config.model_dump(mode="json")
    data["routing"] = {"tiers": {"chains": {"SIMPLE": ["llama3.2"], "MEDIUM": ["qwen2.5-coder", "llama3.2"],
                                            "COMPLEX": ["claude-sonnet-4-5"], "REASONING": ["claude-sonnet-4-5"]}},
                       "cascade": {"tiers": ["MEDIUM"]}}
    tiered = parse_config(data)
    typed = [(p, *classify(p)[1:]) for p in prompts]
    empty = RuleBook()
    paths, tiers_seen = [], {}
    for _ in range(5):
        for p, task_type, confidence in typed:
            t = time.perf_counter()
            route = route_request("auto", task_type, "u1", empty, tiered)
            route = auto_route(route, tier=tier_of(p, task_type, confidence, tiered), task_type=task_type,
                               learned=None, config=tiered)
            paths.append(time.perf_counter() - t)
            tiers_seen[route.route] = tiers_seen.get(route.route, 0) + 1
    path_figures = percentiles(paths)

    figures = {
        "auto_rule_path": path_figures,
        "auto_routes": tiers_seen,
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
    print(f"auto rule path (rules + tier signals + chain/cascade), per request: p50 {path_figures['p50_ms']:.3f} ms, "
          f"p99 {path_figures['p99_ms']:.3f} ms  (target p99 < 1 ms)")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
