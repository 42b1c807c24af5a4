"""Thin typed resources the loop's assets share: Postgres, the configuration, PostHog."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg

from tm_resources import db
from tm_resources.config import Config, load_config, tm_home
from tm_resources.events import EventSink


class PostgresResource(dg.ConfigurableResource):
    """The Token Machine database: `url` when given, else $TM_DATABASE_URL, else the embedded server."""

    url: str | None = None

    def resolved_url(self) -> str:
        return self.url or db.database_url(tm_home())

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        # Autocommit, so that each replace_hour is its own real transaction (not a savepoint in a
        # transaction the reads opened, which closing the connection would roll back).
        conn = db.connect(self.resolved_url(), autocommit=True)
        try:
            yield conn
        finally:
            conn.close()


class TokenMachineConfig(dg.ConfigurableResource):
    """The same YAML file the gateway reads (`path`, else $TM_CONFIG, else ./tm.yaml)."""

    path: str | None = None

    def load(self) -> Config:
        return load_config(self.path)


class PostHogResource(dg.ConfigurableResource):
    """PostHog's project key and host; no key: events are off."""

    api_key: str | None = None
    host: str | None = None
    sync: bool = False

    def sink(self) -> EventSink:
        if self.api_key:
            return EventSink(self.api_key, self.host, sync=self.sync)
        return EventSink.from_env(sync=self.sync)
