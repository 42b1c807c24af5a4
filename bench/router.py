"""Benchmark: the learned router on RouterBench, as `tm bench router` runs it, over several splits.

    .venv/bin/python bench/router.py [--data DIR] [--test DIR] [--repeats 10] [--seed 100]
                                     [--sweep] [--compare-lr] [--latency]

Data: the public RouterBench set, not in the repository; --data points at your copy (default
../shared/data/routerbench, read in place). Without --test, each repeat routes a fresh
random 30 % of the rows with the other 70 % as the log (seeds --seed, --seed+1, ...; the settings
were tuned on seeds 0-9, so the default seeds 100+ are splits the tuning never saw). Prints the
figures of `run_router_bench` (router, router + cascades, every single model, a random router and
the perfect router; each as accuracy and cost per query, and relative to the best single model)
and their mean and standard deviation over the splits.

--sweep       the accuracy / cost curve over the cost weight, for the router and with cascades
--compare-lr  the same curve for a per-model logistic regression on the same vectors (scikit-learn)
--latency     decision time of `KnnRouter.choose` for one prompt vector (models, and plans), p50 / p99
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
DATA = ROOT.parent / "shared" / "data" / "routerbench"

from tm_gateway import routerbench as rb  # noqa: E402
from tm_gateway.router import KnnRouter, candidate_plans, plan_outcomes, routing_text  # noqa: E402

COST_WEIGHTS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2]


def splits(n: int, seeds: range, train_share: float) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for s in seeds:
        order = np.random.default_rng(s).permutation(n)
        cut = int(round(train_share * n))
        out.append((np.sort(order[:cut]), np.sort(order[cut:])))
    return out


def curve(pred: list[tuple[np.ndarray, np.ndarray, float]], arms_q: np.ndarray, arms_c: np.ndarray,
          parts: list[tuple[np.ndarray, np.ndarray]], ref_col: int, ref_q: np.ndarray, ref_c: np.ndarray) -> list[dict]:
    """Mean accuracy and cost (relative to the reference model) per cost weight, over the splits."""
    rows = []
    for lam in COST_WEIGHTS:
        acc, cost = [], []
        for (q, c, ref_cost), (_, te) in zip(pred, parts, strict=True):
            pick = np.argmax(np.nan_to_num(q, nan=-np.inf) - lam * c / ref_cost, axis=1)
            r = np.arange(len(te))
            acc.append(arms_q[te][r, pick].mean() / ref_q[te, ref_col].mean())
            cost.append(arms_c[te][r, pick].mean() / ref_c[te, ref_col].mean())
        rows.append({"cost_weight": lam, "accuracy_vs_reference": round(float(np.mean(acc)), 4),
                     "accuracy_sd": round(float(np.std(acc, ddof=1)), 4) if len(acc) > 1 else 0.0,
                     "cost_vs_reference": round(float(np.mean(cost)), 4)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--test", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--train-share", type=float, default=0.7)
    ap.add_argument("--k", type=int, default=rb.DEFAULT_K)
    ap.add_argument("--temperature", type=float, default=rb.DEFAULT_TEMPERATURE)
    ap.add_argument("--prior-weight", type=float, default=rb.DEFAULT_PRIOR_WEIGHT)
    ap.add_argument("--cost-weight", type=float, default=rb.DEFAULT_COST_WEIGHT)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compare-lr", action="store_true")
    ap.add_argument("--latency", action="store_true")
    args = ap.parse_args()

    knn = dict(k=args.k, temperature=args.temperature, prior_weight=args.prior_weight)
    t0 = time.perf_counter()
    out = rb.run_router_bench(args.data, args.test, train_share=args.train_share, seed=args.seed,
                              repeats=1 if args.test else args.repeats, cost_weight=args.cost_weight, **knn)
    figures: dict = {"bench": out}

    if args.sweep or args.compare_lr or args.latency:
        data = rb.load_routerbench(args.data)
        vecs = rb.cached_vectors([routing_text(p) for p in data.prompts])
        mean_q = dict(zip(data.models, data.quality.mean(axis=0), strict=True))
        mean_c = dict(zip(data.models, data.cost.mean(axis=0), strict=True))
        ref = max(data.models, key=lambda m: (mean_q[m], -mean_c[m]))
        ref_col = data.models.index(ref)
        # One plan set from the whole log's figures (which models are cheap, which strong): the
        # per-split sets of run_router_bench come out the same on this data.
        plans = candidate_plans(data.models, mean_q, mean_c)
        parts = splits(len(data), range(args.seed, args.seed + args.repeats), args.train_share)

    if args.sweep or args.compare_lr:
        pq, pc = plan_outcomes(plans, data.prompts, data.answers, data.quality, data.cost, data.models)
        sweep = {}
        for name, (aq, ac) in {"router": (data.quality, data.cost), "router_cascade": (pq, pc)}.items():
            pred = []
            for tr, te in parts:
                r = KnnRouter(vecs[tr], [str(i) for i in range(aq.shape[1])], aq[tr], ac[tr],
                              reference_cost=float(data.cost[tr, ref_col].mean()), **knn)
                q, c = r.predict(vecs[te])
                pred.append((q, c, r.reference_cost))
            sweep[name] = curve(pred, aq, ac, parts, ref_col, data.quality, data.cost)
        if args.compare_lr:
            from sklearn.linear_model import LogisticRegression

            for C in (0.1, 1.0, 10.0):
                pred = []
                for tr, te in parts:
                    q = np.zeros((len(te), len(data.models)))
                    for m in range(len(data.models)):
                        y = data.quality[tr, m]
                        if y.min() == y.max():
                            q[:, m] = y[0]
                            continue
                        lr = LogisticRegression(C=C, max_iter=2000).fit(vecs[tr], y)
                        q[:, m] = lr.predict_proba(vecs[te])[:, 1]
                    c = np.tile(data.cost[tr].mean(axis=0), (len(te), 1))
                    pred.append((q, c, float(data.cost[tr, ref_col].mean())))
                sweep[f"logistic_regression_C{C:g}"] = curve(pred, data.quality, data.cost, parts, ref_col,
                                                             data.quality, data.cost)
        figures["sweep"] = {"reference_model": ref, "splits": len(parts), "knn": knn, "curves": sweep}

    if args.latency:
        lat = {}
        pq_all, pc_all = plan_outcomes(plans, data.prompts, data.answers, data.quality, data.cost, data.models)
        probe = vecs[np.random.default_rng(0).permutation(len(vecs))[:500]]
        for name, arms, aq, ac in (("models", data.models, data.quality, data.cost),
                                   ("plans", [p.name for p in plans], pq_all, pc_all)):
            r = KnnRouter(vecs, arms, aq, ac, **knn)
            for v in probe[:50]:
                r.choose(v, cost_weight=args.cost_weight)
            times = []
            for v in probe:
                t = time.perf_counter()
                r.choose(v, cost_weight=args.cost_weight)
                times.append(time.perf_counter() - t)
            ms = np.asarray(times) * 1000
            lat[name] = {"arms": len(arms), "log_points": len(r), "p50_ms": round(float(np.percentile(ms, 50)), 4),
                         "p99_ms": round(float(np.percentile(ms, 99)), 4)}
        figures["decision_latency"] = lat

    figures["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average": [round(x, 2) for x in os.getloadavg()]}
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["command"] = " ".join(sys.argv)

    head = out.get("mean") or out
    def fmt(block: dict, key: str) -> str:
        v = block[key]
        return f"{v['mean']:.4f} ± {v['sd']:.4f}" if isinstance(v, dict) else f"{v:.4f}"
    ref_name = head["reference_model"]
    print(f"reference (best single model): {ref_name}")
    for name in ("router", "router_cascade", "random", "oracle"):
        if name in head:
            b = head[name]
            print(f"{name:15s} accuracy vs reference {fmt(b, 'accuracy_vs_reference')}, "
                  f"cost vs reference {fmt(b, 'cost_vs_reference')}")
    if "target_met_share" in head:
        print(f"target (>= reference accuracy at <= half its cost) met in: {head['target_met_share']}")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
