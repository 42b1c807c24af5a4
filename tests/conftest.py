"""Shared test fixtures: one real embedded Postgres for the session, a fresh database per test,
fake providers on 127.0.0.1, and the gateway served for real by uvicorn on a free port."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import uvicorn

from tests.fakes import FakeUpstream, free_port
from tm_gateway import keys
from tm_gateway.app import GatewaySettings, create_app
from tm_resources import db
from tm_resources.config import Config, parse_config

ANTHROPIC_TEST_KEY = "sk-ant-test-0123456789abcdef"

# The embedding model is exported to ONNX once and reused by every test (and later runs of this clone).
os.environ.setdefault("TM_MODEL_CACHE", str(Path(__file__).resolve().parent.parent / ".tm" / "test-models"))

# Prices chosen so every token kind costs something different: a wrong column shows in the cost.
CLAUDE_PRICE = {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}
LOCAL_PRICE = {"input": 0.1, "output": 0.2}


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    # The suite must not write into a real database named by the environment.
    os.environ.pop("TM_DATABASE_URL", None)
    return db.start_embedded(tmp_path_factory.mktemp("tm-home"))


@pytest.fixture
def db_url(pg_server: str) -> str:
    url = db.ensure_database(pg_server, "t_" + uuid.uuid4().hex[:12])
    db.migrate(url)
    return url


def query(url: str, sql: str, params: tuple = ()) -> list[dict]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def make_config(anthropic_url: str, openai_url: str, **overrides) -> Config:
    data = {
        "gateway": {"refresh_interval_s": 0.1, "max_body_bytes": 200_000},
        "log": {"flush_interval_ms": 20},
        # Most tests repeat a request and expect the provider to answer it again; the cache's own
        # tests (tests/test_cache.py) turn it on.
        "cache": {"enabled": False},
        "providers": {
            "anthropic": {"kind": "anthropic", "base_url": anthropic_url, "api_key_env": ["TM_TEST_ANTHROPIC_KEY"]},
            "local": {"kind": "openai", "base_url": openai_url},
        },
        "models": {
            "claude-test": {"provider": "anthropic", "upstream": "claude-upstream", "tier": "included",
                            "context_window": 200000, "price": CLAUDE_PRICE},
            "local-test": {"provider": "local", "upstream": "tiny-local", "tier": "local",
                           "context_window": 8192, "price": LOCAL_PRICE},
        },
        "defaults": {"model": "local-test", "frontier_model": "claude-test"},
    }
    for section, value in overrides.items():
        data[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
    return parse_config(data, "test config")


@pytest.fixture
def upstreams(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """A fake Anthropic that wants a key, and a fake local OpenAI-compatible server that wants none."""
    monkeypatch.setenv("TM_TEST_ANTHROPIC_KEY", ANTHROPIC_TEST_KEY)
    with FakeUpstream(api_keys={ANTHROPIC_TEST_KEY}) as anthropic, FakeUpstream() as local:
        yield anthropic, local


class ServedApp:
    """An ASGI app run by uvicorn in a thread, so that clients see real sockets and real streaming."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedApp:
        # A fresh clone exports the embedding model to ONNX on the first gateway start (tens of seconds on
        # a slow machine): done here once per session, outside the start deadline; later starts share it.
        from tm_resources.embedder import get_embedder

        get_embedder()
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Gateway:
    url: str
    key: str
    user: str
    db_url: str
    app: object
    served: ServedApp

    def flush(self) -> None:
        assert self.app.state.proxy.request_log.flush()

    def rows(self, where: str = "true", params: tuple = ()) -> list[dict]:
        self.flush()
        return query(self.db_url, f"SELECT * FROM requests WHERE {where} ORDER BY ts, id", params)


def start_gateway(config: Config, db_url: str, home: Path) -> tuple[object, ServedApp]:
    app = create_app(GatewaySettings(config=config, database_url=db_url, home=home))
    return app, ServedApp(app).start()


@pytest.fixture
def gateway(db_url: str, upstreams, tmp_path: Path) -> Iterator[Gateway]:
    anthropic, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    config = make_config(anthropic.url, local.openai_url)
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        yield Gateway(url=served.url, key=key, user="alice", db_url=db_url, app=app, served=served)
    finally:
        served.stop()
