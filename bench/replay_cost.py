"""What replaying rows costs the request log's writer thread, with /metrics attached as in the gateway:
a spool file (rows already counted when spooled), a killed process's journal none of whose rows are in
Postgres (each stored and counted), and one all of whose rows are (skipped, counted by nobody).

    .venv/bin/python bench/replay_cost.py [--rows 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tm_gateway.ids import uuid7  # noqa: E402
from tm_gateway.logrows import copy_row, dump_row  # noqa: E402
from tm_gateway.metrics import GatewayMetrics  # noqa: E402
from tm_gateway.requestlog import RequestLog  # noqa: E402
from tm_resources import db  # noqa: E402

PROMPT = "Summarise this note in one sentence: the nightly build took longer after the cache was cleared. " * 3


def _rows(n: int) -> list[bytes]:
    return [dump_row(copy_row({
        "id": uuid7(), "ts": datetime.now(UTC), "user_id": f"user{i % 20}", "api_format": "openai",
        "endpoint": "/v1/chat/completions", "model": "local-test", "provider": "local", "status": 200,
        "input_tokens": 120, "output_tokens": 40, "latency_ms": 250.0, "cost_usd": 0.0001, "prompt": PROMPT,
        "route": "tier:local", "attempts": '[{"model": "local-test", "status": 200}]'})) for i in range(n)]


def _replay(url: str, lines: list[bytes], name: str) -> tuple[float, float]:
    """Seconds to replay one file of `lines` named `name`, and how many rows /metrics then counts."""
    with tempfile.TemporaryDirectory() as spool:
        (Path(spool) / name).write_bytes(b"\n".join(lines) + b"\n")
        log = RequestLog(url, spool_dir=Path(spool))
        metrics = GatewayMetrics(SimpleNamespace(request_log=log, shared=SimpleNamespace(rules=[])))
        log.observers.append(metrics.observe)
        started = time.perf_counter()
        log.start().close()
        took = time.perf_counter() - started
        counted = sum(s.value for f in metrics.registry.collect() if f.name == "tm_requests"
                      for s in f.samples if s.name == "tm_requests_total")
        return took, counted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process holds: its "journal" is recovered like a killed gateway's
    journal = f"journal-{dead.pid}-1.jsonl"
    with tempfile.TemporaryDirectory() as work:
        base = db.start_embedded(Path(work) / "home")
        print(f"{'case':<34} {'rows/s':>9} {'median s':>9} {'counted':>8}")
        for case in ("spool file", "journal, none stored before", "journal, all stored before"):
            times, counted = [], 0.0
            for _ in range(args.repeat):
                url = db.ensure_database(base, "b_" + uuid.uuid4().hex[:12])
                db.migrate(url)
                lines = _rows(args.rows)
                if case.startswith("journal, all"):
                    _replay(url, lines, "0-1.jsonl")  # the dead process had stored them
                took, counted = _replay(url, lines, "0-1.jsonl" if case == "spool file" else journal)
                times.append(took)
            t = statistics.median(times)
            print(f"{case:<34} {args.rows / t:>9.0f} {t:>9.2f} {counted:>8.0f}")
        for s in list(db._embedded.values()):
            s._cleanup()  # type: ignore[attr-defined]
        db._embedded.clear()


if __name__ == "__main__":
    main()
