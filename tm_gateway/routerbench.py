"""Judge the learned router on RouterBench-format data: learn from part of the rows, route the rest.

A RouterBench CSV has one row per prompt: `prompt` (a stringified list of strings), per model a 0/1
correctness column named after the model, `<model>|model_response` and `<model>|total_cost`, and
`oracle_model_to_route_to`. Every CSV of a folder is read; rows missing any model's correctness or
cost are left out (and counted). The learning rows play the loop's log; the others are routed with
the same code the gateway runs (`router.KnnRouter`, `router.Plan.next_step` with the quick gate on
the stored answer of each model a cascade tries, every attempt paid for: a consensus's cheap models
all, as the gateway calls them in parallel; tm_gateway/stages/cascade.py).

Figures are per query: accuracy (share of prompts answered correctly) and cost (USD). Prompt
vectors come from the shared embedder, cached on disk under a hash of the texts.

Input that cannot be benchmarked raises `FileNotFoundError` (no such folder, no CSV in it) or
`RouterBenchError` (a `ValueError`: not RouterBench format, other models in the test folder,
settings out of range), each with a one-line message that names the file and the column.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tm_gateway.router import KnnRouter, Plan, candidate_plans, plan_outcomes, routing_text

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]

# Operating points measured by cross-validation on the training half (docs/benchmarks.md):
# the defaults of `run_router_bench` and the proposed `router.*` configuration.
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.3
DEFAULT_PRIOR_WEIGHT = 2.0
DEFAULT_COST_WEIGHT = 0.06


class RouterBenchError(ValueError):
    """The data or the settings cannot be benchmarked; the message says which file, column or setting."""


@dataclass(frozen=True)
class RouterBenchData:
    source: str
    prompts: list[str]
    eval_names: list[str]
    models: list[str]
    quality: np.ndarray           # (rows, models) 0/1
    cost: np.ndarray              # (rows, models) USD
    answers: list[dict[str, str]]
    dropped: int

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: np.ndarray) -> RouterBenchData:
        return RouterBenchData(self.source, [self.prompts[i] for i in rows], [self.eval_names[i] for i in rows],
                               self.models, self.quality[rows], self.cost[rows], [self.answers[i] for i in rows], 0)


def _decode(cell: object) -> str:
    """RouterBench stores texts as a stringified Python list; a plain string is taken as is."""
    if not isinstance(cell, str):
        return ""
    text = cell.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return cell
        if isinstance(value, (list, tuple)):
            return "\n\n".join(str(v) for v in value)
    return cell


COST_SUFFIX = "|total_cost"
RESPONSE_SUFFIX = "|model_response"


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RouterBenchError(f"{path}: not a readable CSV file ({detail})") from None


def _numeric(path: Path, frame, column: str) -> np.ndarray:
    """A column as floats (blank cells NaN); any other text in it is an error naming the cell."""
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise RouterBenchError(f"{path}: column '{column}' must be numeric, row {row + 1} has "
                               f"{str(frame[column].iloc[row])[:40]!r}")
    return values.to_numpy(dtype=np.float64)


def load_routerbench(data_dir: str | os.PathLike) -> RouterBenchData:
    """Every *.csv of `data_dir` (sorted by name; or the one CSV file `data_dir` names), models in the
    order of the first file."""
    import pandas as pd

    folder = Path(data_dir)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else [folder]
    if not files:
        raise FileNotFoundError(f"{folder}: no CSV files in it (RouterBench data is a folder of *.csv files)")
    frames = [_read_csv(f) for f in files]
    first = list(frames[0].columns)
    priced = [c[: -len(COST_SUFFIX)] for c in first if c.endswith(COST_SUFFIX)]
    if "prompt" not in first:
        raise RouterBenchError(f"{files[0]}: not RouterBench format: no 'prompt' column")
    if not priced:
        raise RouterBenchError(f"{files[0]}: not RouterBench format: no '<model>{COST_SUFFIX}' column "
                               f"(columns: {', '.join(map(str, first[:8]))}{', ...' if len(first) > 8 else ''})")
    unscored = [m for m in priced if m not in first]
    if unscored:
        raise RouterBenchError(f"{files[0]}: not RouterBench format: column '{unscored[0]}' is missing "
                               f"(the 0/1 correctness of the model that has '{unscored[0]}{COST_SUFFIX}')")
    models = [c for c in first if f"{c}{COST_SUFFIX}" in first]
    for f, frame in zip(files[1:], frames[1:], strict=True):
        missing = [c for c in ("prompt", *(x for m in models for x in (m, f"{m}{COST_SUFFIX}")))
                   if c not in frame.columns]
        if missing:
            raise RouterBenchError(f"{f}: column '{missing[0]}' is missing"
                                   f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                   f"every CSV of a folder needs the models of {files[0].name}")
    quality = np.vstack([np.column_stack([_numeric(f, fr, m) for m in models])
                         for f, fr in zip(files, frames, strict=True)])
    cost = np.vstack([np.column_stack([_numeric(f, fr, f"{m}{COST_SUFFIX}") for m in models])
                      for f, fr in zip(files, frames, strict=True)])
    df = pd.concat(frames, ignore_index=True)
    complete = ~(np.isnan(quality).any(axis=1) | np.isnan(cost).any(axis=1) | df["prompt"].isna().to_numpy())
    if not complete.any():
        raise RouterBenchError(f"{folder}: none of its {len(df)} rows has every model's correctness and cost")
    df = df[complete].reset_index(drop=True)
    answers = [{m: _decode(df.at[i, f"{m}{RESPONSE_SUFFIX}"]) if f"{m}{RESPONSE_SUFFIX}" in df.columns else ""
                for m in models} for i in range(len(df))]
    evals = df["eval_name"].astype(str).tolist() if "eval_name" in df.columns else ["all"] * len(df)
    return RouterBenchData(str(folder), [_decode(p) for p in df["prompt"]], evals, models,
                           quality[complete], cost[complete], answers, int((~complete).sum()))


def cached_vectors(texts: Sequence[str], embed: Embed | None = None, cache_dir: str | os.PathLike | None = None,
                   tag: str = "all-MiniLM-L6-v2/fp32/128") -> np.ndarray:
    """Vectors of `texts`, read from `cache_dir` when these exact texts were embedded before."""
    from tm_resources.config import tm_home

    h = hashlib.sha256(tag.encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    folder = Path(cache_dir) if cache_dir is not None else tm_home() / "bench-cache"
    path = folder / f"router-vectors-{h.hexdigest()[:16]}.npy"
    if path.exists():
        vecs = np.load(path)
        if vecs.shape[0] == len(texts):
            return vecs
    log.info("embedding %d prompts (cached afterwards in %s)", len(texts), folder)
    if embed is None:
        from tm_resources.embedder import get_embedder

        embed = get_embedder().embed
    t0 = time.perf_counter()
    vecs = np.asarray(embed(list(texts)), dtype=np.float32)
    log.info("embedded %d texts in %.1f s", len(texts), time.perf_counter() - t0)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, vecs)
    os.replace(tmp, path)
    return vecs


def _figures(quality: np.ndarray, cost: np.ndarray, reference: tuple[float, float] | None = None) -> dict:
    accuracy, cost_per_query = round(float(np.mean(quality)), 4), float(np.mean(cost))
    out: dict[str, float | None] = {"accuracy": accuracy, "cost_per_query": cost_per_query}
    if reference is not None:
        out["accuracy_vs_reference"] = round(accuracy / reference[0], 4) if reference[0] else None
        out["cost_vs_reference"] = round(cost_per_query / reference[1], 4) if reference[1] else None
    return out


def _shares(names: Sequence[str]) -> dict[str, float]:
    counts = Counter(names)
    return {k: round(v / len(names), 4) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def evaluate_split(train: RouterBenchData, test: RouterBenchData, train_vecs: np.ndarray, test_vecs: np.ndarray, *,
                   k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                   prior_weight: float = DEFAULT_PRIOR_WEIGHT, cost_weight: float = DEFAULT_COST_WEIGHT,
                   min_quality: float | None = None, cascades: bool = True,
                   plans: Sequence[Plan] | None = None, outcomes: dict | None = None) -> dict:
    """Learn from `train`, route `test`, return the figures. `outcomes` may carry plan outcomes already
    replayed for these rows ({"train": (q, c), "test": (q, c)}) so sweeps do not replay them again."""
    models = train.models
    q_tr, c_tr = train.quality, train.cost
    mean_q = dict(zip(models, q_tr.mean(axis=0), strict=True))
    mean_c = dict(zip(models, c_tr.mean(axis=0), strict=True))
    reference_model = max(models, key=lambda m: (mean_q[m], -mean_c[m]))
    r = models.index(reference_model)
    reference = (float(test.quality[:, r].mean()), float(test.cost[:, r].mean()))
    rows = np.arange(len(test))

    singles = {m: _figures(test.quality[:, i], test.cost[:, i], reference) for i, m in enumerate(models)}
    random_router = _figures(test.quality.mean(axis=1), test.cost.mean(axis=1), reference)
    # The perfect router: the cheapest model that is right; when none is, the cheapest model.
    right_cost = np.where(test.quality > 0, test.cost, np.inf)
    oracle_pick = np.where(np.isfinite(right_cost.min(axis=1)), right_cost.argmin(axis=1), test.cost.argmin(axis=1))
    oracle = _figures(test.quality[rows, oracle_pick], test.cost[rows, oracle_pick], reference)

    choose = {"cost_weight": cost_weight, "min_quality": min_quality}
    router = KnnRouter(train_vecs, models, q_tr, c_tr, k=k, temperature=temperature, prior_weight=prior_weight)
    picks = [models.index(ch.arm) for ch in router.choose_many(test_vecs, **choose)]
    routed = _figures(test.quality[rows, picks], test.cost[rows, picks], reference)
    routed["choices"] = _shares([models[p] for p in picks])

    result = {
        "reference_model": reference_model,
        "router": routed,
        "single": singles,
        "random": random_router,
        "oracle": oracle,
    }
    if cascades:
        plans = list(plans) if plans is not None else candidate_plans(models, mean_q, mean_c)
        if outcomes is None:
            outcomes = {"train": plan_outcomes(plans, train.prompts, train.answers, q_tr, c_tr, models),
                        "test": plan_outcomes(plans, test.prompts, test.answers, test.quality, test.cost, models)}
        (pq_tr, pc_tr), (pq_te, pc_te) = outcomes["train"], outcomes["test"]
        names = [p.name for p in plans]
        plan_router = KnnRouter(train_vecs, names, pq_tr, pc_tr, k=k, temperature=temperature,
                                prior_weight=prior_weight, reference_cost=router.reference_cost)
        chosen = [names.index(ch.arm) for ch in plan_router.choose_many(test_vecs, **choose)]
        cascade = _figures(pq_te[rows, chosen], pc_te[rows, chosen], reference)
        kinds = Counter(plans[c].kind for c in chosen)
        cascade["plan_kinds"] = {kd: round(kinds[kd] / len(chosen), 4) for kd in ("single", "cascade", "consensus")}
        cascade["plans"] = dict(list(_shares([names[c] for c in chosen]).items())[:8])
        cascade["candidate_plans"] = len(plans)
        result["router_cascade"] = cascade
    return result


def _target(result: dict) -> dict:
    ref = result["single"][result["reference_model"]]
    out = {"accuracy_at_least": ref["accuracy"], "cost_at_most": ref["cost_per_query"] / 2}
    for name in ("router", "router_cascade"):
        if name in result:
            r = result[name]
            out[f"{name}_met"] = bool(r["accuracy"] >= ref["accuracy"]
                                      and r["cost_per_query"] <= ref["cost_per_query"] / 2)
    return out


# What `tm bench router --text` embeds of each prompt.
TEXTS = {"last-paragraphs": routing_text, "prompt": lambda p: p}


def run_router_bench(data_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None, *,
                     train_share: float = 0.7, seed: int = 0, repeats: int = 1, k: int = DEFAULT_K,
                     temperature: float = DEFAULT_TEMPERATURE, prior_weight: float = DEFAULT_PRIOR_WEIGHT,
                     cost_weight: float = DEFAULT_COST_WEIGHT, min_quality: float | None = None,
                     cascades: bool = True, embed: Embed | None = None,
                     cache_dir: str | os.PathLike | None = None, text: str = "last-paragraphs") -> dict:
    """Route held-out RouterBench rows and return JSON-able figures.

    Without `test_dir`: a random `train_share` of `data_dir` is the log, the rest is routed;
    `repeats` > 1 repeats that with seeds seed, seed+1, ... and reports each split and the mean.
    With `test_dir`: all of `data_dir` is the log and `test_dir` is routed.
    embed: texts -> unit vectors (default: the shared MiniLM embedder); cache_dir: where vectors are
    cached (default $TM_HOME/bench-cache). text: what is embedded, "last-paragraphs"
    (router.routing_text) or "prompt" (the whole prompt, as the gateway embeds it today: the
    embedder keeps its opening 128 tokens).
    """
    if text not in TEXTS:
        raise RouterBenchError(f"text must be one of {', '.join(TEXTS)}, not {text!r}")
    to_text = TEXTS[text]
    _check_settings(train_share=train_share, repeats=repeats, k=k, temperature=temperature,
                    prior_weight=prior_weight, min_quality=min_quality)
    t0 = time.perf_counter()
    data = load_routerbench(data_dir)
    # Every input is checked before the (slow, on a first run) embedding.
    test = _aligned_test(data, load_routerbench(test_dir), data_dir, test_dir) if test_dir is not None else None
    cut = int(round(train_share * len(data)))
    if test is None and not 1 <= cut < len(data):
        raise RouterBenchError(f"train_share {train_share:g} of {len(data)} rows leaves "
                               f"{'no rows to learn from' if cut < 1 else 'none to route'}")
    vecs = cached_vectors([to_text(p) for p in data.prompts], embed, cache_dir)
    settings = {"k": k, "temperature": temperature, "prior_weight": prior_weight, "cost_weight": cost_weight,
                "min_quality": min_quality, "cascades": cascades,
                "text": {"last-paragraphs": "last paragraphs (at least 120 chars, at most the last 1000)",
                         "prompt": "the whole prompt, cut to its first 128 tokens (the gateway's vector)"}[text],
                "embedder": "all-MiniLM-L6-v2 fp32, 128 tokens"}
    params: dict[str, Any] = dict(k=k, temperature=temperature, prior_weight=prior_weight, cost_weight=cost_weight,
                  min_quality=min_quality, cascades=cascades)
    out: dict = {"data": {"dir": str(data_dir), "rows": len(data), "dropped_incomplete": data.dropped,
                          "models": data.models, "evals": dict(Counter(data.eval_names))},
                 "settings": settings}
    if test is not None:
        test_vecs = cached_vectors([to_text(p) for p in test.prompts], embed, cache_dir)
        out["test"] = {"dir": str(test_dir), "rows": len(test), "dropped_incomplete": test.dropped}
        result = evaluate_split(data, test, vecs, test_vecs, **params)
        result["target"] = _target(result)
        out.update(result)
    else:
        splits = []
        for s in range(seed, seed + repeats):
            order = np.random.default_rng(s).permutation(len(data))
            tr, te = np.sort(order[:cut]), np.sort(order[cut:])
            result = evaluate_split(data.subset(tr), data.subset(te), vecs[tr], vecs[te], **params)
            result["target"] = _target(result)
            result["split"] = {"seed": s, "train_rows": len(tr), "test_rows": len(te)}
            splits.append(result)
        out.update(splits[0] if repeats == 1 else {"splits": splits, "mean": _mean_of(splits)})
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _aligned_test(data: RouterBenchData, test: RouterBenchData, data_dir, test_dir) -> RouterBenchData:
    """The test rows with their model columns in the order of the learning rows; other models: an error."""
    if set(test.models) != set(data.models):
        only_test = [m for m in test.models if m not in data.models]
        only_data = [m for m in data.models if m not in test.models]
        what = "; ".join(x for x in (f"only in the test data: {', '.join(only_test)}" if only_test else "",
                                     f"missing from the test data: {', '.join(only_data)}" if only_data else "")
                         if x)
        raise RouterBenchError(f"{test_dir} has other models than {data_dir} ({what})")
    if test.models == data.models:
        return test
    order = [test.models.index(m) for m in data.models]
    return RouterBenchData(test.source, test.prompts, test.eval_names, data.models, test.quality[:, order],
                           test.cost[:, order], test.answers, test.dropped)


def _check_settings(*, train_share: float, repeats: int, k: int, temperature: float, prior_weight: float,
                    min_quality: float | None) -> None:
    """Refuse settings out of range before the (slow) embedding, naming the setting."""
    if not 0 < train_share < 1:
        raise RouterBenchError(f"train_share must be between 0 and 1 (exclusive), not {train_share:g}")
    if repeats < 1:
        raise RouterBenchError(f"repeats must be at least 1, not {repeats}")
    if k < 1:
        raise RouterBenchError(f"k must be at least 1, not {k}")
    if not temperature > 0:
        raise RouterBenchError(f"temperature must be above 0, not {temperature:g}")
    if not prior_weight >= 0:
        raise RouterBenchError(f"prior_weight must be at least 0, not {prior_weight:g}")
    if min_quality is not None and not 0 <= min_quality <= 1:
        raise RouterBenchError(f"min_quality must be between 0 and 1, not {min_quality:g}")


def _mean_of(splits: list[dict]) -> dict:
    """Mean and standard deviation over splits of the headline figures."""
    def stat(get) -> dict:
        values = np.array([get(s) for s in splits], dtype=float)
        return {"mean": round(float(values.mean()), 6),
                "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 6)}

    out: dict = {"reference_model": Counter(s["reference_model"] for s in splits).most_common(1)[0][0]}
    for name in ("router", "router_cascade", "random", "oracle"):
        if name in splits[0]:
            out[name] = {key: stat(lambda s, n=name, kk=key: s[n][kk])
                         for key in ("accuracy", "cost_per_query", "accuracy_vs_reference", "cost_vs_reference")}
    ref = out["reference_model"]
    out["reference"] = {key: stat(lambda s, kk=key: s["single"][ref][kk]) for key in ("accuracy", "cost_per_query")}
    out["target_met_share"] = {name: round(float(np.mean([s["target"].get(f"{name}_met", False) for s in splits])), 4)
                               for name in ("router", "router_cascade") if name in splits[0]}
    return out
