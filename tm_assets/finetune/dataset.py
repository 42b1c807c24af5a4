"""Training data for a fine-tune: redact, export to mlx-lm's chat JSONL split by group so nothing leaks
between splits, read it back, and validate it."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tm_resources.redact import redact

SPLITS = ("train", "valid", "test")

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
