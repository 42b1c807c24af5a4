"""The embedder's speed on its own onnxruntime path against sentence-transformers' ONNX backend.

Both run all-MiniLM-L6-v2 on onnxruntime with a 128-token cap, fp32 and dynamically quantized int8:
  - tm: tm_resources.embedder.Embedder (its own export, numpy pooling, the `tokenizers` tokenizer);
  - st: SentenceTransformer(backend="onnx"), exported by optimum, and its int8 copy from
    sentence_transformers.backend.export_dynamic_quantized_onnx_model.
Measured on arena-hard's short English prompts (3-40 words): one prompt at a time, p50 / p99 (the
gateway's case), and batches of 32 over all 750 prompts (the loop's case); cosine to the tm fp32 vectors,
which reproduce sentence-transformers' own (tests/test_embedder.py).

sentence-transformers' ONNX backend needs optimum-onnx, whose transformers pin (< 4.58) is older than the
one installed; install it beside the venv and put it first on the path for this run only:

    .venv/bin/pip install --no-deps --target /tmp/st-onnx optimum-onnx==0.1.0 optimum==2.1.0 \\
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
    PYTHONPATH=/tmp/st-onnx .venv/bin/python bench/embedder_backends.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
CAP = 128


def prompts(data: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line)["prompt"] for line in (data / "arena-hard" / "question-v2.jsonl").open()]
    short = [p for p in rows if 3 <= len(p.split()) <= 40 and sum(ord(c) > 0x24F for c in p) <= 0.02 * len(p)]
    return rows, (short * (300 // len(short) + 1))[:300]


def batched(embed, texts: list[str]) -> tuple[np.ndarray, dict]:
    embed(texts[:32])
    best, vecs = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        vecs = embed(texts)
        best = min(best, time.perf_counter() - t0)
    return np.asarray(vecs, dtype=np.float32), {"texts_per_s": round(len(texts) / best)}


def quantization_target() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() in ("arm64", "aarch64"):
        return "arm64"
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    everything, short = prompts(args.data_dir)

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    from tm_resources.embedder import Embedder, model_path

    work = Path(tempfile.mkdtemp(prefix="embedder-backends-"))
    try:
        backends: dict[str, tuple] = {}  # name -> (embed a list, embed one text)
        for precision in ("fp32", "int8"):
            emb = Embedder(precision=precision, max_tokens=CAP, cache_dir=work / "tm")
            backends[f"tm {precision}"] = (emb.embed, emb.embed_one)

        # A copy of the bundled model, so the export lands beside it (onnx/) and not in site-packages.
        local = work / "st"
        shutil.copytree(model_path(), local)
        t0 = time.perf_counter()
        st = SentenceTransformer(str(local), backend="onnx", device="cpu")
        st.save_pretrained(str(local))
        export_s = time.perf_counter() - t0
        target = quantization_target()
        export_dynamic_quantized_onnx_model(st, target, str(local))
        for name, file_name in (("fp32", "onnx/model.onnx"), ("int8", f"onnx/model_qint8_{target}.onnx")):
            model = SentenceTransformer(str(local), backend="onnx", device="cpu", model_kwargs={"file_name": file_name})
            model.max_seq_length = CAP
            backends[f"st-onnx {name}"] = (
                lambda texts, m=model: m.encode(texts, batch_size=32, normalize_embeddings=True),
                lambda text, m=model: m.encode(text, normalize_embeddings=True))

        # One prompt at a time, the backends taking turns on each prompt: a loaded machine's swings
        # then fall on all of them alike.
        for _, one in backends.values():
            for t in short[:20]:
                one(t)
        times: dict[str, list[float]] = {name: [] for name in backends}
        for t in short:
            for name, (_, one) in backends.items():
                t0 = time.perf_counter()
                one(t)
                times[name].append(time.perf_counter() - t0)
        results: dict[str, dict] = {}
        reference = None
        for name, (embed, _) in backends.items():
            vecs, speed = batched(embed, everything)
            reference = vecs if reference is None else reference
            results[name] = {"one_prompt_p50_ms": round(float(np.percentile(times[name], 50)) * 1e3, 2),
                             "one_prompt_p99_ms": round(float(np.percentile(times[name], 99)) * 1e3, 2), **speed,
                             "cosine_to_tm_fp32": round(float(np.mean(np.sum(vecs * reference, 1))), 4)}
            print(f"{name}: {results[name]}", flush=True)
        results["st-onnx export"] = {"seconds": round(export_s, 1), "quantized_for": target}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
