"""GET /metrics: scraped after real SDK traffic (answered, rejected, cached, streamed, fallen back) and parsed
with prometheus_client's own parser; the counts match the rows, a token guards it when set, and the worker
processes of `tm gateway --workers 2` add up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import openai
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLAUDE_PRICE, LOCAL_PRICE, make_config, query, start_gateway
from tests.fakes import free_port
from tm_gateway import keys


def _config(anthropic_url: str, openai_url: str, **overrides):
    return make_config(
        anthropic_url, openai_url,
        gateway={"refresh_interval_s": 0.1, "max_body_bytes": 200_000, "classify_auto": False},
        cache={"enabled": True, "semantic": {"enabled": False}},
        models={
            "claude-test": {"provider": "anthropic", "upstream": "claude-upstream", "tier": "included",
                            "context_window": 200000, "price": CLAUDE_PRICE},
            "local-test": {"provider": "local", "upstream": "tiny-local", "tier": "local", "context_window": 8192,
                           "price": LOCAL_PRICE, "fallbacks": ["claude-test"]},
        },
        **overrides)


def scrape(url: str, **headers: str) -> dict[str, list]:
    """metric family name -> its samples, as Prometheus would read them."""
    r = httpx.get(url + "/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def served(db_url, upstreams, tmp_path):
    anth, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    app, server = start_gateway(_config(anth.url, local.openai_url), db_url, tmp_path)
    try:
        yield app, server, key, local
    finally:
        server.stop()


def test_metrics_count_what_the_rows_say_after_real_traffic(served, db_url):
    app, server, key, local = served
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    an = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    oa.chat.completions.create(model="local-test", messages=ask)                        # answered
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model", messages=ask)                 # rejected: 404
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="local-test", messages=[])                     # rejected: 400
    assert app.state.proxy.request_log.flush()
    hit = oa.chat.completions.with_raw_response.create(model="local-test", messages=ask)  # the exact cache
    assert hit.headers["x-tm-cache"] == "exact"
    with an.messages.stream(model="claude-test", max_tokens=50,
                            messages=[{"role": "user", "content": "Stream me a haiku"}]) as stream:
        assert "".join(stream.text_stream)                                              # streamed
    local.fail(503, times=1)
    fell = oa.chat.completions.with_raw_response.create(
        model="local-test", messages=[{"role": "user", "content": "Fall back, please"}])
    assert fell.headers["x-tm-model"] == "claude-test"                                  # fell back
    assert app.state.proxy.request_log.flush()

    rows = query(db_url, "SELECT * FROM requests ORDER BY ts")
    assert len(rows) == 6
    m = scrape(server.url)

    requests = m["tm_requests"]
    assert total(requests, "tm_requests_total") == len(rows)
    by_row = Counter((r["model"] or "none", r["provider"] or "none", str(r["status"])) for r in rows)
    by_metric = Counter()
    for s in requests:
        if s.name == "tm_requests_total":
            by_metric[(s.labels["model"], s.labels["provider"], s.labels["status"])] += int(s.value)
    assert by_metric == by_row
    assert total(requests, "tm_requests_total", route="cache", status="200") == 1
    assert total(requests, "tm_requests_total", status="404") == 1

    for direction in ("input", "output", "cache_read", "cache_write"):
        assert total(m["tm_tokens"], "tm_tokens_total", direction=direction) == \
            sum(r[f"{direction}_tokens"] for r in rows)
    assert total(m["tm_tokens"], "tm_tokens_total", direction="output") > 0
    assert total(m["tm_cost_usd"], "tm_cost_usd_total") == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert total(m["tm_cost_usd"], "tm_cost_usd_total", model="claude-test") > 0
    assert total(m["tm_frontier_baseline_cost_usd"], "tm_frontier_baseline_cost_usd_total") == \
        pytest.approx(sum(r["baseline_cost_usd"] or 0 for r in rows))

    assert total(m["tm_request_duration_seconds"], "tm_request_duration_seconds_count") == len(rows)
    assert total(m["tm_request_duration_seconds"], "tm_request_duration_seconds_sum") == \
        pytest.approx(sum(r["latency_ms"] for r in rows) / 1000)
    streamed = [r for r in rows if r["ttft_ms"] is not None]
    assert streamed and total(m["tm_time_to_first_token_seconds"], "tm_time_to_first_token_seconds_count",
                              model="claude-test") == len(streamed)

    assert total(m["tm_cache_hits"], "tm_cache_hits_total", kind="exact") == 1
    assert total(m["tm_fallbacks"], "tm_fallbacks_total", failure_class="unavailable") == 1
    assert total(m["tm_fallbacks"], "tm_fallbacks_total") == 1
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="written") == len(rows)
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="spooled") == 0
    assert total(m["tm_log_queue_rows"], "tm_log_queue_rows") == 0
    assert total(m["tm_log_spool_bytes"], "tm_log_spool_bytes") == 0
    assert total(m["tm_routing_rules_in_force"], "tm_routing_rules_in_force") == 0

    # The example Grafana dashboard asks only for what the gateway exposes.
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    asked = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"\btm_\w+", t["expr"])}
    exposed = {s.name for samples in m.values() for s in samples}
    assert asked and asked <= exposed, asked - exposed

    # A scrape is not a request of the team's: it leaves no row.
    assert app.state.proxy.request_log.flush()
    assert len(query(db_url, "SELECT id FROM requests")) == len(rows)


def test_a_metrics_token_guards_the_endpoint(served, monkeypatch):
    _, server, key, _ = served
    monkeypatch.setenv("TM_METRICS_TOKEN", "scrape-secret-123")
    refused = httpx.get(server.url + "/metrics")
    assert refused.status_code == 401
    assert "Authorization: Bearer" in refused.json()["error"]["message"]
    assert httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {key}"}).status_code == 401
    ok = httpx.get(server.url + "/metrics", headers={"authorization": "Bearer scrape-secret-123"})
    assert ok.status_code == 200 and "# TYPE tm_requests_total counter" in ok.text


def _wait(cond, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_worker_processes_add_up(db_url, upstreams, tmp_path: Path):
    anth, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    cfg = tmp_path / "tm.yaml"
    cfg.write_text(yaml.safe_dump(_config(anth.url, local.openai_url).model_dump(mode="json")))
    home, port = tmp_path / "home", free_port()
    # A previous run's counts must not come back: an ended gateway's folder (its lock held by no one), or a
    # file of the layout before folders per gateway.
    (home / "metrics" / "gateway-1-ended").mkdir(parents=True)
    (home / "metrics" / "gateway-1-ended" / "lock").touch()
    (home / "metrics" / "gateway-1-ended" / "counter_1.db").write_bytes(b"stale")
    (home / "metrics" / "counter_1.db").write_bytes(b"stale")
    env = {**os.environ, "TM_HOME": str(home), "TM_DATABASE_URL": db_url}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_gateway.cli", "gateway", "--workers", "2", "--host", "127.0.0.1",
         "--port", str(port), "--config", str(cfg)],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "gateway.log").open("wb"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _up(url), 60, "the gateway")
        # The metrics of this run only: its own folder, the ended run's gone.
        (folder,) = (home / "metrics").iterdir()
        assert folder.name.startswith(f"gateway-{proc.pid}-")
        sent = 0

        def workers_counting() -> int:
            return len(list(folder.glob("counter_*.db")))

        # A fresh connection per request, so the kernel spreads them over both workers.
        while sent < 8 or (workers_counting() < 2 and sent < 80):
            r = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": "local-test", "messages": [{"role": "user", "content": f"hi {sent}"}]})
            assert r.status_code == 200, r.text
            sent += 1
            time.sleep(0.02)
        _wait(lambda: query(db_url, "SELECT count(*) AS n FROM requests")[0]["n"] == sent, 15, "the rows")
        assert workers_counting() == 2, "every request went to one worker"
        # Whichever worker answers the scrape, it reports both workers' requests.
        _wait(lambda: total(scrape(url)["tm_requests"], "tm_requests_total") == sent, 10, "the counts")
        for _ in range(4):
            assert total(scrape(url)["tm_requests"], "tm_requests_total", model="local-test", status="200") == sent
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Each worker marked itself dead: its live gauges left the sum, its counts stayed.
    assert not list(folder.glob("gauge_livesum_*.db"))
    assert len(list(folder.glob("counter_*.db"))) == 2


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_rows_spooled_while_postgres_is_down_show_in_the_metrics(pg_server, tmp_path: Path):
    from types import SimpleNamespace

    from tm_gateway.metrics import GatewayMetrics
    from tm_gateway.requestlog import RequestLog
    from tm_resources import db

    down = db.with_database(pg_server, "t_down_metrics")  # no such database: every connection fails
    request_log = RequestLog(down, spool_dir=tmp_path / "spool", flush_interval_s=0.01).start()
    metrics = GatewayMetrics(SimpleNamespace(request_log=request_log, shared=SimpleNamespace(rules=[])))
    request_log.observers.append(metrics.observe)
    try:
        for _ in range(3):
            request_log.write({"id": uuid.uuid4(), "ts": datetime.now(UTC), "user_id": "alice", "api_format": "openai",
                               "endpoint": "/v1/chat/completions", "model": "local-test", "provider": "local",
                               "status": 200, "latency_ms": 5.0, "input_tokens": 7})
        assert request_log.flush()
        m = {f.name: f.samples for f in text_string_to_metric_families(metrics.exposition().decode())}
    finally:
        request_log.close()
    assert total(m["tm_requests"], "tm_requests_total", model="local-test", status="200") == 3
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="spooled") == 3
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="written") == 0
    assert total(m["tm_log_spool_bytes"], "tm_log_spool_bytes") > 0


def test_the_rules_in_force_are_a_gauge(served, db_url):
    app, server, _, _ = served
    with psycopg.connect(db_url) as conn:
        for rule_id, action, task_type, user, status in (("escalate:coding", "escalate", "coding", None, "active"),
                                                         ("throttle:bob", "throttle", None, "bob", "active"),
                                                         ("escalate:math", "escalate", "math", None, "proposed")):
            conn.execute("INSERT INTO routing_rules (hour, rule_id, action, task_type, user_id, model, target_model,"
                         " status, reason, evidence) VALUES (date_trunc('hour', now()), %s, %s, %s, %s, NULL,"
                         " 'claude-test', %s, 'test', '{}')", (rule_id, action, task_type, user, status))
    _wait(lambda: len(app.state.proxy.shared.rules) == 2, 10, "the gateway to read the rules")
    assert total(scrape(server.url)["tm_routing_rules_in_force"], "tm_routing_rules_in_force") == 2
