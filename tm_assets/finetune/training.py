"""Running mlx-lm: LoRA training, evaluation against the base, and answers from base or adapter, each in a
child process (`python -m mlx_lm ...`) whose output the caller streams into its logs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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

    # mlx_lm types load() as returning 2 or 3 items; the third comes only with return_config=True.
    model, tokenizer = load(str(model_path), adapter_path=str(adapter_path) if adapter_path else None)  # type: ignore[misc]
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answers.append(generate(model, tokenizer, text, max_tokens=max_tokens, verbose=False))
    return answers
