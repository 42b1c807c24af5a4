"""Run a FakeUpstream in the foreground: `python -m tests.fakes` (bench/chaos.py, bench/gateway_latency.py)."""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from tests.fakes.upstream import FAULTS, FakeUpstream, inject_fault


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description="Run a FakeUpstream in the foreground.")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--words-per-chunk", type=int, default=1)
    parser.add_argument("--api-key", action="append", help="require this key (repeatable); default: no auth")
    parser.add_argument("--fault", choices=sorted(FAULTS), help="answer every request with this fault (bench/chaos.py)")
    parser.add_argument("--fault-model", help="only requests for this model get the fault; default: all")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the retry-after of --fault 429")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds --fault stall waits before answering")
    args = parser.parse_args(argv)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    fake = FakeUpstream(port=args.port, chunk_delay=args.chunk_delay, words_per_chunk=args.words_per_chunk,
                        api_keys=set(args.api_key) if args.api_key else None, record=False)
    if args.fault:
        inject_fault(fake, args.fault, model=args.fault_model, retry_after=args.retry_after, stall=args.stall)
    fake.start()
    print(f"FakeUpstream listening on {fake.url} (OpenAI base {fake.openai_url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()



if __name__ == "__main__":
    main()
