"""Two `tm gateway` processes on one TM_HOME (two ports, or a restart while the old one drains): each /metrics
keeps counting its own requests when the other starts, and a gateway that died leaves no counts behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import psycopg
import yaml

from tests.fakes import free_port
from tests.test_metrics import _config, _up, _wait, scrape, total
from tm_gateway import keys


class _Gateway:
    def __init__(self, cfg: Path, home: Path, db_url: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TM_HOME": str(home), "TM_DATABASE_URL": db_url}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tm_gateway.cli", "gateway", "--host", "127.0.0.1", "--port", str(self.port),
             "--config", str(cfg)],
            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
        _wait(lambda: self.proc.poll() is None and _up(self.url), 60, "the gateway")

    def ask(self, key: str, n: int, prompt: str) -> None:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)
        for i in range(n):  # distinct prompts: the exact cache is on
            client.chat.completions.create(model="local-test", messages=[{"role": "user", "content": f"{prompt} {i}"}])

    def requests(self) -> float:
        return total(scrape(self.url).get("tm_requests", []), "tm_requests_total")

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_a_second_gateway_on_the_same_home_leaves_the_first_ones_counts_alone(db_url, upstreams, tmp_path: Path):
    anth, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    cfg = tmp_path / "tm.yaml"
    cfg.write_text(yaml.safe_dump(_config(anth.url, local.openai_url).model_dump(mode="json")))
    home = tmp_path / "home"
    started: list[_Gateway] = []
    try:
        first = _Gateway(cfg, home, db_url, tmp_path / "first.log")
        started.append(first)
        first.ask(key, 3, "first")
        _wait(lambda: first.requests() == 3, 10, "the first gateway's counts")

        second = _Gateway(cfg, home, db_url, tmp_path / "second.log")
        started.append(second)
        second.ask(key, 2, "second")
        _wait(lambda: second.requests() == 2, 10, "the second gateway's counts")
        assert first.requests() == 3  # its files were not erased by the second's start, nor summed with them
        first.ask(key, 1, "first again")
        _wait(lambda: first.requests() == 4, 10, "the first gateway's next request")
        assert second.requests() == 2

        # A gateway that died: the next start shows none of its counts, and removes its folder.
        first.stop(signal.SIGKILL)
        third = _Gateway(cfg, home, db_url, tmp_path / "third.log")
        started.append(third)
        assert third.requests() == 0
        assert second.requests() == 2
        folders = sorted(p.name.split("-")[1] for p in (home / "metrics").glob("gateway-*"))
        assert folders == sorted([str(second.proc.pid), str(third.proc.pid)])
    finally:
        for gateway in started:
            gateway.stop()
