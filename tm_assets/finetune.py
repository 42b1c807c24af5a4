"""The fine-tune runner behind `model_versions`: redact and export training data, train a LoRA adapter
with mlx-lm, evaluate it against its base, generate answers, and serve base + adapter.

Plain functions and one process handle, no Dagster: the asset is a thin shell around them. Training,
evaluation and serving run mlx-lm's own command line (`python -m mlx_lm lora|server`) in a child
process, so a crash or a leak in MLX never takes the caller down, and the output the caller streams
into its logs is exactly what an operator would see running the same command by hand.
`build_tiny_model` makes a llama-architecture model with random weights in about a second, offline,
for tests and demos.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tm_resources.redact import redact

SPLITS = ("train", "valid", "test")

# -- a tiny model, built offline ---------------------------------------------------------------------

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

# ChatML. The prompt with the generation prompt is a token prefix of the whole conversation, which is
# what mlx-lm's --mask-prompt needs to find where the answer starts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _builtin_corpus(seed: int = 0, lines: int = 320) -> list[str]:
    """A few hundred lines of chat, prose, code and numbers: enough for a tokenizer to learn merges."""
    rng = random.Random(seed)
    subjects = ["the gateway", "a request", "the cache", "this model", "the router", "your team",
                "the fine-tune", "a user", "the database", "the log", "an adapter", "the server"]
    verbs = ["answers", "routes", "stores", "scores", "returns", "checks", "updates", "reads",
             "writes", "sends", "trains", "serves"]
    objects = ["the prompt", "a summary", "the ticket", "every hour", "the answer", "a token",
               "the status", "three rows", "the quality score", "a new version", "the config", "a report"]
    questions = ["What is the status of ticket {n}?", "Summarize the report for week {n}.",
                 "How do I reset my password?", "Translate 'good morning' to French.",
                 "Write a function that adds {n} to a number.", "Why did request {n} fail?",
                 "List three ways to cut cost.", "Explain the routing rule in one sentence."]
    answers = ["Ticket {n} is resolved.", "The report shows {n} requests and no errors.",
               "Open settings, choose security, then reset.", "Bonjour.",
               "def add(x):\n    return x + {n}", "It timed out after {n} ms and was retried.",
               "Cache answers, route to local models, and batch requests.",
               "Send each task type to the cheapest model that clears the bar."]
    code = ["import json", "from pathlib import Path", "for i in range({n}):", "    print(i, i * {n})",
            "if x > {n}:\n    return None", "SELECT id, ts FROM requests WHERE status = 200;",
            "def main() -> int:", "    return {n}", "class Router:", "    def route(self, request):"]
    out = []
    for i in range(lines):
        n = rng.randint(0, 9999)
        kind = i % 4
        if kind == 0:
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
            out.append(s[0].upper() + s[1:])
        elif kind == 1:
            out.append(rng.choice(questions).format(n=n))
        elif kind == 2:
            out.append(rng.choice(answers).format(n=n))
        else:
            out.append(rng.choice(code).format(n=n))
    return out


def build_tiny_model(dest: Path, *, corpus: Sequence[str] | None = None, vocab_size: int = 512,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Write a tiny llama-architecture model with random weights and its own tokenizer to `dest`.

    A byte-level BPE tokenizer trained on `corpus` (a built-in one by default) with pad, bos, eos and
    ChatML tokens, `<|im_end|>` as eos and a ChatML chat template; `mlx_lm.models.llama.Model` with
    seeded random weights, saved the way mlx-lm saves models. About 500 KB; it loads with
    `mlx_lm.load`, trains with `mlx_lm lora` and serves with `mlx_lm server`. Its answers are noise
    until it is trained.
    """
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else _builtin_corpus(seed), trainer)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(dest)
    # Newer transformers write their own class name and keep the template in a separate file; name
    # the portable class and keep the template inline too, so older transformers load it the same.
    tc_path = dest / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHATML_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2))

    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(dest, model)
    save_config(dict(config), dest / "config.json")
    return dest


# -- training data -------------------------------------------------------------------------------------

MIN_EXAMPLES = 3  # one per split: fewer cannot be split into train / valid / test at all


@dataclass(frozen=True)
class DatasetInfo:
    """What export_dataset wrote: example counts per split, distinct groups, and what it dropped."""

    path: Path
    counts: dict[str, int]
    groups: dict[str, int]
    redacted: int            # examples whose text redaction changed
    dropped_empty: int
    dropped_duplicates: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def normalize_prompt(text: str) -> str:
    """The form under which two prompts count as the same one: case, spacing, punctuation and
    redacted details do not matter."""
    text = unicodedata.normalize("NFKC", redact(text)).casefold()
    return " ".join(re.findall(r"\w+", text))


def _user_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m.get("role") == "user")


class _Groups:
    """Union-find over examples: one group per connected set of shared sessions or prompts."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _split_targets(n: int, valid_share: float, test_share: float) -> dict[str, int]:
    def held_out(share: float) -> int:
        return max(1, round(share * n)) if share > 0 and n >= MIN_EXAMPLES else 0
    return {"test": held_out(test_share), "valid": held_out(valid_share)}


def export_dataset(examples: Iterable[dict], dest_dir: Path, *, valid_share: float = 0.1,
                   test_share: float = 0.1, seed: int = 0) -> DatasetInfo:
    """Write `examples` as mlx-lm chat JSONL (train.jsonl, valid.jsonl, test.jsonl) in `dest_dir`.

    Each example is a dict with `prompt` and `answer` (and optionally `request_id`, `user_id`,
    `session_id`, `system`). Text is redacted; empty and exact duplicate examples are dropped.
    Examples that share a session, or whose prompts are the same once normalized, form one group,
    and a group never spans two splits: no prompt seen in training is scored as held out. Groups are
    ordered by a hash of their key and `seed`, so the same data splits the same way every time; the
    first groups fill test and valid up to their shares (at least one example each when there are
    MIN_EXAMPLES or more), the rest is train.
    """
    dest_dir = Path(dest_dir)
    rows: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    redacted = dropped_empty = dropped_duplicates = 0
    for ex in examples:
        prompt, answer = (ex.get("prompt") or "").strip(), (ex.get("answer") or "").strip()
        system = (ex.get("system") or "").strip()
        if not prompt or not answer:
            dropped_empty += 1
            continue
        clean = (redact(system), redact(prompt), redact(answer))
        if clean in seen:
            dropped_duplicates += 1
            continue
        seen.add(clean)
        redacted += clean != (system, prompt, answer)
        messages = [{"role": "system", "content": clean[0]}] if clean[0] else []
        messages += [{"role": "user", "content": clean[1]}, {"role": "assistant", "content": clean[2]}]
        rows.append({"messages": messages, "session": ex.get("session_id"), "key": normalize_prompt(prompt)})

    groups = _Groups(len(rows))
    first_with: dict[str, int] = {}
    for i, r in enumerate(rows):
        for key in (f"p:{r['key']}", f"s:{r['session']}" if r["session"] else None):
            if key is None:
                continue
            if key in first_with:
                groups.union(i, first_with[key])
            else:
                first_with[key] = i
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(rows)):
        members[groups.find(i)].append(i)

    def order(idx: list[int]) -> str:
        # The group's smallest key names it, whatever order the examples came in.
        name = min(rows[i]["key"] for i in idx)
        return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()

    targets = _split_targets(len(rows), valid_share, test_share)
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_groups = {s: 0 for s in SPLITS}
    for idx in sorted(members.values(), key=order):
        split = "train"
        for held in ("test", "valid"):
            have, want = len(assigned[held]), targets[held]
            # A group that would overfill a held-out split goes on to the next one, unless that split
            # is still empty and the group is not much bigger than the split's share.
            if have < want and (have + len(idx) <= want or (have == 0 and len(idx) <= 2 * want)):
                split = held
                break
        assigned[split].extend(sorted(idx))
        n_groups[split] += 1

    dest_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(dest_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in assigned[split]:
                f.write(json.dumps({"messages": rows[i]["messages"]}, ensure_ascii=False) + "\n")
    return DatasetInfo(path=dest_dir, counts={s: len(assigned[s]) for s in SPLITS}, groups=n_groups,
                       redacted=redacted, dropped_empty=dropped_empty, dropped_duplicates=dropped_duplicates)


def read_split(data_dir: Path, split: str) -> list[dict]:
    """The examples of one split file (`train`, `valid` or `test`)."""
    path = Path(data_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def held_out_examples(data_dir: Path, split: str = "test") -> list[tuple[list[dict], str]]:
    """(conversation up to the answer, reference answer) for each example of a split: what
    generate_answers answers and the quality score compares."""
    return [(row["messages"][:-1], row["messages"][-1]["content"]) for row in read_split(data_dir, split)]


def validate_dataset(data_dir: Path, *, min_examples: int = 1) -> list[str]:
    """Problems that would make `data_dir` unfit to train or to judge a model on; empty when fit.

    Checks each split file exists and holds at least `min_examples` chat examples in mlx-lm's format
    (a `messages` list of system / user / assistant turns with text, ending with the assistant), that
    no normalized user prompt appears in two splits, and that redaction would find nothing left.
    """
    data_dir = Path(data_dir)
    problems: list[str] = []
    prompts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.exists():
            problems.append(f"{split}.jsonl is missing")
            continue
        count = 0
        prompts[split] = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{split}.jsonl line {n}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    problems.append(f"{where}: not JSON ({e})")
                    continue
                messages = row.get("messages") if isinstance(row, dict) else None
                if not isinstance(messages, list) or not messages:
                    problems.append(f"{where}: no 'messages' list")
                    continue
                bad = [m for m in messages if not isinstance(m, dict)
                       or m.get("role") not in ("system", "user", "assistant")
                       or not isinstance(m.get("content"), str) or not m["content"].strip()]
                if bad:
                    problems.append(f"{where}: a message without a known role or without text")
                    continue
                if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
                    problems.append(f"{where}: needs a user turn and must end with the assistant's")
                    continue
                if any(redact(m["content"]) != m["content"] for m in messages):
                    problems.append(f"{where}: text that redaction would change (a secret or personal data)")
                prompts[split].setdefault(normalize_prompt(_user_text(messages)), n)
                count += 1
        if count < min_examples:
            problems.append(f"{split}.jsonl has {count} examples, fewer than {min_examples}")
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for key in prompts[a].keys() & prompts[b].keys():
                problems.append(f"leak: {a}.jsonl line {prompts[a][key]} and {b}.jsonl line "
                                f"{prompts[b][key]} have the same prompt")
    return problems


# -- running mlx-lm ------------------------------------------------------------------------------------

class FinetuneError(RuntimeError):
    """An mlx-lm command failed; the message ends with the tail of its output."""

    def __init__(self, message: str, output_tail: str = ""):
        super().__init__(f"{message}\n{output_tail}" if output_tail else message)
        self.output_tail = output_tail


def mlx_device() -> str:
    """Where MLX computes here: "gpu" (Metal, Apple silicon) or "cpu" (the CPU build, e.g. Linux)."""
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


# The children start through this instead of `python -m mlx_lm`: processes started in the background
# may inherit SIGINT and SIGTERM ignored, and an ignored signal stays ignored across exec, so the
# child could never be stopped. Resetting them here is also safe from threads, unlike preexec_fn.
_BOOTSTRAP = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "signal.signal(signal.SIGTERM, signal.SIG_DFL); sys.argv[0] = 'mlx_lm'; "
              "runpy.run_module('mlx_lm', run_name='__main__', alter_sys=True)")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _mlx_lm_command(*args: str) -> list[str]:
    return [sys.executable, "-c", _BOOTSTRAP, *args]


def _shown(cmd: list[str]) -> str:
    return shlex.join(["python", "-m", "mlx_lm", *cmd[3:]])


def _child_env(model_path: str | Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONUNBUFFERED": "1",   # lines arrive as they are printed, not in 8 KB blocks
        "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    if Path(model_path).exists():
        # A local model needs no hub: fail fast instead of trying to download anything.
        env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


def _run_streaming(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None] | None,
                   what: str, timeout_s: float | None) -> list[str]:
    """Run `cmd`, hand each line of its output (stdout and stderr) to `on_line`, return all lines."""
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=env, text=True, encoding="utf-8", errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        # A watchdog, not a check per line: a child that hangs silently must be stopped too.
        timed_out = threading.Event()

        def stop_it() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout_s, stop_it) if timeout_s else None
        if watchdog:
            watchdog.daemon = True
            watchdog.start()
        try:
            # Text mode turns the carriage returns of progress bars into line ends as well.
            for raw in proc.stdout:
                line = _ANSI.sub("", raw).rstrip()
                if not line.strip():
                    continue
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            if watchdog:
                watchdog.cancel()
    tail = "\n".join(lines[-40:])
    if timed_out.is_set():
        raise FinetuneError(f"{what} took longer than {timeout_s:.0f} s and was stopped: {_shown(cmd)}", tail)
    if rc != 0:
        raise FinetuneError(f"{what} failed (exit {rc}): {_shown(cmd)}", tail)
    return lines


# mlx-lm 0.29+ prints "   10    2.345 ▼    1,234    5.6k" and "   10    val 2.345    0.12s";
# older versions print "Iter 10: Train loss 2.345, ..." and "Iter 10: Val loss 2.345, ...".
_NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf)"
_TRAIN_LOSS = (re.compile(rf"^\s*(\d+)\s+{_NUMBER}\s+[▼▲]"), re.compile(rf"Iter (\d+): Train loss {_NUMBER}"))
_VAL_LOSS = (re.compile(rf"^\s*(\d+)\s+val\s+{_NUMBER}"), re.compile(rf"Iter (\d+): Val loss {_NUMBER}"))
_TEST_LOSS = re.compile(rf"Test loss {_NUMBER}, Test ppl {_NUMBER}")


def parse_losses(lines: Iterable[str]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) losses as (iteration, loss) from mlx-lm lora's output."""
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    for line in lines:
        for patterns, out in ((_TRAIN_LOSS, train), (_VAL_LOSS, val)):
            for p in patterns:
                if m := p.search(line):
                    out.append((int(m.group(1)), float(m.group(2))))
                    break
    return train, val


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _model_layers(model_path: Path) -> int | None:
    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class TrainResult:
    adapter_path: Path
    iters: int
    train_losses: list[tuple[int, float]]    # (iteration, mean train loss since the last report)
    val_losses: list[tuple[int, float]]      # (iteration, validation loss); iteration 1 is the start
    seconds: float
    device: str
    command: str                             # the equivalent command line, for the run's log
    settings: dict = field(default_factory=dict)

    @property
    def final_train_loss(self) -> float | None:
        return self.train_losses[-1][1] if self.train_losses else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


def train_lora(model_path: Path, data_dir: Path, adapter_path: Path, *, iters: int = 100, rank: int = 8,
               num_layers: int = 16, learning_rate: float = 1e-4, batch_size: int = 4,
               scale: float = 20.0, dropout: float = 0.0, mask_prompt: bool = True, seed: int = 0,
               max_seq_length: int = 2048, steps_per_report: int | None = None,
               steps_per_eval: int | None = None, on_line: Callable[[str], None] | None = None,
               timeout_s: float | None = None) -> TrainResult:
    """Train a LoRA adapter on `data_dir` (train.jsonl, valid.jsonl) with `python -m mlx_lm lora --train`.

    `rank`, `scale` and `dropout` go to mlx-lm's `lora_parameters` (settable only in its YAML
    config, written to `adapter_path/lora_config.yaml`); `num_layers` is how many of the last
    transformer layers get adapters (mlx-lm's --num-layers, -1 for all; capped at the model's
    depth). `mask_prompt` trains on the answers only; evaluate with the same setting. The batch size
    is lowered to the smallest of train and valid when they hold fewer examples, as mlx-lm needs
    one full batch of each. Every output line goes to `on_line` as it is printed; the reported
    train and validation losses come back parsed. Raises FinetuneError with the output's tail
    when mlx-lm fails.
    """
    model_path, data_dir, adapter_path = Path(model_path), Path(data_dir), Path(adapter_path)
    n_train, n_valid = _count_lines(data_dir / "train.jsonl"), _count_lines(data_dir / "valid.jsonl")
    if n_train == 0 or n_valid == 0:
        raise FinetuneError(f"{data_dir} needs non-empty train.jsonl and valid.jsonl "
                            f"(has {n_train} and {n_valid} examples)")
    depth = _model_layers(model_path)
    if depth is not None and (num_layers < 0 or num_layers > depth):
        num_layers = depth
    settings = {
        "model": str(model_path),
        "data": str(data_dir),
        "adapter_path": str(adapter_path),
        "train": True,
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout},
        "iters": iters,
        "batch_size": max(1, min(batch_size, n_train, n_valid)),
        "learning_rate": learning_rate,
        "mask_prompt": mask_prompt,
        "seed": seed,
        "max_seq_length": max_seq_length,
        "steps_per_report": steps_per_report or max(1, min(10, iters // 10 or 1)),
        "steps_per_eval": steps_per_eval or iters,
        "val_batches": -1,
        "save_every": iters,
    }
    adapter_path.mkdir(parents=True, exist_ok=True)
    config_path = adapter_path / "lora_config.yaml"
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    cmd = _mlx_lm_command("lora", "--config", str(config_path))
    started = time.perf_counter()
    lines = _run_streaming(cmd, _child_env(model_path), on_line, "LoRA training", timeout_s)
    train, val = parse_losses(lines)
    if not (adapter_path / "adapters.safetensors").exists():
        raise FinetuneError("mlx-lm lora finished without writing adapters.safetensors", "\n".join(lines[-40:]))
    return TrainResult(adapter_path=adapter_path, iters=iters, train_losses=train, val_losses=val,
                       seconds=time.perf_counter() - started, device=mlx_device(), command=_shown(cmd),
                       settings=settings)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    examples: int
    seconds: float
    command: str


def evaluate(model_path: Path, data_dir: Path, adapter_path: Path | None, *, mask_prompt: bool = True,
             batch_size: int = 1, max_seq_length: int = 2048,
             on_line: Callable[[str], None] | None = None, timeout_s: float | None = None) -> EvalResult:
    """Test loss and perplexity on `data_dir`/test.jsonl, with the adapter or (None) the base alone,
    via `python -m mlx_lm lora --test`. Compare base and adapter with the same `mask_prompt`. With
    the default batch size of 1 every test example counts (mlx-lm drops a last partial batch)."""
    model_path, data_dir = Path(model_path), Path(data_dir)
    n_test = _count_lines(data_dir / "test.jsonl")
    if n_test == 0:
        raise FinetuneError(f"{data_dir}/test.jsonl is missing or empty")
    args = ["lora", "--model", str(model_path), "--data", str(data_dir), "--test",
            # An empty adapter path is mlx-lm's way of testing the base model alone.
            "--adapter-path", str(adapter_path) if adapter_path else "",
            "--batch-size", str(max(1, min(batch_size, n_test))), "--test-batches", "-1",
            "--max-seq-length", str(max_seq_length)]
    if mask_prompt:
        args.append("--mask-prompt")
    cmd = _mlx_lm_command(*args)
    started = time.perf_counter()
    lines = _run_streaming(cmd, _child_env(model_path), on_line, "evaluation", timeout_s)
    for line in reversed(lines):
        if m := _TEST_LOSS.search(line):
            return EvalResult(loss=float(m.group(1)), perplexity=float(m.group(2)), examples=n_test,
                              seconds=time.perf_counter() - started, command=_shown(cmd))
    raise FinetuneError("mlx-lm lora --test printed no test loss", "\n".join(lines[-40:]))


def generate_answers(model_path: Path, adapter_path: Path | None, prompts: Sequence[str | list[dict]],
                     max_tokens: int = 256) -> list[str]:
    """Greedy answers to `prompts` (a user message, or a whole message list) from the model with the
    adapter (or the base alone), with the model's chat template. In process: load once, answer all."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_path), adapter_path=str(adapter_path) if adapter_path else None)
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answers.append(generate(model, tokenizer, text, max_tokens=max_tokens, verbose=False))
    return answers


# -- serving -------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ModelServer:
    """`python -m mlx_lm server` for one model (and adapter) on host:port, as a child process.

    `url` is the OpenAI-compatible base (`http://HOST:PORT/v1`). Requests must name the model
    UPSTREAM_MODEL ("default_model") or leave it out: mlx_lm.server treats any other name as a
    model to load (a hub id or a path), and the model path itself loads it *without* the adapter.
    The server's output goes to `log_path` (a temporary file by default). Use it as a context
    manager, or start() / stop(). The child runs in its own session, so it can outlive the caller
    when deployed: keep `pid` to stop it later.
    """

    UPSTREAM_MODEL = "default_model"

    def __init__(self, model_path: Path, adapter_path: Path | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, log_path: Path | None = None, startup_timeout_s: float = 60.0,
                 log_level: str = "WARNING", extra_args: Sequence[str] = ()):
        self.model_path = Path(model_path)
        self.adapter_path = Path(adapter_path) if adapter_path else None
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        # INFO logs every prefill step of every request: a deployed server's log would only grow.
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self._hub_cache: tempfile.TemporaryDirectory | None = None
        self._own_log = False  # a temporary log of our own goes when the server stops

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        args = ["server", "--model", str(self.model_path), "--host", self.host, "--port", str(self.port),
                "--log-level", self.log_level]
        if self.adapter_path:
            args += ["--adapter-path", str(self.adapter_path)]
        return _mlx_lm_command(*args, *self.extra_args)

    def start(self) -> ModelServer:
        if self.process is not None:
            raise RuntimeError("the server is already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="mlx-server-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # /v1/models lists the Hugging Face cache and fails when there is none: give it an empty one.
        extra_env = {}
        if "HF_HUB_CACHE" not in os.environ and "HF_HOME" not in os.environ:
            self._hub_cache = tempfile.TemporaryDirectory(prefix="mlx-hub-")
            extra_env["HF_HUB_CACHE"] = self._hub_cache.name
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=_child_env(self.model_path, extra_env))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        # /health answers as soon as the HTTP server listens, while the model may still be loading in
        # the generation thread; a one-token completion proves the model is loaded and answers.
        deadline = time.monotonic() + self.startup_timeout_s
        probe = json.dumps({"model": self.UPSTREAM_MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "ping"}]}).encode()
        healthy = False
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise FinetuneError(f"mlx_lm server exited ({self.process.returncode}) before it was ready",
                                    self.log_tail())
            try:
                if not healthy:
                    with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                        healthy = r.status == 200
                if healthy:
                    req = urllib.request.Request(self.url + "/chat/completions", data=probe,
                                                 headers={"content-type": "application/json"})
                    with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as r:
                        if r.status == 200:
                            return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise FinetuneError(f"mlx_lm server not ready after {self.startup_timeout_s:.0f} s",
                                    self.log_tail())
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # the server shuts down cleanly on KeyboardInterrupt
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._hub_cache is not None:
            self._hub_cache.cleanup()
            self._hub_cache = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._own_log = None, False

    def __enter__(self) -> ModelServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
