"""The call stage: the provider called, falling back along the model's chain (and a preset's) by failure
class, every attempt recorded in the row; the answer sent whole or handed to the stream relay."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from starlette.responses import Response

from tm_gateway import fallback, schemas
from tm_gateway.stages import prompt_cache
from tm_gateway.stages.context import JSON, SSE, BadRequest, Ctx, error_response
from tm_gateway.stages.log import answered
from tm_gateway.stages.relay import relay
from tm_resources import formats as fm
from tm_resources.providers import Endpoint

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy


async def answer(gw: Proxy, ctx: Ctx, body: dict, model: str, chain: list[str]) -> Response:
    """Call `model` (falling back along its chain, then `chain`) and answer, streamed or whole."""
    outcome = await call(gw, ctx, body, model, ctx.stream, chain)
    if isinstance(outcome, Response):
        return outcome
    got, name, ep = outcome
    if isinstance(got, Whole):
        return send_whole(gw, ctx, got, name)
    return relay(gw, ctx, got, ep.kind, name, body)


@dataclasses.dataclass(frozen=True, slots=True)
class Whole:
    """A provider's whole answer: the bytes for the client (in its format) and what the row needs."""

    data: bytes
    text: str
    finish: str | None
    usage: fm.Usage


def send_whole(gw: Proxy, ctx: Ctx, got: Whole, name: str) -> Response:
    cost = answered(gw.config, ctx.row, name, got.text, got.finish, got.usage)
    ctx.reply_headers["x-tm-cost-usd"] = f"{cost:.8f}"
    return Response(got.data, status_code=200, media_type=JSON, headers=ctx.reply_headers)


def upstream_error_class(status: int) -> str:
    if status == 429:
        return "upstream_rate_limited"
    if status in (401, 403):
        return "upstream_auth"
    if status in (408, 504):
        return "upstream_timeout"
    if status == 413:
        return "upstream_too_large"
    if status >= 500:
        return "upstream_unavailable"
    return "upstream_bad_request"


def use(gw: Proxy, ctx: Ctx, name: str, ep: Endpoint) -> None:
    """Record that `name` (on `ep`) is the model being tried, in the row and the reply's headers."""
    ctx.row.data.update(model=name, provider=ep.name, upstream_model=gw.config.models[name].upstream or name)
    ctx.reply_headers.update({"x-tm-model": name, "x-tm-provider": ep.name})


def _upstream_failed(ctx: Ctx, status: int, error_class: str, message: str) -> Response:
    ctx.row.done(status=status, error_class=error_class, error_message=message)
    return error_response(ctx.fmt, status, message, ctx.reply_headers)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


async def call(gw: Proxy, ctx: Ctx, body: dict, model: str, stream: bool, preset: list[str] | None = None,
               ) -> tuple[aiohttp.ClientResponse | Whole, str, Endpoint] | Response:
    """Call `model`, falling back along its chain by failure class; every attempt goes into the row.
    Returns the answer of the attempt that succeeded (read whole, or the open response of a stream),
    or the error response to send. An answer the gateway cannot read is that provider's failure."""
    fmt, h, row, headers = ctx.fmt, ctx.client_headers, ctx.row, ctx.reply_headers
    config = gw.config
    origin = config.models[model].tier
    candidates = fallback.chain(model, config)
    for m in preset or []:
        # A preset is a prioritized chain: its models, each with its own fallbacks.
        candidates += [c for c in fallback.chain(m, config) if c not in candidates]
    cooling = [m for m in candidates if gw.cooldowns.cooling(m)]
    if len(cooling) < len(candidates):
        # Skip what is cooling down, unless that would leave nothing to try.
        candidates = [m for m in candidates if m not in cooling]
    attempts: list[dict] = [{"model": m, "outcome": "skipped: cooling down"} for m in cooling
                            if m not in candidates]
    row.data["attempts"] = attempts
    last: tuple[int, str, str] = (502, "upstream_unreachable", "no model could be tried")
    payloads: dict[tuple[str, str], bytes] = {}
    while candidates:
        name = candidates.pop(0)
        ep = gw.endpoints[config.models[name].provider]
        upstream = config.models[name].upstream or name
        use(gw, ctx, name, ep)
        key = (ep.kind, upstream)
        if key not in payloads:
            try:
                payloads[key] = _upstream_body(gw, fmt, ep, body, upstream, stream)
            except BadRequest as err:
                # This provider's format cannot carry the request; the next one in the chain may.
                attempts.append({"model": name, "provider": ep.name, "failure": fallback.CLIENT_ERROR,
                                 "outcome": f"not translatable: {err.message}"})
                last = (err.status, err.error_class, err.message)
                continue
            if gw.keep_warm is not None and ep.kind == "anthropic":
                gw.keep_warm.saw(ctx.row.data, name, payloads[key])
        n_keys = max(1, len(ep.keys))
        key_index, retried, waited = 0, False, False
        while True:
            started = time.perf_counter()
            attempt: dict[str, Any] = {"model": name, "provider": ep.name, "key": key_index}
            attempts.append(attempt)
            try:
                resp = await gw.session.post(gw.urls[ep.name], data=payloads[key], headers=ep.headers(key_index, h),
                                             timeout=gw.timeouts[ep.name])
            except TimeoutError:
                status, message, retry_after = 504, f"provider '{ep.name}' did not answer in time", None
                kind, error_class = fallback.TIMEOUT, "upstream_timeout"
            except aiohttp.ClientError as err:
                status, message, retry_after = 502, f"provider '{ep.name}' is unreachable ({type(err).__name__})", None
                kind, error_class = fallback.UNAVAILABLE, "upstream_unreachable"
            else:
                got = await _accept(gw, fmt, resp, name, ep, stream) if resp.status < 400 else None
                if isinstance(got, (aiohttp.ClientResponse, Whole)):
                    attempt.update(status=resp.status, ms=round((time.perf_counter() - started) * 1000, 1))
                    gw.cooldowns.clear(name)
                    if len(attempts) > 1:
                        headers["x-tm-attempts"] = str(len(attempts))
                    return got, name, ep
                if got is not None:  # a success status, but nothing the gateway can read: the next model
                    status, error_class, message = got
                    kind, retry_after = fallback.UNAVAILABLE, None
                else:
                    try:
                        data = await resp.read()
                    except (TimeoutError, aiohttp.ClientError):
                        data = b""
                    finally:
                        resp.release()
                    status = resp.status
                    message = (gw.scrub(fm.error_message_from_body(data))
                               or f"provider '{ep.name}' answered {status}")
                    retry_after = _seconds(resp.headers.get("retry-after"))
                    kind, error_class = fallback.classify_failure(status, message), upstream_error_class(status)
            attempt.update(status=status, failure=kind, ms=round((time.perf_counter() - started) * 1000, 1))
            last = (status, error_class, message)
            if kind == fallback.CLIENT_ERROR:
                if ep.kind == fmt:
                    return _upstream_failed(ctx, status, error_class, message)
                break  # it may be our translation it refused: the next model may take the request
            if kind in (fallback.RATE_LIMITED, fallback.AUTH) and key_index + 1 < n_keys:
                key_index += 1
                continue
            if kind == fallback.AUTH:
                return _upstream_failed(ctx, status, error_class, message)
            if kind == fallback.RATE_LIMITED and not waited and config.gateway.max_retry_wait_s > 0:
                waited = True
                await asyncio.sleep(min(retry_after or 0.5, config.gateway.max_retry_wait_s))
                continue
            if kind == fallback.TIMEOUT and not retried:
                retried = True
                continue
            if kind == fallback.CONTEXT_TOO_LONG:
                candidates = fallback.larger_context(name, candidates, config, origin)
            else:
                gw.cooldowns.trip(name)
            break
    status, error_class, message = last
    return _upstream_failed(ctx, status, error_class, message)


def _upstream_body(gw: Proxy, fmt: str, ep: Endpoint, body: dict, upstream_model: str, stream: bool) -> bytes:
    try:
        if ep.kind == fmt:
            out = fm.merge_system_messages(body) if fmt == "anthropic" else dict(body)
            out = {**out, "model": upstream_model}
            if fmt == "openai" and stream:
                # Ask for usage so the row has tokens and cost; the client only sees it if it asked.
                out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        elif fmt == "openai":
            out = fm.openai_request_to_anthropic(
                body, model=upstream_model, default_max_tokens=gw.config.gateway.default_max_tokens
            )
        else:
            out = fm.anthropic_request_to_openai(body, model=upstream_model)
    except fm.FormatError as err:
        raise BadRequest(400, "invalid_request", str(err)) from None
    if ep.kind == "anthropic":
        out = prompt_cache.add_breakpoints(gw.config, out)
    return orjson.dumps(out)


async def _accept(gw: Proxy, fmt: str, resp: aiohttp.ClientResponse, name: str, ep: Endpoint,
                  stream: bool) -> aiohttp.ClientResponse | Whole | tuple[int, str, str]:
    """A successful status's answer: read whole and checked, or, for a stream, the response once it
    is one (an HTML page or a JSON body instead of events is the provider's failure)."""
    if not stream:
        return await _read_whole(gw, fmt, resp, name, ep)
    if resp.content_type == SSE:
        return resp
    resp.close()
    return 502, "upstream_bad_response", (f"provider '{ep.name}' answered a streaming request with "
                                          f"'{resp.content_type}', not an event stream")


async def _read_whole(gw: Proxy, fmt: str, resp: aiohttp.ClientResponse, name: str,
                      ep: Endpoint) -> Whole | tuple[int, str, str]:
    """A whole (non-streamed) answer, read and translated to the caller's format; or what went wrong."""
    try:
        data = await resp.read()
    except (TimeoutError, aiohttp.ClientError) as err:
        return 502, "upstream_bad_response", f"provider '{ep.name}' broke off its answer ({type(err).__name__})"
    finally:
        resp.release()
    try:
        answer = orjson.loads(data)
    except ValueError:
        return 502, "upstream_bad_response", f"provider '{ep.name}' answered with something that is not JSON"
    try:
        schemas.check_answer(ep.kind, answer)
    except schemas.InvalidShape as err:
        return 502, "upstream_bad_response", gw.scrub(
            f"provider '{ep.name}' answered JSON of the wrong shape ({err})")
    if ep.kind == "anthropic":
        usage = fm.usage_from_anthropic(answer.get("usage"))
        text, finish = fm.response_text_anthropic(answer), fm.stop_reason_anthropic(answer)
    else:
        usage = fm.usage_from_openai(answer.get("usage"))
        text, finish = fm.response_text_openai(answer), fm.stop_reason_openai(answer)
    if ep.kind != fmt:
        convert = fm.anthropic_response_to_openai if fmt == "openai" else fm.openai_response_to_anthropic
        try:
            data = orjson.dumps(convert(answer, model=name))
        except fm.FormatError as err:
            return 502, "upstream_bad_response", f"provider '{ep.name}' gave an answer that cannot be translated: {err}"
    return Whole(data, text, finish, usage)
