"""The cascade stage: the router's plan (tm_gateway/router.py `Plan.next_step`, the code the router
benchmark replays) executed against the providers. The cheap models answer first, whole so the quick
gate can read them, a consensus's cheap models in parallel; the plan then serves the first cheap
answer or calls the escalation model, which streams when the client asked for a stream."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from starlette.responses import Response

from tm_gateway.gate import GateVerdict, quick_gate
from tm_gateway.ids import uuid7
from tm_gateway.router import Attempt, Plan, Step
from tm_gateway.rules import Route
from tm_gateway.stages.call import Whole, answer, call, send_whole
from tm_gateway.stages.context import Ctx
from tm_gateway.stages.log import Row, answered, costs
from tm_gateway.stages.relay import text_stream
from tm_resources.escalation import ESCALATED

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


@dataclasses.dataclass
class _Try:
    """One cheap model's attempt: its own row (served = false unless its answer goes out) and the
    reply headers its call set, kept apart from the client's until it is served."""

    model: str
    row: Row
    headers: dict[str, str]
    got: Whole | None = None
    name: str = ""              # the model that answered (a fallback of `model`, maybe)
    verdict: GateVerdict | None = None


async def cascade(gw: Proxy, ctx: Ctx, body: dict, route: Route, prompt: str) -> Response:
    """The client's answer is `ctx.row`. Every cheap attempt that is not served keeps a row of its own
    (served = false), written whatever became of it; the rows form a chain by parent_id in the order
    the plan called them, ending at the client's row: one request, every attempt paid for and linked."""
    plan = route.plan
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    expect_json = _json_asked(body)

    def gate(p: str, text: str | None, *, finish_reason: str | None = None) -> GateVerdict:
        return quick_gate(p, text, finish_reason=finish_reason, expect_json=expect_json)

    tries: list[_Try] = []
    attempts: list[Attempt] = []
    while True:
        step = plan.next_step(prompt, attempts, gate)
        if step.action == "serve":
            return _serve(gw, ctx, body, route, tries, step)
        if step.model == plan.escalate_to:
            return await _escalate(gw, ctx, body, route, tries, step)
        new = []
        for m in step.calls:
            row = Row({**ctx.row.data, "id": uuid7(), "served": False, "request_hash": None, "context_hash": None,
                       "parent_id": tries[-1].row.data["id"] if tries else None}, ctx.row.started, gw.request_log)
            row.tally = ctx.row.tally  # every attempt is paid for, served or not
            new.append(_Try(m, row, {}))
            tries.append(new[-1])
        # The route's chain backs only the first model; a partner's fallbacks are its own.
        await asyncio.gather(*(_run(gw, ctx, plain, t, list(route.chain) if t.model == route.model else [])
                               for t in new))
        for t in new:
            attempts.append(_attempt(t, tries, gate, prompt))


async def _run(gw: Proxy, ctx: Ctx, plain: dict, t: _Try, chain: list[str]) -> None:
    outcome = await call(gw, dataclasses.replace(ctx, row=t.row, reply_headers=t.headers), plain, t.model, False,
                         chain)
    if isinstance(outcome, Response):
        return  # its row is written, as failed
    got, t.name, _ = outcome
    assert isinstance(got, Whole)  # it was not asked to stream
    t.got = got


def _attempt(t: _Try, tries: list[_Try], gate, prompt: str) -> Attempt:
    if t.got is None:
        t.verdict = GateVerdict(False, [f"no answer ({t.row.data.get('error_class')})"])
    elif any(o.got is not None and o.name == t.name for o in tries[:tries.index(t)]):
        # A fallback landed on a model that already answered: agreeing with itself proves nothing.
        t.verdict = GateVerdict(False, [f"fell back to {t.name}, which answered already"])
    else:
        t.verdict = gate(prompt, t.got.text, finish_reason=t.got.finish)
    return Attempt(t.model, t.got.text if t.got else None, t.got.finish if t.got else None, tuple(t.verdict))


def _write_refused(gw: Proxy, t: _Try, why: str) -> float:
    """Write a cheap attempt whose answer did not go out; returns what it cost."""
    if t.got is None:
        return float(t.row.data.get("cost_usd") or 0.0)
    return answered(gw.config, t.row, t.name, t.got.text, t.got.finish, t.got.usage, route_reason=why)


def _serve(gw: Proxy, ctx: Ctx, body: dict, route: Route, tries: list[_Try], step: Step) -> Response:
    """The plan serves a cheap answer: the client's row becomes that attempt's; its partners (a
    consensus) keep their own rows, chained before it."""
    assert step.attempt is not None
    served = tries[step.attempt]
    got = served.got
    assert got is not None  # a plan serves only an answer that passed the gate
    row, headers = ctx.row, ctx.reply_headers
    others = [t for t in tries if t is not served]
    for i, t in enumerate(others):
        t.row.data["parent_id"] = others[i - 1].row.data["id"] if i else None
    spent = sum(_write_refused(gw, t, f"{route.reason}; agreed with {served.name}, whose answer was served")
                for t in others)
    row.data.update({k: served.row.data[k] for k in ("model", "provider", "upstream_model", "attempts")})
    row.data.update(parent_id=others[-1].row.data["id"] if others else None,
                    route_reason=f"{route.reason}; {served.name} {step.reason}")
    headers.update(served.headers)
    headers["x-tm-cascade"] = "agreed" if others else "passed"
    headers["x-tm-plan"] = route.plan.name
    total = spent + costs(gw.config, served.name, got.usage)[0]
    if not ctx.stream:
        resp = send_whole(gw, ctx, got, served.name)
        resp.headers["x-tm-cost-usd"] = f"{total:.8f}"  # the request's cost: every attempt's
        return resp
    answered(gw.config, row, served.name, got.text, got.finish, got.usage)
    headers["x-tm-cost-usd"] = f"{total:.8f}"
    return text_stream(ctx, got.text, served.name, body, got.usage)


async def _escalate(gw: Proxy, ctx: Ctx, body: dict, route: Route, tries: list[_Try], step: Step) -> Response:
    """The escalation model answers (streamed if asked); every cheap attempt keeps its row, refused."""
    plan: Plan = route.plan
    failed = next((t for t in tries if t.verdict is not None and not t.verdict.passed), None)
    if failed is not None and failed.verdict is not None:
        own = "; ".join(failed.verdict.reasons)
        why = own if plan.kind == "cascade" else f"{failed.model}: {own}"
    else:
        why = step.reason
    spent = 0.0
    for t in tries:
        if t.verdict is not None and not t.verdict.passed:
            reason = f"{route.reason}; failed the gate: {'; '.join(t.verdict.reasons)}"
        else:
            reason = f"{route.reason}; {ESCALATED}{why}"
        spent += _write_refused(gw, t, reason)
    row, headers = ctx.row, ctx.reply_headers
    # The loop's escalation counts (tm_resources.escalation) read this mark on the served row.
    row.data.update(parent_id=tries[-1].row.data["id"], route_reason=f"{route.reason}; {ESCALATED}{why}")
    headers["x-tm-cascade"] = f"escalated: {why}"
    headers["x-tm-cascade-first"] = str(tries[0].row.data["id"])
    headers["x-tm-plan"] = plan.name
    assert plan.escalate_to is not None
    resp = await answer(gw, ctx, body, plan.escalate_to, [])
    if (own_cost := resp.headers.get("x-tm-cost-usd")) is not None:
        resp.headers["x-tm-cost-usd"] = f"{float(own_cost) + spent:.8f}"  # the request's cost: every attempt's
    return resp
