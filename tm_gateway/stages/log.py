"""The log stage: the one row a request leaves, what it cost, and the row of a request with no prompt."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request

from tm_gateway.ids import uuid7
from tm_gateway.requestlog import RequestLog
from tm_resources import formats as fm
from tm_resources.config import Config

if TYPE_CHECKING:
    from tm_gateway.stages.guard import Tally


class Row:
    """The one row a request leaves; `done()` hands it to the log exactly once.

    A held row (`hold=True`: the completion routes, tm_gateway/app.py) is finished by `done()` but handed to
    the log by `release()`, called once the response has gone out: the journal write, the budget's
    settlement and the limits' release then cost the client nothing. Its latency is still measured at
    `done()`, and `RequestLog.flush` waits for rows done but not yet released."""

    __slots__ = ("data", "started", "log", "written", "after", "tally", "held")

    def __init__(self, data: dict, started: float, request_log: RequestLog, hold: bool = False):
        self.data = data
        self.started = started
        self.log = request_log
        self.written = False
        self.held = hold
        # Run once the request has ended, however it ended (the limits stage frees its turn here).
        self.after: Callable[[], None] | None = None
        # The guard's reservation (stages/guard.py): billed and settled as the row is written.
        self.tally: Tally | None = None

    def done(self, **fields: Any) -> None:
        if self.written:
            return
        self.written = True
        self.data.update(fields)
        self.data["latency_ms"] = (time.perf_counter() - self.started) * 1000
        if self.held:
            self.log.parked += 1
        else:
            self._hand_over()

    def release(self) -> None:
        """Hand a held row to the log (if it is done; else `done()` will), once its response is sent."""
        if not self.held:
            return
        self.held = False
        if self.written:
            try:
                self._hand_over()
            finally:
                # Only once the row is queued: `flush` must never see no parked row and no row queued.
                self.log.parked -= 1

    def _hand_over(self) -> None:
        if self.tally is not None:
            self.tally.row_done(self.data)
        if isinstance(self.data.get("attempts"), list):
            self.data["attempts"] = orjson.dumps(self.data["attempts"]).decode()
        self.log.write(self.data)
        if self.after is not None:
            self.after()


def log_bodiless(request_log: RequestLog, request: Request, fmt: str, ident: tuple[str, str], status: int, *,
                 started: float | None = None, **fields: Any) -> uuid.UUID:
    """The row of a request that carries no prompt (a model listing, a refusal before the body is
    read, an unknown endpoint); returns its id."""
    rid = uuid7()
    request_log.write({
        "id": rid, "ts": datetime.now(UTC), "user_id": ident[1], "api_key_id": ident[0],
        "api_format": str(fmt), "endpoint": request.scope["path"], "status": status,
        "latency_ms": (time.perf_counter() - started) * 1000 if started is not None else 0.0,
        "agent": request.headers.get("x-tm-agent"), **fields})
    return rid


def costs(config: Config, model: str, usage: fm.Usage) -> tuple[float, float | None]:
    """What the request cost, and what it would have cost on the configured frontier model."""
    args = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
    frontier = config.defaults.frontier_model
    baseline = config.models[frontier].price.cost(*args) if frontier else None
    return config.models[model].price.cost(*args), baseline


def usage_fields(u: fm.Usage) -> dict[str, int]:
    # Usage's fields are named as the row's token columns.
    return dataclasses.asdict(u)


def answered(config: Config, row: Row, model: str, text: str, finish: str | None, usage: fm.Usage,
             **fields: Any) -> float:
    """Write the row of an answered request; returns its cost."""
    cost, baseline = costs(config, model, usage)
    row.done(status=200, response_text=text, finish_reason=finish, cost_usd=cost, baseline_cost_usd=baseline,
             **fields, **usage_fields(usage))
    return cost
