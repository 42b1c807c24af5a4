"""Task-type accuracy on real prompts, and what embedding costs: export, load, throughput, latency.

Data (optional, outside the repository, read in place; --data-dir points at your copy):
../shared/data/arena-hard/question-v2.jsonl,
750 real Chatbot Arena prompts labelled coding / math / creative_writing (mapped to `writing`),
and ~200-word model answers from ../shared/data/routerbench/*.csv for the answer throughput.

  1. export: all-MiniLM-L6-v2 to ONNX in a fresh cache folder (cold, torch import included), then
     the int8 quantization; load time of an Embedder from the cache.
  2. accuracy: the 750 prompts embedded with fp32 / int8 and a 128 / 256 token cap, classified by
     the built-in seeds with kNN and with centroids. Reported: the product setting (all seven seed
     types: a coding prompt labelled `extraction` counts as wrong) and the three types the data
     has; per category, English vs other languages, the confusion matrix, the share left unknown
     and what the min_confidence threshold trades.
  3. throughput: texts/s and tokens/s for short prompts and ~200-word answers; sentence-transformers
     on the same short prompts for comparison; single-prompt embed + classify latency p50 / p99.
  4. the hourly loop's embedding bill for 10,000 requests, from the measured rates.

The machine's other processes share its cores: compare figures of one run with each other. Prints a
final JSON block.

    .venv/bin/python bench/task_types.py [--data-dir ../shared/data] [--no-st]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CATEGORY = {"coding": "coding", "math": "math", "creative_writing": "writing"}
THREE = ("coding", "math", "writing")


def mostly_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return sum(ord(c) > 0x24F for c in letters) <= 0.02 * max(1, len(letters))


def load_arena(data: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in (data / "arena-hard" / "question-v2.jsonl").open()]
    return [r["prompt"] for r in rows], np.array([CATEGORY[r["subcategory"]] for r in rows])


def load_answers(data: Path, n: int) -> list[str]:
    import pandas as pd

    out = []
    for name in ("arc_challenge_train.csv", "mbpp_train.csv"):
        df = pd.read_csv(data / "routerbench" / name)
        for col in [c for c in df.columns if c.endswith("|model_response")]:
            out += [t for t in df[col].dropna().astype(str) if 170 <= len(t.split()) <= 230]
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.permutation(len(out))[:n]]


def short_prompts(prompts: list[str], n: int) -> list[str]:
    short = [p for p in prompts if 3 <= len(p.split()) <= 40 and mostly_english(p)]
    return (short * (n // len(short) + 1))[:n]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def token_count(embedder, texts: list[str]) -> int:
    return sum(len(e.ids) for e in embedder._tokenizer.encode_batch([t[:embedder._max_chars] for t in texts]))


def throughput(embedder, texts: list[str], repeats: int = 2) -> dict:
    embedder.embed(texts[:32])  # warm-up
    best = min(timed(embedder.embed, texts)[1] for _ in range(repeats))
    tokens = token_count(embedder, texts)
    return {"texts_per_s": round(len(texts) / best), "tokens_per_s": round(tokens / best),
            "mean_tokens": round(tokens / len(texts), 1)}


def latency(classifier, texts: list[str]) -> dict:
    for t in texts[:20]:
        classifier.classify_text(t)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        classifier.classify_text(t)
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2)}


def score(pred: np.ndarray, truth: np.ndarray, english: np.ndarray) -> dict:
    ok = pred == truth
    return {"accuracy": round(float(ok.mean()), 3),
            "per_category": {c: round(float(ok[truth == c].mean()), 3) for c in THREE},
            "english": round(float(ok[english].mean()), 3), "other_languages": round(float(ok[~english].mean()), 3),
            "unknown": round(float((pred == "unknown").mean()), 3)}


def confusion(pred: np.ndarray, truth: np.ndarray, columns: list[str]) -> dict:
    counts = Counter(zip(truth, pred, strict=True))
    return {t: {p: counts[(t, p)] for p in columns} for t in THREE}


def print_confusion(title: str, matrix: dict) -> None:
    cols = list(next(iter(matrix.values())))
    print(f"\n{title} (rows: label in the data, columns: predicted)")
    print(f"{'':>10}" + "".join(f"{c[:11]:>12}" for c in cols))
    for t, row in matrix.items():
        print(f"{t:>10}" + "".join(f"{row[c]:>12}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--no-st", action="store_true", help="skip the sentence-transformers comparison")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tm_resources.embedder import Embedder, ensure_onnx
    from tm_resources.tasks import TaskClassifier, load_seeds

    report: dict = {"cores": len(os.sched_getaffinity(0)), "load_avg_start": round(os.getloadavg()[0], 2)}
    prompts, truth = load_arena(args.data_dir)
    english = np.array([mostly_english(p) for p in prompts])
    seeds = load_seeds()
    print(f"{len(prompts)} arena prompts ({english.mean():.0%} mostly English), "
          f"{sum(map(len, seeds.values()))} seeds in {len(seeds)} types; {report['cores']} cores, "
          f"load average {report['load_avg_start']}")

    # 1. export and load
    with tempfile.TemporaryDirectory() as cache:
        _, export_s = timed(ensure_onnx, "fp32", cache)
        _, quantize_s = timed(ensure_onnx, "int8", cache)
        sizes = {p.name.rsplit("-", 1)[-1]: round(p.stat().st_size / 2**20, 1) for p in Path(cache).glob("*.onnx")}
        _, load_fp32_s = timed(lambda: Embedder(cache_dir=cache))
        _, load_int8_s = timed(lambda: Embedder(cache_dir=cache, precision="int8"))
    report["export"] = {"fp32_export_s_cold": round(export_s, 1), "int8_quantize_s": round(quantize_s, 1),
                        "load_fp32_s": round(load_fp32_s, 2), "load_int8_s": round(load_int8_s, 2),
                        "file_mb": sizes}
    print(f"\nexport fp32 (cold: torch import + trace + save) {export_s:.1f} s, int8 quantization "
          f"{quantize_s:.1f} s; loading from the cache {load_fp32_s:.2f} s (fp32) / {load_int8_s:.2f} s (int8); "
          f"files {sizes} MB")

    # 2. accuracy
    embedders = {(p, cap): Embedder(precision=p, max_tokens=cap) for p in ("fp32", "int8") for cap in (128, 256)}
    embedded = {key: timed(embedder.embed, prompts) for key, embedder in embedders.items()}
    reference = embedded[("fp32", 256)][0]
    results = {}
    print("\naccuracy on arena-hard (750): all seven types | the three types in the data")
    for (precision, cap), embedder in embedders.items():
        vecs, secs = embedded[(precision, cap)]
        drift = (vecs * reference).sum(axis=1)
        row = {"embed_s": round(secs, 1), "prompts_per_s": round(len(prompts) / secs),
               "cosine_to_fp32_256": {"mean": round(float(drift.mean()), 4), "min": round(float(drift.min()), 4)}}
        for method in ("knn", "centroid"):
            seven = TaskClassifier(seeds, embedder, method=method)
            three = TaskClassifier({t: seeds[t] for t in THREE}, embedder, method=method, min_confidence=0,
                                   min_similarity=-1)
            pred7 = np.array([label for label, _ in seven.classify(vecs)])
            pred3 = np.array([label for label, _ in three.classify(vecs)])
            raw7 = TaskClassifier(seeds, embedder, method=method, min_confidence=0, min_similarity=-1)
            forced7 = np.array([label for label, _ in raw7.classify(vecs)])
            row[method] = {"seven_types": score(pred7, truth, english),
                           "seven_types_never_unknown": score(forced7, truth, english),
                           "three_types": score(pred3, truth, english)}
            r = row[method]
            s7, f7, s3 = r["seven_types"], r["seven_types_never_unknown"], r["three_types"]
            print(f"  {precision} cap {cap:>3} {method:>8}: seven {s7['accuracy']:.3f} (unknown {s7['unknown']:.1%}; "
                  f"never unknown {f7['accuracy']:.3f}) | three {s3['accuracy']:.3f} "
                  f"[coding {s3['per_category']['coding']:.3f}, math {s3['per_category']['math']:.3f}, "
                  f"writing {s3['per_category']['writing']:.3f}; English {s3['english']:.3f}, "
                  f"other languages {s3['other_languages']:.3f}]")
            if (precision, cap, method) == ("fp32", 256, "knn"):
                chosen = (seven, three, vecs, pred7, pred3)
        results[f"{precision}-{cap}"] = row
    report["accuracy"] = results

    seven, three, vecs, pred7, pred3 = chosen
    report["confusion_seven"] = confusion(pred7, truth, seven.types + ["unknown"])
    report["confusion_three"] = confusion(pred3, truth, list(THREE))
    print_confusion("fp32, cap 256, kNN, seven types", report["confusion_seven"])
    print_confusion("fp32, cap 256, kNN, three types", report["confusion_three"])

    votes = seven.votes(vecs)
    best = np.array(seven.types)[votes.argmax(axis=1)]
    confidence = votes.max(axis=1)
    sweep = []
    print("\nmin_confidence: share left unknown, accuracy of the rest (seven types)")
    for threshold in (0.0, 0.3, 0.4, 0.5, 0.6):
        kept = confidence >= threshold
        sweep.append({"min_confidence": threshold, "unknown": round(float(1 - kept.mean()), 3),
                      "accuracy_of_labelled": round(float((best[kept] == truth[kept]).mean()), 3)})
        print(f"  {threshold:.1f}: unknown {1 - kept.mean():5.1%}, "
              f"accuracy of the rest {sweep[-1]['accuracy_of_labelled']:.3f}")
    report["min_confidence_sweep"] = sweep

    # 3. throughput and latency
    short = short_prompts(prompts, 1000)
    answers = load_answers(args.data_dir, 300)
    speed = {}
    print("\nthroughput (batches of 32, texts sorted by length) and single-prompt embed + classify latency")
    for (precision, cap), embedder in embedders.items():
        clf = TaskClassifier(seeds, embedder)
        entry = {"short_prompts": throughput(embedder, short), "answers_200_words": throughput(embedder, answers),
                 "embed_and_classify_one_short_prompt": latency(clf, short[:300])}
        speed[f"{precision}-{cap}"] = entry
        sp, an, la = entry["short_prompts"], entry["answers_200_words"], entry["embed_and_classify_one_short_prompt"]
        print(f"  {precision} cap {cap:>3}: short prompts {sp['texts_per_s']:>4}/s ({sp['mean_tokens']} tokens, "
              f"{sp['tokens_per_s']} tokens/s); answers {an['texts_per_s']:>3}/s ({an['mean_tokens']} tokens, "
              f"{an['tokens_per_s']} tokens/s); one prompt p50 {la['p50_ms']} ms, p99 {la['p99_ms']} ms")
    single_thread = Embedder(max_tokens=256, threads=1)
    speed["fp32-256-1-thread"] = {
        "embed_and_classify_one_short_prompt": latency(TaskClassifier(seeds, single_thread), short[:300])}
    print(f"  fp32 cap 256, 1 thread: one prompt {speed['fp32-256-1-thread']['embed_and_classify_one_short_prompt']}")
    if not args.no_st:
        from sentence_transformers import SentenceTransformer

        from tm_resources.embedder import model_path

        st = SentenceTransformer(str(model_path()), device="cpu")
        st.encode(short[:32])
        _, secs = timed(lambda: st.encode(short[:300], batch_size=32, normalize_embeddings=True))
        t0 = time.perf_counter()
        for t in short[:50]:
            st.encode([t])
        speed["sentence_transformers"] = {"short_prompts_per_s": round(300 / secs),
                                          "one_prompt_mean_ms": round((time.perf_counter() - t0) / 50 * 1e3, 1)}
        st_speed = speed["sentence_transformers"]
        print(f"  sentence-transformers (torch): short prompts {st_speed['short_prompts_per_s']}/s, "
              f"one prompt {st_speed['one_prompt_mean_ms']} ms")
    report["speed"] = speed

    # 4. the hourly bill, from token rates (best of two runs) and the arena prompts' token counts
    bill = {}
    for (precision, cap), embedder in embedders.items():
        key = f"{precision}-{cap}"
        rate = speed[key]["answers_200_words"]["tokens_per_s"]
        prompts_s = 10_000 * token_count(embedder, prompts) / len(prompts) / rate
        answers_s = 10_000 / speed[key]["answers_200_words"]["texts_per_s"]
        bill[key] = {"prompts_s": round(prompts_s), "answers_s": round(answers_s),
                     "total_s": round(prompts_s + answers_s)}
    report["hourly_10k_requests_embedding_s"] = bill
    print("\n10,000 requests an hour (arena-like prompts + 200-word answers), embedding seconds on these cores:")
    for key, b in bill.items():
        print(f"  {key}: prompts {b['prompts_s']} s + answers {b['answers_s']} s = {b['total_s']} s")

    report["load_avg_end"] = round(os.getloadavg()[0], 2)
    print("\n" + json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
