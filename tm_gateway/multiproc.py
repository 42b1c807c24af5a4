"""The folder through which the gateway's worker processes add up their Prometheus metrics; kept apart from
tm_gateway.metrics because it must be set before prometheus_client is first imported (its mode is chosen then)."""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def prepare_multiprocess_dir(home: Path) -> Path:
    """Before the gateway's processes start: the folder their metrics share (PROMETHEUS_MULTIPROC_DIR, set
    for them, else $TM_HOME/metrics), emptied so a previous run's counts do not come back."""
    path = multiprocess_dir() or home / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    for p in path.glob("*.db"):
        p.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
