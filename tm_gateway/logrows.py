"""A request row's forms outside the process: the tuple COPY takes (columns, defaults, NUL escaping) and
the JSON lines rows wait in on local disk (journal, spool and rejected files), readable by their owner only."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("tm_gateway.requestlog")

# The columns the gateway writes, in COPY order. A row is a dict with any subset of these keys.
COLUMNS = (
    "id", "ts", "user_id", "api_key_id", "api_format", "endpoint", "session_id", "agent",
    "requested_model", "model", "provider", "upstream_model", "stream", "system", "prompt",
    "messages", "params", "response_text", "finish_reason", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "cost_usd", "latency_ms", "ttft_ms", "status",
    "error_class", "error_message", "route", "route_reason", "task_type", "prompt_embedding",
    "parent_id", "baseline_cost_usd", "attempts", "request_hash", "context_hash", "cache_hit",
    "cache_source_id", "cache_similarity", "served", "nul_escaped", "team", "billed_usd", "billing",
)  # fmt: skip
_VECTOR_AT = COLUMNS.index("prompt_embedding")
_ESCAPED_AT = COLUMNS.index("nul_escaped")
# jsonb columns, given as JSON text.
_JSON_AT = tuple(COLUMNS.index(c) for c in ("messages", "params", "attempts"))
# What `log.redact` applies to: the text people typed and the answers they got.
REDACT_TEXT_AT = tuple(COLUMNS.index(c) for c in ("system", "prompt", "response_text"))
MESSAGES_AT = COLUMNS.index("messages")
# COPY writes NULL for a missing value, so the NOT NULL columns' defaults are filled in here.
_DEFAULTS = {"stream": False, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
             "cache_write_tokens": 0, "cost_usd": 0.0, "served": True, "nul_escaped": False}
_COLUMN_DEFAULTS = tuple((c, _DEFAULTS.get(c)) for c in COLUMNS)


def copy_row(row: dict) -> tuple:
    """A row dict as the tuple COPY takes, with the NOT NULL columns' defaults filled in."""
    get = row.get  # a list comprehension and one lookup per column: a third of a generator's CPU
    return tuple([get(c, d) for c, d in _COLUMN_DEFAULTS])


# -- what Postgres cannot hold: NUL ---------------------------------------------------------------

_UNESCAPE = re.compile(r"\\([\\0])")


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\x00", "\\0")


def unescape_nul(s: str) -> str:
    """The original text of a string stored in a row marked `nul_escaped` (\\\\ -> \\, \\0 -> NUL)."""
    return _UNESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else "\\", s)


def map_strings(value: Any, fn: Callable[[str], str], keys: bool = False) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn, keys) for v in value]
    if isinstance(value, dict):
        return {(fn(k) if keys else k): map_strings(v, fn, keys) for k, v in value.items()}
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    return False


def escape_nul(r: list) -> None:
    """Escape every string of a row that holds a NUL anywhere (text columns, jsonb keys and values),
    and mark it; a row without one is left exactly as it is."""
    found = False
    parsed: dict[int, Any] = {}
    for i, v in enumerate(r):
        if not isinstance(v, str):
            continue
        if i in _JSON_AT:
            if "\\u0000" in v:  # how JSON writes a NUL (or, rarely, a literal backslash-u0000)
                parsed[i] = orjson.loads(v)
                found = found or _has_nul(parsed[i])
        elif "\x00" in v:
            found = True
    if not found:
        return
    for i, v in enumerate(r):
        if isinstance(v, str):
            r[i] = orjson.dumps(map_strings(parsed.get(i) or orjson.loads(v), _escape, keys=True)).decode() \
                if i in _JSON_AT else _escape(v)
    r[_ESCAPED_AT] = True


# -- spool files ----------------------------------------------------------------------------------


def _spool_default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return str(obj)
    raise TypeError


def dump_row(row: tuple) -> bytes:
    return orjson.dumps(row, default=_spool_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _load_spooled(line: bytes) -> tuple:
    row = orjson.loads(line)
    # Spooled by an older version with fewer columns (new ones are appended): the rest are NULL.
    row += [_DEFAULTS.get(c) for c in COLUMNS[len(row):]]
    if row[_VECTOR_AT] is not None:
        # A list would be sent as a Postgres array; the vector column wants the vector form.
        row[_VECTOR_AT] = np.asarray(row[_VECTOR_AT], dtype=np.float32)
    return tuple(row)


def row_dict(row: tuple) -> dict:
    """A row read back from disk as the dict the caller once wrote (what observers take)."""
    d = dict(zip(COLUMNS, row, strict=True))
    if isinstance(d["ts"], str):
        d["ts"] = datetime.fromisoformat(d["ts"])
    return d


def read_rows(path: Path) -> list[tuple]:
    """The rows of a spool, rejected or journal file. A journal's last line may have been cut off by
    kill -9 in the middle of a write: that row was never answered, and is skipped."""
    rows = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                rows.append(_load_spooled(line))
            except orjson.JSONDecodeError:
                log.warning("request log: skipped a partial line in %s", path.name)
    return rows


def private_dir(path: Path) -> Path:
    # Spooled rows hold whole prompts: only the gateway's own user may read them (like pgdata).
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, rows: list[tuple]) -> int:
    """Write rows to a new file readable by its owner only, whole or not at all; returns its size."""
    data = b"".join(dump_row(r) + b"\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.rename(path)
    return len(data)


def folder_bytes(path: Path, pattern: str) -> int:
    total = 0
    for p in path.glob(pattern):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total
