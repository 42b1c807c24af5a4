"""Benchmark: the one definition of "does this prompt ask for code?" (tm_resources/code_ask.py: the gate's
`asks_for_code`, and `involves_code` = asks or shows code, the brevity budget's) against the pattern
the loop's brevity budget used before, on labelled real prompts.

    .venv/bin/python bench/code_ask.py [--arena FILE] [--routerbench DIR]

arena-hard's prompts carry a subcategory ("coding" or not); RouterBench's MBPP prompts all ask for a
function and its ARC-Challenge / Winogrande prompts never ask for code. Prints, per set, the share of
prompts each definition flags, and how the brevity budget (`quality.expected_output_tokens`) moves
(budget_lowered / raised: prompts whose +110 code tokens were dropped / added).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from tm_gateway.routerbench import load_routerbench  # noqa: E402
from tm_resources.code_ask import asks_for_code, involves_code  # noqa: E402
from tm_resources.quality import expected_output_tokens  # noqa: E402

# What tm_resources/quality.py matched before (the reference, kept here only to compare).
BEFORE = re.compile(
    r"```|\b(function|script|class|method|implement|code|program|sql|query|regex|python|javascript|"
    r"typescript|java|rust|golang|c\+\+|bash|api|unit tests?|refactor)\b", re.I)


def shares(prompts: list[str]) -> dict:
    before = np.array([bool(BEFORE.search(p)) for p in prompts])
    asks = np.array([asks_for_code(p) for p in prompts])
    now = np.array([involves_code(p) for p in prompts])
    budget = np.array([expected_output_tokens(p) for p in prompts])
    return {"prompts": len(prompts), "flagged_before": round(float(before.mean()), 3),
            "asks_for_code": round(float(asks.mean()), 3), "involves_code": round(float(now.mean()), 3),
            "median_budget_tokens": round(float(np.median(budget)), 1),
            "budget_lowered": round(float((before & ~now).mean()), 3),
            "budget_raised": round(float((now & ~before).mean()), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arena", default=str(SHARED / "arena-hard" / "question-v2.jsonl"))
    ap.add_argument("--routerbench", default=str(SHARED / "routerbench"))
    args = ap.parse_args()
    out: dict = {}
    rows = [json.loads(line) for line in Path(args.arena).read_text().split("\n") if line.strip()]
    coding = [r["prompt"] for r in rows if r.get("subcategory") == "coding"]
    other = [r["prompt"] for r in rows if r.get("subcategory") != "coding"]
    out["arena_hard_coding"], out["arena_hard_other"] = shares(coding), shares(other)
    data = load_routerbench(args.routerbench)
    for name in sorted(set(data.eval_names)):
        texts = [p for p, e in zip(data.prompts, data.eval_names, strict=True) if e == name]
        out[f"routerbench_{name}"] = shares(texts)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
