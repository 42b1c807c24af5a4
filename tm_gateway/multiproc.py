"""The folder through which the gateway's worker processes add up their Prometheus metrics; kept apart from
tm_gateway.metrics because it must be set before prometheus_client is first imported (its mode is chosen then)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LOCK = "lock"
# The lock of this process's own folder, open (and so held) until the process ends, however it ends.
_held: list[int] = []


def multiprocess_dir() -> Path | None:
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def prepare_multiprocess_dir(home: Path) -> Path:
    """Before the gateway's processes start: a new, empty folder for their metrics, `gateway-<pid>-*` under
    PROMETHEUS_MULTIPROC_DIR (else $TM_HOME/metrics), set as PROMETHEUS_MULTIPROC_DIR for them.

    A folder per gateway because two gateways may share one TM_HOME (two ports, or a restart while the old
    process still drains): each reports its own workers, and starting one must not erase another's counts.
    The gateway holds an flock on its folder's lock file for as long as it lives (the kernel drops it when
    the process dies, even by kill -9, and pids reused later or in other containers cannot fool it), so a
    folder nobody holds is a gateway that ended: it is removed, and a dead run's counts never come back."""
    base = multiprocess_dir() or home / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    _remove_ended(base)
    # Made and locked under a name the sweep ignores, then renamed: no other gateway starting at the same
    # moment can take it for an ended one.
    starting = Path(tempfile.mkdtemp(prefix=".starting-", dir=base))
    fd = os.open(starting / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)
    path = base / f"gateway-{os.getpid()}-{starting.name.removeprefix('.starting-')}"
    starting.rename(path)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _remove_ended(base: Path) -> None:
    """Remove the folders of gateways that ended, and the files of the layout before folders per gateway."""
    for p in base.glob("*.db"):
        p.unlink(missing_ok=True)
    for folder in base.glob("gateway-*"):
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue  # removed meanwhile by another gateway starting
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its gateway lives
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
