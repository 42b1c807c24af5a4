"""Benchmark: how long the loop's graph takes for one hour of logged requests (judge off), and where
the time goes. Real prompts and answers from ../shared/data/routerbench (the public RouterBench set,
outside the repository; 11 models' answers), spread
over one hour for 20 users, written through the gateway's own request-log writer into a fresh
embedded Postgres; then the whole graph is materialized in process, as `tm loop run` does.

    .venv/bin/python bench/loop_hour.py [--requests 10000] [--gateway-vectors 0.0]

--gateway-vectors: the share of requests whose prompt vector the gateway already computed (its
`model: "auto"` requests); the loop embeds the rest.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "routerbench"

# RouterBench's models, as this bench's configuration names them (tier decides local vs frontier).
MODELS = {
    "gpt-4-1106-preview": ("frontier-large", "included"),
    "gpt-3.5-turbo-1106": ("frontier-small", "included"),
    "claude-v2": ("claude-v2", "included"),
    "claude-instant-v1": ("claude-instant", "included"),
    "meta/llama-2-70b-chat": ("llama-70b", "local"),
    "mistralai/mixtral-8x7b-chat": ("mixtral", "local"),
    "mistralai/mistral-7b-chat": ("mistral-7b", "local"),
    "meta/code-llama-instruct-34b-chat": ("code-llama", "local"),
}


def load_pairs() -> list[dict]:
    pairs = []
    for path in sorted(DATA.glob("*_train.csv")):
        df = pd.read_csv(path)
        for _, row in df.iterrows():
            try:
                prompt = ast.literal_eval(row["prompt"])
                prompt = prompt[0] if isinstance(prompt, list) else str(prompt)
            except (ValueError, SyntaxError):
                prompt = str(row["prompt"])
            for model, (name, tier) in MODELS.items():
                answer = row.get(f"{model}|model_response")
                if not isinstance(answer, str) or not answer.strip():
                    continue
                cost = float(row.get(f"{model}|total_cost") or 0.0)
                pairs.append({"prompt": prompt, "answer": answer, "model": name, "tier": tier,
                              "cost": 0.0 if tier == "local" else cost})
    return pairs


def gateway_vectors(embedder, prompts: list[str]):
    """The vectors the gateway would have stored; cached on disk, since computing them is not the loop's cost."""
    import hashlib

    import numpy as np

    if not prompts:
        return []
    key = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    path = ROOT / ".tm" / "bench-cache" / f"prompt-vectors-{key}.npy"
    if path.exists():
        return np.load(path)
    vecs = embedder.embed(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def config_yaml() -> str:
    models = "\n".join(
        f"  {name}:\n    provider: {'local' if tier == 'local' else 'anthropic'}\n    tier: {tier}\n"
        f"    price: {{input: {0 if tier == 'local' else 3.0}, output: {0 if tier == 'local' else 15.0}}}"
        for name, tier in MODELS.values())
    return ("providers:\n  anthropic: {kind: anthropic, base_url: 'http://127.0.0.1:9'}\n"
            "  local: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
            f"models:\n{models}\ndefaults: {{model: mistral-7b, frontier_model: frontier-large}}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--gateway-vectors", type=float, default=0.0)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if not DATA.exists():
        print(f"needs {DATA} (the RouterBench data set, not in the repository)", file=sys.stderr)
        return 2

    home = Path(tempfile.mkdtemp(prefix="tm-bench-loop-"))
    os.environ["TM_HOME"] = str(home)
    os.environ.pop("TM_DATABASE_URL", None)
    (home / "tm.yaml").write_text(config_yaml())

    import dagster as dg

    from tm_assets.assets import loop_assets, requests_source
    from tm_assets.checks import loop_checks
    from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig, model_resources
    from tm_gateway.ids import uuid7
    from tm_gateway.requestlog import RequestLog
    from tm_resources import cache, db
    from tm_resources.embedder import get_embedder

    rng = random.Random(args.seed)
    pairs = load_pairs()
    url = db.ensure_database(db.start_embedded(home), "bench")
    db.migrate(url)
    hour = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)

    t0 = time.perf_counter()
    embedder = get_embedder()
    load_s = time.perf_counter() - t0
    chosen = [rng.choice(pairs) for _ in range(args.requests)]
    with_vec = set(rng.sample(range(args.requests), int(args.gateway_vectors * args.requests)))
    vec_of = dict(zip(sorted(with_vec), gateway_vectors(embedder, [chosen[i]["prompt"] for i in sorted(with_vec)]),
                      strict=True))

    log = RequestLog(url, spool_dir=home / "spool").start()
    offsets = sorted(rng.uniform(0, 3599) for _ in range(args.requests))
    for i, (p, off) in enumerate(zip(chosen, offsets, strict=True)):
        # The cache keys the gateway stores, so the cache_entries asset has its real work to do.
        k = cache.keys({"model": "auto", "messages": [{"role": "user", "content": p["prompt"]}]})
        log.write({
            "id": uuid7(), "ts": hour + timedelta(seconds=off), "user_id": f"user{rng.randrange(args.users)}",
            "api_key_id": "k_bench", "api_format": "openai", "endpoint": "/v1/chat/completions",
            "session_id": None, "requested_model": "auto", "model": p["model"], "provider": "bench",
            "upstream_model": p["model"], "stream": False, "prompt": p["prompt"],
            "messages": json.dumps([{"role": "user", "content": p["prompt"]}]), "params": "{}",
            "response_text": p["answer"], "finish_reason": "stop", "input_tokens": len(p["prompt"].split()) * 4 // 3,
            "output_tokens": len(p["answer"].split()) * 4 // 3, "cost_usd": p["cost"],
            "baseline_cost_usd": None, "latency_ms": 500.0, "status": 200, "route": "default",
            "prompt_embedding": vec_of.get(i), "request_hash": k.request_hash, "context_hash": k.context_hash,
        })
    assert log.flush(120)
    log.close()
    print(f"logged {args.requests} requests for {hour:%Y-%m-%d %H:00} "
          f"({len(with_vec)} with a gateway vector); embedder loaded in {load_s:.1f} s", flush=True)

    t0 = time.perf_counter()
    result = dg.materialize(
        [requests_source, *loop_assets, *loop_checks],
        resources={"postgres": PostgresResource(url=url),
                   "tm_config": TokenMachineConfig(path=str(home / "tm.yaml")),
                   "posthog": PostHogResource(api_key=None), **model_resources()},
        partition_key=hour.strftime("%Y-%m-%d-%H:%M"),
    )
    total = time.perf_counter() - t0
    steps = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            steps[event.step_key] = round(event.event_specific_data.duration_ms / 1000, 2)
    scored_meta = result.asset_materializations_for_node("scored_requests")[0].metadata
    inner = scored_meta["timings_s"].value
    rows = {name: result.asset_materializations_for_node(name)[0].metadata["dagster/row_count"].value
            for name in ("scored_requests", "task_types", "patterns", "grades", "routing_rules", "finetune_jobs")}
    figures = {
        "requests": args.requests,
        "gateway_vectors": len(with_vec),
        "graph_wall_s": round(total, 1),
        "steps_s": steps,
        "scored_requests_inner_s": inner,
        "rows": rows,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    print(f"graph: {total:.1f} s wall for {args.requests} requests (target < 60 s)")
    for k, v in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<45} {v:6.2f} s")
    print(f"  inside scored_requests: {inner}")
    print(json.dumps(figures, indent=2, default=str))
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
