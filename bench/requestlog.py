"""The request log writer alone, on the embedded Postgres: what RequestLog.write costs the request path
per row with each log.journal setting, and how fast rows land when some of them Postgres refuses.

  write cost  --rows rows written from this thread (the event loop's place), per journal setting:
              microseconds per write() call, then the time until all are stored
  refused     batches of --batch rows with 0, 1 and 10 rows Postgres refuses (NOT NULL violated):
              rows stored per second, rows set aside

    .venv/bin/python bench/requestlog.py [--rows 20000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tm_gateway.ids import uuid7  # noqa: E402
from tm_gateway.requestlog import RequestLog  # noqa: E402
from tm_resources import db  # noqa: E402

PROMPT = "Summarise this note in one sentence: the nightly build took longer after the cache was cleared. " * 3


def row(i: int, bad: bool = False) -> dict:
    return {"id": uuid7(), "ts": datetime.now(UTC), "user_id": None if bad else "bench",
            "api_format": "openai", "endpoint": "/v1/chat/completions", "status": 200, "prompt": PROMPT,
            "messages": f'[{{"role": "user", "content": "{PROMPT} {i}"}}]', "response_text": "Fine. " * 20,
            "model": "bench-local", "provider": "bench", "input_tokens": 40, "output_tokens": 30}


def fresh(server: str) -> str:
    url = db.ensure_database(server, "bench_" + uuid.uuid4().hex[:8])
    db.migrate(url)
    return url


def write_cost(server: str, work: Path, rows: int) -> None:
    print(f"{'journal':<8} {'µs/write p50':>12} {'µs/write mean':>13} {'stored in':>10}")
    for journal in ("off", "write", "fsync", "off", "write"):
        n = rows if journal != "fsync" else rows // 10
        log = RequestLog(fresh(server), spool_dir=work / f"spool-{journal}-{uuid.uuid4().hex[:4]}",
                         journal=journal, redact_secrets=True).start()
        batch = [row(i) for i in range(n)]
        took = []
        t0 = time.perf_counter()
        for r in batch:
            s = time.perf_counter_ns()
            log.write(r)
            took.append(time.perf_counter_ns() - s)
            if len(took) % 200 == 0:
                time.sleep(0.001)  # arrivals, not one burst
        assert log.flush(120)
        stored = time.perf_counter() - t0
        log.close()
        took.sort()
        print(f"{journal:<8} {took[len(took) // 2] / 1000:>12.1f} {sum(took) / len(took) / 1000:>13.1f}"
              f" {stored:>9.2f}s  ({n} rows)")


def refused(server: str, work: Path, batch: int, batches: int = 5) -> None:
    print(f"\n{'bad rows per batch':<19} {'rows/s stored':>13} {'set aside':>9}")
    for bad in (0, 1, 10):
        log = RequestLog(fresh(server), spool_dir=work / f"spool-bad{bad}", batch_max_rows=batch,
                         flush_interval_s=0.01)
        log.start()
        rows = []
        for b in range(batches):
            bad_at = {b * batch + k * (batch // max(bad, 1)) for k in range(bad)}
            rows += [row(i, bad=i in bad_at) for i in range(b * batch, (b + 1) * batch)]
        t0 = time.perf_counter()
        for r in rows:
            log.write(r)
        assert log.flush(300)
        took = time.perf_counter() - t0
        log.close()
        print(f"{bad:<19} {log.rows_written / took:>13.0f} {log.rows_rejected:>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tm-bench-log-") as tmp:
        work = Path(tmp)
        server = db.start_embedded(work / "home")
        try:
            write_cost(server, work, args.rows)
            refused(server, work, args.batch)
        finally:
            for s in list(db._embedded.values()):
                s._cleanup()  # type: ignore[attr-defined]
            db._embedded.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
