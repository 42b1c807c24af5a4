"""Rate limits held by `tm gateway --workers 2`: two worker processes sharing one port and one database
spend from one window, whichever process each request reaches."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import yaml

from tests.conftest import make_config
from tests.fakes import free_port
from tests.test_limits import clear_of_window_end
from tm_gateway import keys

pytestmark = pytest.mark.slow  # two worker processes to start: out of the fast tier


def test_two_worker_processes_share_one_hour(db_url, upstreams, tmp_path: Path):
    anthropic_fake, local = upstreams
    local.stall(0.3, times=1000)  # answers overlap, so both workers hold requests at once
    config = make_config(anthropic_fake.url, local.openai_url, gateway={"classify_auto": False},
                         limits={"turns_per_hour": 12, "loop": {"repeats": 0}})
    cfg = tmp_path / "tm.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    port = free_port()
    env = {**os.environ, "TM_DATABASE_URL": db_url, "TM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_gateway.cli", "gateway", "--config", str(cfg), "--port", str(port),
         "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                            signal.signal(signal.SIGTERM, signal.SIG_DFL)),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1)  # both workers up
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                               default_headers={"x-tm-agent": "crawler"})
        clear_of_window_end(3600, 120)

        def one(i: int) -> int:
            try:
                client.chat.completions.create(model="local-test", max_tokens=10,
                                               messages=[{"role": "user", "content": f"question {i}"}])
                return 200
            except openai.RateLimitError:
                return 429

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(one, range(30)))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert statuses.count(200) == 12 and statuses.count(429) == 18
    assert len(local.requests) == 12
    with psycopg.connect(db_url) as conn:
        rows = dict(conn.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())
    assert rows == {200: 12, 429: 18}
