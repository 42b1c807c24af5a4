"""What every part of the translation shares: the error a caller sees, compact JSON, lenient ints."""

from __future__ import annotations

import json


class FormatError(ValueError):
    """A body that cannot be translated; the message is shown to the API caller as is."""


_COMPACT = (",", ":")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=_COMPACT, ensure_ascii=False)


def _int(v) -> int:
    # Servers send null, floats or omit fields; usage must never break a response.
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float):
        return int(v)
    return 0
