"""Short answers asked of a model off the request path (the loop's judge, the gateway's LLM tier
classifier): through the anthropic SDK for Anthropic providers and httpx for OpenAI-compatible ones.
The gateway's own proxying stays on aiohttp (docs/architecture.md says why)."""

from __future__ import annotations

import anthropic
import httpx
import orjson

from tm_resources import formats as fm
from tm_resources.providers import Endpoint


class Unreachable(Exception):
    """The provider could not be reached, or did not answer in time."""


class TextClient:
    """One provider's client for short, whole, temperature-0 answers; `aclose()` when done."""

    def __init__(self, ep: Endpoint, *, timeout_s: float | None = None) -> None:
        self.ep = ep
        total = timeout_s if timeout_s is not None else ep.timeout_s
        connect = min(ep.connect_timeout_s, total)
        if ep.kind == "anthropic":
            base = ep.url.removesuffix("/messages").removesuffix("/v1")
            # The key is always the configured one: a key given keeps the SDK from looking for its own
            # (ANTHROPIC_API_KEY, credential files), and a provider without one gets no auth header.
            headers: dict = dict(ep.extra_headers)
            if not ep.keys:
                headers["Authorization"] = anthropic.Omit()
            self._anthropic: anthropic.AsyncAnthropic | None = anthropic.AsyncAnthropic(
                api_key=ep.keys[0] if ep.keys else "none", base_url=base, max_retries=0,
                timeout=anthropic.Timeout(total, connect=connect), default_headers=headers)
            self._http: httpx.AsyncClient | None = None
        else:
            self._anthropic = None
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(total, connect=connect), headers=ep.headers())

    async def complete(self, upstream: str, messages: list[dict], max_tokens: int) -> str | None:
        """The answer's text, or None when the provider answered with an error status or a body that
        is not an answer. Raises `Unreachable` when it could not be reached or ran out of time."""
        body = {"model": upstream, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if self._anthropic is not None:
            req = fm.openai_request_to_anthropic(body, model=upstream, default_max_tokens=max_tokens)
            # The SDK (2.x) no longer takes sampling parameters: the model's own defaults apply.
            req.pop("temperature", None)
            try:
                msg = await self._anthropic.messages.create(**req)
            except (anthropic.APITimeoutError, anthropic.APIConnectionError) as err:
                raise Unreachable(type(err).__name__) from err
            except anthropic.APIError:
                return None
            return "".join(b.text for b in msg.content if b.type == "text")
        assert self._http is not None
        try:
            resp = await self._http.post(self.ep.url, content=orjson.dumps(body))
        except httpx.TransportError as err:
            raise Unreachable(type(err).__name__) from err
        if resp.status_code >= 400:
            return None
        try:
            return fm.response_text_openai(orjson.loads(resp.content))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    async def aclose(self) -> None:
        if self._anthropic is not None:
            await self._anthropic.close()
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> TextClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
