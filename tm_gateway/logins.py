"""Failed logins: logged (a short hash of the key at most), and an address that keeps failing backed off."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Source:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


def key_fingerprint(key: str | None) -> str:
    """Enough to tell one wrong key from another in the log, never enough to find the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8] if key else "none"


class LoginGuard:
    """Per client address: the first `free` failures cost nothing; each one after that blocks the address
    for 1, 2, 4 ... up to `max_backoff_s` seconds. An address quiet for `forget_after_s` starts again; the
    least recently seen addresses are dropped beyond `max_sources`, so a flood of addresses cannot grow it."""

    def __init__(self, *, free: int = 5, max_backoff_s: float = 60.0, forget_after_s: float = 900.0,
                 max_sources: int = 10_000):
        self.free = free
        self.max_backoff_s = max_backoff_s
        self.forget_after_s = forget_after_s
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def retry_after(self, source: str) -> float:
        """Seconds this source must still wait before a key it sends is looked at (0: none)."""
        s = self._sources.get(source)
        if s is None:
            return 0.0
        return max(0.0, s.blocked_until - time.monotonic())

    def failed(self, source: str, key: str | None, path: str) -> float:
        """Count a failed login; returns the back-off it earns (0 while it is still free)."""
        now = time.monotonic()
        s = self._sources.pop(source, None)
        if s is None or now - s.last > self.forget_after_s:
            s = _Source()
        self._sources[source] = s  # most recently seen last
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        s.failures += 1
        s.last = now
        backoff = 0.0
        if s.failures > self.free:
            backoff = min(self.max_backoff_s, 2.0 ** (s.failures - self.free - 1))
            s.blocked_until = now + backoff
        log.warning("failed login from %s on %s (key %s; %d failures%s)", source, path, key_fingerprint(key),
                    s.failures, f"; blocked {backoff:g} s" if backoff else "")
        return backoff
