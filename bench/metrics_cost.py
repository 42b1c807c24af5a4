"""What counting a row for /metrics and turning it into PostHog's `$ai_generation` cost the log writer's thread,
per row: tm_gateway.metrics.GatewayMetrics.observe (single-process and multiprocess mode) and
tm_gateway.analytics.LlmAnalytics.observe with the real PostHog SDK queueing to a loopback capture server.

    .venv/bin/python bench/metrics_cost.py [--rows 20000] [--batch 100]

Prints JSON. The request path itself is unchanged (both run after the row is stored); bench/gateway_latency.py
measures the gateway end to end.
"""

from __future__ import annotations

import argparse
import json
import os
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

MODELS = [("local-test", "local"), ("claude-test", "anthropic"), ("local-test", "cache")]


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        model, provider = MODELS[i % len(MODELS)]
        failed = i % 20 == 0
        attempts = ('[{"model":"local-test","provider":"local","key":0,"status":503,"failure":"unavailable","ms":3.1},'
                    '{"model":"claude-test","provider":"anthropic","key":0,"status":200,"ms":40.2}]') if failed else \
            f'[{{"model":"{model}","provider":"{provider}","key":0,"status":200,"ms":12.5}}]'
        out.append({
            "id": uuid.uuid4(), "ts": datetime.now(UTC), "user_id": f"user{i % 7}", "api_key_id": "k1",
            "api_format": "openai", "endpoint": "/v1/chat/completions", "session_id": f"s{i % 50}", "agent": "coder",
            "requested_model": "auto", "model": model, "provider": provider, "upstream_model": model,
            "stream": i % 3 == 0, "system": "Be brief.", "prompt": f"question {i}",
            "messages": f'[{{"role":"user","content":"question {i}"}}]', "params": "{}",
            "response_text": f"answer {i}", "finish_reason": "stop", "input_tokens": 120, "output_tokens": 80,
            "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.00123, "latency_ms": 42.0,
            "ttft_ms": 12.0 if i % 3 == 0 else None, "status": 200, "route": "tier:basic", "attempts": attempts,
            "baseline_cost_usd": 0.0015, "cache_hit": "exact" if provider == "cache" else None, "served": True,
        })
    return out


def _time_per_row(observe, request_log, data: list[dict], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(data), batch):
        observe(request_log, data[i:i + batch])
    return (time.perf_counter() - started) / len(data) * 1e6


def measure(n: int, batch: int, posthog_url: str | None) -> dict:
    from tests.conftest import make_config
    from tm_gateway.analytics import LlmAnalytics
    from tm_gateway.metrics import GatewayMetrics
    from tm_gateway.requestlog import RequestLog
    from tm_resources.events import EventSink

    request_log = RequestLog("postgresql://unused", spool_dir=Path(tempfile.mkdtemp()))
    proxy = SimpleNamespace(request_log=request_log, shared=SimpleNamespace(rules=[]))
    data = rows(n)
    metrics = GatewayMetrics(proxy)  # type: ignore[arg-type]
    _time_per_row(metrics.observe, request_log, data[:2000], batch)  # warm: label children created
    result = {"mode": "multiprocess" if metrics.dir else "single-process",
              "metrics_us_per_row": round(_time_per_row(metrics.observe, request_log, data, batch), 2)}
    scrape = time.perf_counter()
    body = metrics.exposition()
    result["scrape_ms"] = round((time.perf_counter() - scrape) * 1000, 2)
    result["scrape_bytes"] = len(body)
    if posthog_url:
        config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1")
        sink = EventSink("phc_bench", posthog_url)
        analytics = LlmAnalytics(sink, config)
        _time_per_row(analytics.observe, request_log, data[:2000], batch)
        result["posthog_us_per_row"] = round(_time_per_row(analytics.observe, request_log, data, batch), 2)
        sink.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--batch", type=int, default=100, help="rows per writer batch")
    p.add_argument("--child", choices=("single", "multi"), help=argparse.SUPPRESS)
    p.add_argument("--posthog-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows, args.batch, args.posthog_url)))
        return 0
    from tests.fakes import FakePostHog

    results = []
    with FakePostHog() as ph, tempfile.TemporaryDirectory() as mp:
        for mode in ("single", "multi"):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            if mode == "multi":
                env["PROMETHEUS_MULTIPROC_DIR"] = mp
            cmd = [sys.executable, __file__, "--child", mode, "--rows", str(args.rows), "--batch", str(args.batch)]
            if mode == "single":
                cmd += ["--posthog-url", ph.url]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"rows": args.rows, "batch": args.batch, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
