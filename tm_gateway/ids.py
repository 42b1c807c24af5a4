"""Time-ordered request ids (UUIDv7, RFC 9562): sortable by creation time, unique across replicas."""

from __future__ import annotations

import os
import threading
import time
import uuid

# Random bits are drawn from the OS in blocks rather than per id: one getrandom call serves 400 ids.
_BLOCK = 10 * 400
_lock = threading.Lock()
_pool = b""
_at = _BLOCK
_CLEAR = ~(0xF << 76 | 0b11 << 62)
_VERSION_VARIANT = 0x7 << 76 | 0b10 << 62
_new = object.__new__
_set = object.__setattr__


def _forget_pool() -> None:
    # A forked worker must not hand out the bits its parent (or a sibling) also holds.
    global _at
    _at = _BLOCK


os.register_at_fork(after_in_child=_forget_pool)


def uuid7() -> uuid.UUID:
    global _pool, _at
    with _lock:
        if _at >= _BLOCK:
            _pool, _at = os.urandom(_BLOCK), 0
        rand = _pool[_at:_at + 10]
        _at += 10
    ms = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF
    value = int.from_bytes(ms.to_bytes(6, "big") + rand, "big") & _CLEAR | _VERSION_VARIANT
    # As Python 3.14's own uuid7 builds its UUID: the value is valid by construction, so
    # UUID.__init__'s argument checks are skipped.
    u = _new(uuid.UUID)
    _set(u, "int", value)
    _set(u, "is_safe", uuid.SafeUUID.unknown)
    return u
