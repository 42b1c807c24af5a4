"""The stream relay stage: a provider's server-sent events moved to the client as they arrive,
translated when the formats differ, while the row gathers text, usage and time to first token;
and a whole answer's text sent as a stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tm_gateway import schemas
from tm_gateway.stages.context import SSE, Ctx
from tm_gateway.stages.log import Row, costs, usage_fields
from tm_resources import formats as fm

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

log = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"


def relay(gw: Proxy, ctx: Ctx, resp: aiohttp.ClientResponse, upstream_kind: str, model: str,
          body: dict) -> Response:
    """The client's streaming response for a provider's open event stream; the row is written
    however it ends."""
    r = _StreamRelay(gw, ctx.fmt, upstream_kind, model, body, ctx.row)
    return _LoggedStream(r.run(resp), r, status_code=200, media_type=SSE,
                         headers={**ctx.reply_headers, "cache-control": "no-cache"})


def _sse_openai(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _sse_anthropic(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def text_stream(ctx: Ctx, text: str, model: str, body: dict, usage: fm.Usage | None = None) -> Response:
    """A whole answer's text sent as a stream in the caller's format (a cached or gated answer)."""
    rid = str(ctx.row.data["id"]).replace("-", "")
    events = fm.anthropic_text_events(text, model=model, id="msg_" + rid, usage=usage)
    if ctx.fmt == "anthropic":
        out = b"".join(_sse_anthropic(e, d) for e, d in events)
    else:
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        conv = fm.AnthropicToOpenAIStream(model=model, id="chatcmpl-" + rid, include_usage=wants_usage)
        chunks = [c for e, d in events for c in conv.feed(e, d)] + list(conv.finish())
        out = b"".join(_sse_openai(c) for c in chunks) + _DONE
    return Response(out, status_code=200, media_type=SSE, headers={**ctx.reply_headers, "cache-control": "no-cache"})


class _StreamRelay:
    """Moves server-sent events from the provider to the client as they arrive, translating between
    formats when they differ, while keeping what the row needs (text, usage, time to first token)."""

    def __init__(self, proxy: Proxy, fmt: str, upstream_kind: str, model: str, body: dict, row: Row):
        self.proxy = proxy
        self.fmt = fmt
        self.kind = upstream_kind
        self.model = model
        self.row = row
        self.completed = False
        self.ttft_ms: float | None = None
        self.acc = fm.AnthropicStreamAccumulator() if upstream_kind == "anthropic" else fm.OpenAIStreamAccumulator()
        self.wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = str(row.data["id"]).replace("-", "")
        self.to_openai = (
            fm.AnthropicToOpenAIStream(model=model, id="chatcmpl-" + rid, include_usage=self.wants_usage)
            if fmt == "openai" and upstream_kind == "anthropic" else None
        )
        self.to_anthropic = (
            fm.OpenAIToAnthropicStream(model=model, id="msg_" + rid)
            if fmt == "anthropic" and upstream_kind == "openai" else None
        )
        self.upstream_error: str | None = None
        self.error_class, self.error_status = "upstream_stream_error", 502

    def _data(self, data: str) -> Any:
        """One event's data, parsed and checked: what the rest of the relay reads is then of the right type."""
        parsed = orjson.loads(data)
        schemas.check_stream_event(self.kind, parsed)
        return parsed

    def _event(self, ev: fm.SSEEvent) -> bytes:
        if isinstance(self.acc, fm.OpenAIStreamAccumulator):  # self.kind == "openai"
            if ev.data == "[DONE]":
                return b""
            chunk = self._data(ev.data)
            if "error" in chunk and "choices" not in chunk:
                self.upstream_error = self.proxy.scrub(fm.error_message_from_body(chunk))
                return b""
            self.acc.feed(chunk)
            self._mark_first_token()
            if self.to_anthropic is not None:
                return b"".join(_sse_anthropic(e, d) for e, d in self.to_anthropic.feed(chunk))
            if not chunk.get("choices") and not self.wants_usage:
                return b""  # the usage chunk we asked for on the client's behalf
            return b"data: " + ev.data.encode() + b"\n\n"
        data = self._data(ev.data)
        etype = ev.event or data.get("type", "")
        if etype == "error":
            self.upstream_error = self.proxy.scrub(fm.error_message_from_body(data))
            return b""
        self.acc.feed(etype, data)
        self._mark_first_token()
        if self.to_openai is not None:
            return b"".join(_sse_openai(c) for c in self.to_openai.feed(etype, data))
        return fm.sse_encode(ev.data, etype)

    def _mark_first_token(self) -> None:
        if self.ttft_ms is None and self.acc.got_content:
            self.ttft_ms = (time.perf_counter() - self.row.started) * 1000

    def _tail(self) -> bytes:
        if self.to_openai is not None:
            return b"".join(_sse_openai(c) for c in self.to_openai.finish()) + _DONE
        if self.to_anthropic is not None:
            return b"".join(_sse_anthropic(e, d) for e, d in self.to_anthropic.finish())
        return _DONE if self.fmt == "openai" else b""

    def _error_event(self, message: str) -> bytes:
        if self.fmt == "openai":
            return _sse_openai(fm.openai_error(502, message))
        return _sse_anthropic("error", fm.anthropic_error(502, message))

    async def run(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        parser = fm.SSEParser()
        try:
            async for chunk in resp.content.iter_any():
                parts = []
                try:
                    for ev in parser.feed(chunk):
                        parts.append(self._event(ev))
                except ValueError as err:  # not JSON, or not the shape of that API's events
                    self.upstream_error = self.proxy.scrub(
                        f"provider '{self.row.data['provider']}' sent a malformed event ({err})")
                    self.error_class = "upstream_bad_response"
                out = b"".join(parts)
                if self.upstream_error is not None:
                    self._end()
                    yield out + self._error_event(self.upstream_error)
                    return
                if out:
                    yield out
            if not self._finished_upstream():
                self.upstream_error = "the provider ended the stream before its answer was complete"
                self._end()
                yield self._error_event(self.upstream_error)
            else:
                self._end()
                yield self._tail()
        except (TimeoutError, aiohttp.ClientError) as err:
            if isinstance(err, asyncio.TimeoutError):  # no byte for timeout_s: a timeout, as before the first byte
                self.upstream_error = "the provider's stream stalled past its timeout"
                self.error_class, self.error_status = "upstream_timeout", 504
            else:
                self.upstream_error = f"the provider's stream broke off ({type(err).__name__})"
            self._end()
            yield self._error_event(self.upstream_error)
        except Exception:  # a gateway bug: the client still gets an error event, and the row the truth
            log.exception("gateway error in the stream of request %s", self.row.data["id"])
            self.upstream_error = f"internal gateway error (request {self.row.data['id']})"
            self.error_class, self.error_status = "gateway_error", 500
            self._end()
            yield self._error_event(self.upstream_error)
        finally:
            if self.completed and self.upstream_error is None:
                resp.release()
            else:
                resp.close()  # drop the connection: the rest of a half-read stream is of no use

    def _end(self) -> None:
        # The row is queued before the last bytes go out, so a client that has read the whole
        # stream finds it logged.
        self.completed = True
        self.close()

    def _finished_upstream(self) -> bool:
        acc = self.acc
        return (acc.stop_reason if isinstance(acc, fm.AnthropicStreamAccumulator) else acc.finish_reason) is not None

    def close(self) -> None:
        """Called once the response is over, however it ended: writes the row."""
        acc = self.acc
        usage = acc.usage
        fields: dict[str, Any] = {
            "response_text": acc.log_text(),
            "finish_reason": acc.stop_reason if isinstance(acc, fm.AnthropicStreamAccumulator) else acc.finish_reason,
            "ttft_ms": self.ttft_ms,
            **dict(zip(("cost_usd", "baseline_cost_usd"), costs(self.proxy.config, self.model, usage), strict=True)),
            **usage_fields(usage),
        }
        if not self.completed:
            fields.update(status=499, error_class="client_disconnected",
                          error_message="the client closed the stream before it ended")
        elif self.upstream_error is not None:
            fields.update(status=self.error_status, error_class=self.error_class,
                          error_message=self.upstream_error)
        else:
            fields["status"] = 200
        self.row.done(**fields)


class _LoggedStream(StreamingResponse):
    """A streaming response that writes its row however the stream ends, a client hang-up included
    (Starlette cancels the sender then, and an unfinished generator would otherwise never run its `finally`)."""

    def __init__(self, content: AsyncIterator[bytes], relay: _StreamRelay, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(RuntimeError):  # never started, or already closed
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._relay.close()

