"""Thin typed resources the loop's assets share: Postgres, the configuration, PostHog, and the models
(embedder, task classifier, judge), each set up once per run and torn down after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import dagster as dg
import psycopg
from pydantic import PrivateAttr

from tm_assets.judge import judge_answers
from tm_resources import db, tasks
from tm_resources.config import Config, load_config, tm_home
from tm_resources.embedder import DEFAULT_MAX_TOKENS, Embedder
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
    """PostHog's project key and host; no key: events are off. One client per run, flushed at its end."""

    api_key: str | None = None
    host: str | None = None
    sync: bool = False

    _sink: EventSink | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._sink = EventSink(self.api_key, self.host, sync=self.sync) if self.api_key \
            else EventSink.from_env(sync=self.sync)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def sink(self) -> EventSink:
        if self._sink is None:
            raise RuntimeError("PostHogResource is used outside a run (its client is opened in setup_for_execution)")
        return self._sink


class EmbedderResource(dg.ConfigurableResource):
    """MiniLM through onnxruntime: the prompt model (fp32, the gateway's own settings, so vectors match the
    gateway's) loaded when the run starts, other precisions on first use; a run loads each once."""

    cache_dir: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS

    _models: dict[tuple[str, int], Embedder] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._models = {}
        self.get()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._models.clear()

    def get(self, precision: Literal["fp32", "int8"] = "fp32", max_tokens: int | None = None) -> Embedder:
        key = (precision, max_tokens or self.max_tokens)
        if key not in self._models:
            self._models[key] = Embedder(precision=precision, max_tokens=key[1], cache_dir=self.cache_dir)
        return self._models[key]


class TaskClassifierResource(dg.ConfigurableResource):
    """The nearest-labelled-examples classifier the gateway also uses for `model: "auto"`, built from the
    configuration's seeds (or the built-in ones) once per run."""

    _classifiers: dict[tuple, tasks.TaskClassifier] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._classifiers = {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._classifiers.clear()

    def get(self, config: Config, embedder: Embedder) -> tasks.TaskClassifier:
        seeds = config.loop.task_seeds or tasks.load_seeds()
        key = tuple(sorted((k, tuple(v)) for k, v in seeds.items()))
        if key not in self._classifiers:
            self._classifiers[key] = tasks.TaskClassifier(seeds, embedder)
        return self._classifiers[key]


class JudgeResource(dg.ConfigurableResource):
    """The cheap LLM judge of task completion: `loop.judge_model`, called through the gateway's providers."""

    timeout_s: float = 30.0

    def judge(self, config: Config, conversations: Sequence[list[dict]],
              parse: Callable[[str], float | None]) -> list[float | None]:
        return judge_answers(config, conversations, parse, timeout_s=self.timeout_s)


def model_resources() -> dict[str, dg.ConfigurableResource]:
    """The model resources with their defaults, which hold no secret and read no environment."""
    return {"embedder": EmbedderResource(), "task_classifier": TaskClassifierResource(), "judge": JudgeResource()}
