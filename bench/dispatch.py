"""Benchmark: what agent dispatch adds to a request addressed to the dispatcher, beyond the one
embedding of the prompt (which `auto` requests pay anyway), and the embedding itself.

    .venv/bin/python bench/dispatch.py [--runs 500]

Uses the agents of the shipped tm.yaml (it-admin, marketing, secretary, sales). Accuracy is measured
in tests/test_dispatch.py on prompts that are not intents.
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

PROMPTS = {
    "short": "find a free slot in my calendar for a one-hour call with Mark",
    "medium": ("Our sales team needs a quote for 120 seats of the enterprise plan for Acme, with the annual "
               "discount and a three-month pilot; draft the email to their procurement lead too."),
    "long": "Please review this contract before the renewal call with the customer.\n" + "lorem ipsum dolor " * 2000,
}


def pct(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()

    from tm_gateway.dispatch import Dispatcher
    from tm_resources.config import EXAMPLE_CONFIG, load_config
    from tm_resources.embedder import get_embedder

    config = load_config(EXAMPLE_CONFIG)
    embedder = get_embedder()
    t0 = time.perf_counter()
    dispatcher = Dispatcher.from_config(config, embedder.embed)
    build_s = time.perf_counter() - t0
    out: dict = {"build_s": round(build_s, 3), "agents": sorted(config.agents)}
    for name, prompt in PROMPTS.items():
        vec = embedder.embed_one(prompt)
        decide, embed = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            decision = dispatcher.classify(prompt, vec)
            decide.append(time.perf_counter() - t)
        for _ in range(max(20, args.runs // 10)):
            t = time.perf_counter()
            embedder.embed_one(prompt)
            embed.append(time.perf_counter() - t)
        out[name] = {"decision": pct(decide), "embedding": pct(embed), "agent": decision.agent,
                     "confidence": round(decision.confidence, 3)}
        print(f"{name:6s} decision beyond the embedding p50 {out[name]['decision']['p50_ms']:.3f} ms "
              f"p99 {out[name]['decision']['p99_ms']:.3f} ms; embedding p50 {out[name]['embedding']['p50_ms']:.1f} ms "
              f"-> {decision.agent} ({decision.confidence:.2f})")
    out["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
