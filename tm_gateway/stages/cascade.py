"""The cascade stage: the cheap model answers first (whole, so the quick gate can read it); if its
answer fails the gate, or it cannot answer, the escalation model answers."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from starlette.responses import Response

from tm_gateway.gate import quick_gate
from tm_gateway.ids import uuid7
from tm_gateway.rules import Route
from tm_gateway.stages.call import Whole, answer, call, send_whole
from tm_gateway.stages.context import Ctx
from tm_gateway.stages.log import Row, answered
from tm_gateway.stages.relay import text_stream

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy


def applies(body: dict) -> bool:
    # The gate reads text: requests that may end in tool calls, or ask for several choices, go straight.
    return not body.get("tools") and not body.get("functions") and body.get("n") in (None, 1)


def _json_asked(body: dict) -> bool | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    return None


async def cascade(gw: Proxy, ctx: Ctx, body: dict, route: Route, prompt: str) -> Response:
    """The user's answer is `ctx.row`; a replaced cheap answer gets a row of its own (served = false),
    which the answer's row names as parent_id."""
    row, headers = ctx.row, ctx.reply_headers
    first = Row({**row.data, "id": uuid7(), "served": False, "request_hash": None, "context_hash": None},
                row.started, gw.request_log)
    scratch: dict[str, str] = {}
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    tried = dataclasses.replace(ctx, row=first, reply_headers=scratch)
    outcome = await call(gw, tried, plain, route.model, False, list(route.chain))
    if isinstance(outcome, Response):
        reasons = [f"no answer ({first.data.get('error_class')})"]  # its row is written, as failed
    else:
        got, name, _ = outcome
        assert isinstance(got, Whole)  # it was not asked to stream
        verdict = quick_gate(prompt, got.text, finish_reason=got.finish, expect_json=_json_asked(body))
        if verdict.passed:
            row.data.update({k: first.data[k] for k in ("model", "provider", "upstream_model", "attempts")})
            row.data["route_reason"] = f"{route.reason}; {name} passed the gate"
            headers.update(scratch)
            headers["x-tm-cascade"] = "passed"
            if not ctx.stream:
                return send_whole(gw, ctx, got, name)
            answered(gw.config, row, name, got.text, got.finish, got.usage)
            return text_stream(ctx, got.text, name, body, got.usage)
        reasons = verdict.reasons
        answered(gw.config, first, name, got.text, got.finish, got.usage,
                 route_reason=f"{route.reason}; failed the gate: " + "; ".join(reasons))
    why = "; ".join(reasons)
    row.data.update(parent_id=first.data["id"], route_reason=f"{route.reason}; escalated: {why}")
    headers["x-tm-cascade"] = f"escalated: {why}"
    headers["x-tm-cascade-first"] = str(first.data["id"])
    assert route.escalate_to is not None  # the orchestrator cascades only routes that escalate
    return await answer(gw, ctx, body, route.escalate_to, [])
