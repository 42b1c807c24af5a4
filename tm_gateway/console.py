"""What the `tm` commands print: tables for people (tabulate), JSON for scripts, one shape for every command."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID


def table(rows: Iterable[dict], columns: Sequence[str], *, floatfmt: str = ".3f") -> str:
    from tabulate import tabulate

    return tabulate([[r.get(c) for c in columns] for r in rows], headers=list(columns), floatfmt=floatfmt,
                    missingval="-")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any, *, indent: int | None = None) -> str:
    """JSON for `--json`: timestamps as ISO 8601, ids as strings, numbers as numbers."""
    return json.dumps(value, default=_plain, ensure_ascii=False, indent=indent)


def emit(value: Any, *, as_json: bool, text: str | None = None) -> None:
    """Print `value` as JSON for scripts, or `text` (a table, a sentence) for people."""
    print(dumps(value, indent=2) if as_json else (text if text is not None else str(value)), file=sys.stdout)


def fail(message: str, code: int = 2) -> int:
    """A clear error on stderr, and the exit code to return."""
    print(f"tm: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def working(what: str) -> Iterator[None]:
    """A spinner on stderr while something takes a while (reading a week of scored requests), shown only to
    a person at a terminal: scripts and --json output stay clean."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(what):
        yield
