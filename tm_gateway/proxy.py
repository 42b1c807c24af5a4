"""One request through the gateway: parse, resolve the model, call the provider, answer in the caller's
format (streamed as it arrives, or whole), and leave exactly one row in the request log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp
import orjson
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tm_gateway.state import SharedState
from tm_gateway import fallback
from tm_gateway.logins import LoginGuard
from tm_gateway.requestlog import RequestLog
from tm_resources import cache
from tm_resources import formats as fm
from tm_resources import schemas
from tm_resources.ids import uuid7
from tm_resources.providers import Endpoint, complete_text
from tm_resources.providers import endpoints as provider_endpoints
from tm_resources.registry import with_registry
from tm_resources.config import Config, Tier
from tm_resources.dispatch import AGENT_HEADER, Dispatcher, apply_agent, resolve_agent
from tm_resources.embedder import fits_window, word_pieces
from tm_resources.gate import quick_gate
from tm_resources.prompts import person_text
from tm_resources.tiers import llm_tier_messages, parse_llm_tier
from tm_resources.rules import Route, auto_route, default_for, explore_draw, machine_chooses, route_request, tier_of

log = logging.getLogger(__name__)

JSON = "application/json"
SSE = "text/event-stream"
_DONE = b"data: [DONE]\n\n"


class BadRequest(Exception):
    """The client's fault: answered with a 4xx in its own format, and logged."""

    def __init__(self, status: int, error_class: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_class = error_class
        self.message = message


def error_response(fmt: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = fm.anthropic_error(status, message) if fmt == "anthropic" else fm.openai_error(status, message)
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


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


def text_of(content: Any) -> str:
    """Plain text of a message's content in either format (string, or a list of parts/blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def claude_code_session(metadata: Any, headers: dict[str, str]) -> str | None:
    """Claude Code's session id: metadata.user_id is a JSON string holding `session_id` in current
    versions, "user_<hash>_account_<uuid>_session_<uuid>" in older ones; some also send a header."""
    uid = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(uid, str):
        if uid.startswith("{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                held = orjson.loads(uid)
                if isinstance(held, dict) and isinstance(held.get("session_id"), str) and held["session_id"]:
                    return held["session_id"]
        elif "_session_" in uid:
            return uid.rsplit("_session_", 1)[1] or None
    return headers.get("x-claude-code-session-id") or None


def _validate(fmt: str, body: Any) -> None:
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_request", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "invalid_request", "'model' is required and must be a non-empty string")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "invalid_request", "'messages' is required and must be a non-empty array")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(400, "invalid_request", f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and fmt == "openai")):
            raise BadRequest(
                400, "invalid_request", f"messages[{i}].content must be a string or an array of content parts"
            )
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest(400, "invalid_request", "'stream' must be true or false")
    limit_key = "max_tokens"
    limit = body.get(limit_key)
    if fmt == "anthropic" and limit is None:
        raise BadRequest(400, "invalid_request", "'max_tokens' is required")
    if fmt == "openai" and limit is None:
        limit_key = "max_completion_tokens"
        limit = body.get(limit_key)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest(400, "invalid_request", f"'{limit_key}' must be a positive integer")


def _system_and_prompt(fmt: str, body: dict) -> tuple[str | None, str]:
    """The system text, and the last user turn as the person wrote it: what routing, task typing and
    the semantic cache judge (the blocks their client adds are left out; the row keeps the messages)."""
    msgs = body["messages"]
    parts = [text_of(m.get("content")) for m in msgs if m.get("role") in ("system", "developer")]
    if fmt == "anthropic" and body.get("system") is not None:
        parts.insert(0, text_of(body["system"]))
    system_text = "\n".join(parts) if parts else None
    prompt = ""
    for m in reversed(msgs):
        if m.get("role") == "user":
            prompt = person_text(text_of(m.get("content")))
            break
    return system_text, prompt


def _task_text(body: dict) -> str:
    """The person's last words in the conversation (a turn of tool results has none of its own)."""
    for m in reversed(body["messages"]):
        if m.get("role") == "user" and (words := person_text(text_of(m.get("content")))):
            return words
    return ""


def _counted_texts(body: dict) -> list[str]:
    """What a prompt's tokens are made of, as text: system, every message's content, the tools."""
    texts = [text_of(body.get("system"))]
    for m in body["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        blocks = content if isinstance(content, list) else [content]
        texts.extend(b if isinstance(b, str) else b["text"] if isinstance(b, dict) and isinstance(b.get("text"), str)
                     else orjson.dumps(b).decode() for b in blocks if b is not None)
    if body.get("tools"):
        texts.append(orjson.dumps(body["tools"]).decode())
    return texts


_NOT_PARAMS = frozenset(("model", "messages", "system"))


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A provider's whole answer: the bytes for the client (in its format) and what the row needs."""

    data: bytes
    text: str
    finish: str | None
    usage: fm.Usage


def _cascadable(body: dict) -> bool:
    # The gate reads text: requests that may end in tool calls, or ask for several choices, go straight.
    return not body.get("tools") and not body.get("functions") and body.get("n") in (None, 1)


def _json_asked(body: dict) -> bool | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    return None


class _Row:
    """The one row a request leaves; `done()` hands it to the log exactly once."""

    __slots__ = ("data", "started", "log", "written")

    def __init__(self, data: dict, started: float, request_log: RequestLog):
        self.data = data
        self.started = started
        self.log = request_log
        self.written = False

    def done(self, **fields: Any) -> None:
        if self.written:
            return
        self.written = True
        self.data.update(fields)
        if isinstance(self.data.get("attempts"), list):
            self.data["attempts"] = orjson.dumps(self.data["attempts"]).decode()
        self.data["latency_ms"] = (time.perf_counter() - self.started) * 1000
        self.log.write(self.data)


def _unknown_model(name: str) -> BadRequest:
    return BadRequest(
        404, "model_not_found",
        f"model '{name}' is not configured here: name one that GET /v1/models lists (Claude Code: "
        "--model NAME or ANTHROPIC_MODEL=NAME; `auto` lets the gateway choose), or map this name to one "
        "in tm.yaml under `aliases` (e.g. 'claude-opus-*': tm:complex)")


def _too_large(limit: int) -> BadRequest:
    return BadRequest(413, "request_too_large", f"the request body is larger than {limit} bytes")


def _backing_off(fmt: str, seconds: float) -> Response:
    wait = math.ceil(seconds)
    return error_response(fmt, 429, f"too many failed logins from this address: retry in {wait} s",
                          {"retry-after": str(wait)})


def _key_of(h: Any) -> str | None:
    auth = h.get("authorization")
    return auth[7:].strip() if auth and auth[:7].lower() == "bearer " else h.get("x-api-key")


def _headers(request: Request) -> dict[str, str]:
    # One pass over the raw headers: each lookup on Starlette's Headers scans the whole list.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}


class Proxy:
    def __init__(
        self,
        *,
        config: Config,
        session: aiohttp.ClientSession,
        shared: SharedState,
        request_log: RequestLog,
        scrub: Callable[[str], str],
        classify: Callable[[str], tuple[Any, str, float]] | None = None,
        cache_pool: AsyncConnectionPool | None = None,
        embed: Callable[[str], Any] | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        self.config = config
        self.session = session
        self.shared = shared
        self.cooldowns = fallback.Cooldowns(config.gateway.cooldown_s)
        self._base_config = config
        self._registry_seen = -1
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}
        self._sync_registry()
        self.request_log = request_log
        self.scrub = scrub
        # prompt -> (vector, task type, confidence); CPU work, run off the event loop.
        self.classify = classify
        # Postgres connections for cache lookups (None: no cache), and prompt -> vector for the
        # semantic cache of requests that name their model (cache.semantic.named_models).
        self.cache_pool = cache_pool
        self.embed = embed
        # Chooses an agent for requests addressed to the dispatcher (None: no agent has intents).
        self.dispatcher = dispatcher
        self.logins = LoginGuard(free=config.gateway.login_free_failures,
                                 max_backoff_s=config.gateway.login_backoff_max_s)

    # -- the parts --------------------------------------------------------------------------

    def _sync_registry(self) -> None:
        """Serve the deployed fine-tunes too: rebuilt only when the registry was re-read."""
        if self.shared.registry_version == self._registry_seen:
            return
        self._registry_seen = self.shared.registry_version
        self.config = with_registry(self._base_config, self.shared.registry)
        self.endpoints = provider_endpoints(self.config)
        self._timeouts = {
            name: aiohttp.ClientTimeout(total=None, connect=ep.connect_timeout_s, sock_read=ep.timeout_s)
            for name, ep in self.endpoints.items()
        }

    def authenticate(self, request: Request, headers: dict[str, str] | None = None) -> tuple[str, str] | None:
        return self.shared.lookup(_key_of(headers if headers is not None else request.headers))

    def login(self, request: Request, fmt: str, headers: dict[str, str] | None = None) -> tuple[str, str] | Response:
        """The (key id, user) of the request's key, or the 401 to answer; a 429 while its address is
        backing off after too many failures, whatever key it sends, so that ignoring the 429 makes
        guessing no faster (a valid key refused that way still leaves its row)."""
        h = headers if headers is not None else request.headers
        source = request.client.host if request.client else "unknown"
        wait = self.logins.retry_after(source)
        ident = self.authenticate(request, h)
        if wait > 0:
            refused = _backing_off(fmt, wait)
            if ident is not None:
                self.log_bodiless(request, fmt, ident, 429, error_class="login_backoff",
                                  error_message="too many failed logins from this address")
            return refused
        if ident is not None:
            return ident
        backoff = self.logins.failed(source, _key_of(h), request.scope["path"])
        if backoff > 0:
            return _backing_off(fmt, backoff)
        return error_response(
            fmt, 401, "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")

    def log_bodiless(self, request: Request, fmt: str, ident: tuple[str, str], status: int, *,
                     started: float | None = None, **fields: Any) -> uuid.UUID:
        """The row of a request that carries no prompt (a model listing, a refusal before the body is
        read, an unknown endpoint); returns its id."""
        rid = uuid7()
        self.request_log.write({
            "id": rid, "ts": datetime.now(timezone.utc), "user_id": ident[1], "api_key_id": ident[0],
            "api_format": fmt, "endpoint": request.scope["path"], "status": status,
            "latency_ms": (time.perf_counter() - started) * 1000 if started is not None else 0.0,
            "agent": request.headers.get("x-tm-agent"), **fields})
        return rid

    async def _read_body(self, request: Request, headers: dict[str, str]) -> bytes:
        limit = self.config.gateway.max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _classified(self, prompt: str, row: _Row) -> tuple[Any, str, float]:
        """The prompt's (vector, task type, confidence), computed once per request, off the event loop."""
        vec, task_type, confidence = await asyncio.get_running_loop().run_in_executor(None, self.classify, prompt)
        row.data["prompt_embedding"] = vec
        row.data["task_type"] = task_type
        return vec, task_type, confidence

    async def _agent(self, fmt: str, body: dict, h: dict[str, str], row: _Row,
                     headers: dict[str, str]) -> tuple[dict, tuple[Any, str, float] | None]:
        """The agent a request is for: named in x-tm-agent, or chosen by the dispatcher from the prompt
        when it is addressed to `dispatch.name`. The agent's system prompt and default parameters are
        applied; its model is what `auto` means (rules.default_for). Returns the body to send and the
        prompt's classification when dispatching computed it."""
        config = self.config
        name, dispatch = resolve_agent(h.get(AGENT_HEADER), config)
        classified = None
        if dispatch:
            row.data["agent"] = config.dispatch.name  # unless it finds one
            _, prompt = _system_and_prompt(fmt, body)
            if self.dispatcher is not None and prompt:
                vec = None
                if self.classify is not None:
                    classified = await self._classified(prompt, row)
                    vec = classified[0]
                decision = await asyncio.get_running_loop().run_in_executor(
                    None, self.dispatcher.classify, prompt, vec)
                name = decision.agent
                row.data["dispatch_reason"] = decision.reason
                headers["x-tm-dispatch"] = f"{name or 'none'}; confidence {decision.confidence:.2f}"
            else:
                headers["x-tm-dispatch"] = "none; no agent has intents or keywords"
        if name is not None:
            row.data["agent"] = name
            headers["x-tm-agent"] = name
            agent = config.agents.get(name)
            if agent is not None:
                body = apply_agent(body, fmt, agent)
        return body, classified

    async def choose_model(self, requested: str, prompt: str, row: _Row,
                           classified: tuple[Any, str, float] | None = None, task_text: str = "") -> Route:
        """Classify the task when the machine chooses, then let the rules in force decide. `task_text`:
        the person's last words when this turn has none of its own (a tool result): it picks the tier,
        so an agent's tool loop stays on the tier of the task it was given."""
        chooses = machine_chooses(requested, self.config)
        if not chooses and requested not in self.config.models:
            raise _unknown_model(requested)
        task_type, confidence, vec = None, 0.0, None
        if chooses and self.classify is not None and prompt:
            vec, task_type, confidence = classified or await self._classified(prompt, row)
        user = row.data["user_id"]
        config = self.config
        route = route_request(requested, task_type, user, self.shared.rules, config, agent=row.data["agent"],
                              explore=explore_draw(prompt or task_text))
        if route.route == "default" and requested == "auto":
            learned = self._learned(vec, user)
            tier = tier_of(prompt or task_text, task_type, confidence, config)
            if tier is not None and learned is None and tier[1] < config.routing.tiers.min_confidence \
                    and config.routing.tiers.llm_classifier:
                tier = await self._llm_tier(prompt or task_text, tier)
            route = auto_route(route, tier=tier, task_type=task_type, learned=learned, config=config)
            route = self._without_premium(route, user)
        row.data["route"] = route.route
        dispatched = row.data.pop("dispatch_reason", None)
        row.data["route_reason"] = f"dispatched to {dispatched}; {route.reason}" if dispatched else route.reason
        if config.models[route.model].tier is Tier.premium and not self._premium_allowed(user):
            raise BadRequest(403, "premium_not_allowed",
                             f"'{route.model}' is a premium model and user '{user}' is not allowed premium "
                             "models; ask an admin to set users.<you>.premium in tm.yaml, or use another model")
        return route

    def _alias(self, body: dict, row: _Row, headers: dict[str, str]) -> tuple[dict, str | None]:
        """The body with its model name resolved through `aliases` (routing, the cache and the row see
        the model, preset or `auto` it stands for), and what the row's route_reason should say of it."""
        asked = body["model"]
        target, pattern = self.config.resolve_alias(asked)
        if pattern is None:
            return body, None
        row.data["requested_model"] = target
        headers["x-tm-alias"] = f"{asked} -> {target}"
        return {**body, "model": target}, f"'{asked}' is an alias ({pattern}) of {target}"

    async def _llm_tier(self, prompt: str, unsure: tuple[str, float, str]) -> tuple[str, float, str]:
        """routing.tiers.llm_classifier's tier for a prompt the signals and the task type are both
        unsure about; what they said when it cannot answer in time."""
        tiers = self.config.routing.tiers
        model = tiers.llm_classifier
        mcfg = self.config.models[model]
        ep = self.endpoints[mcfg.provider]
        try:
            async with asyncio.timeout(tiers.llm_timeout_s):
                text = await complete_text(self.session, ep, mcfg.upstream or model, llm_tier_messages(prompt), 8)
        except Exception as err:  # noqa: BLE001 - an unsure tier is still a tier; never fail the request
            log.info("tier classifier %s did not answer (%s): keeping %s", model, type(err).__name__, unsure[0])
            return unsure
        asked = parse_llm_tier(text)
        if asked is None:
            return unsure
        return asked.value, unsure[1], f"{model} asked; the signals said {unsure[0]}"

    def _premium_allowed(self, user: str) -> bool:
        allowed = self.config.users.get(user)
        return allowed is not None and allowed.premium

    def _without_premium(self, route: Route, user: str) -> Route:
        """The machine never chooses a premium model for a user who may not use one."""
        if self._premium_allowed(user):
            return route
        models = self.config.models
        ok = [m for m in (route.model, *route.chain) if models[m].tier is not Tier.premium]
        top = route.escalate_to if route.escalate_to and models[route.escalate_to].tier is not Tier.premium else None
        if ok and ok[0] == route.model and len(ok) == 1 + len(route.chain) and top == route.escalate_to:
            return route
        if not ok:
            default = self.config.defaults.model
            return Route(default, "default", f"{route.reason}; premium models left out: the default {default}")
        return dataclasses.replace(route, model=ok[0], chain=tuple(ok[1:]), escalate_to=top,
                                   reason=f"{route.reason}; premium models left out")

    def _learned(self, vec: Any, user: str) -> tuple[str, str] | None:
        settings = self.config.routing.learned
        learned = self.shared.learned
        if not settings.enabled or learned is None or vec is None:
            return None
        allowed = [m for m, c in self.config.models.items()
                   if c.tier is not Tier.premium or self._premium_allowed(user)]
        choice = learned.choose(vec, allowed=allowed, cost_weight=settings.cost_weight,
                                min_quality=settings.min_quality)
        return None if choice is None else (choice.arm, f"learned router: {choice.reason}")

    def _upstream_body(self, fmt: str, ep: Endpoint, body: dict, upstream_model: str, stream: bool) -> bytes:
        try:
            if ep.kind == fmt:
                out = fm.merge_system_messages(body) if fmt == "anthropic" else dict(body)
                out = {**out, "model": upstream_model}
                if fmt == "openai" and stream:
                    # Ask for usage so the row has tokens and cost; the client only sees it if it asked.
                    out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            elif fmt == "openai":
                out = fm.openai_request_to_anthropic(
                    body, model=upstream_model, default_max_tokens=self.config.gateway.default_max_tokens
                )
            else:
                out = fm.anthropic_request_to_openai(body, model=upstream_model)
        except fm.FormatError as err:
            raise BadRequest(400, "invalid_request", str(err)) from None
        return orjson.dumps(out)

    # -- the request ------------------------------------------------------------------------

    async def handle(self, request: Request, fmt: str, answer: Callable | None = None) -> Response:
        """One request, whoever answers it (`answer`, by default a model call): authenticated, and
        logged in exactly one row however it ends."""
        started = time.perf_counter()
        self._sync_registry()
        h = _headers(request)
        ident = self.login(request, fmt, h)
        if isinstance(ident, Response):
            return ident
        rid = uuid7()
        row = _Row(
            {
                "id": rid,
                "ts": datetime.now(timezone.utc),
                "user_id": ident[1],
                "api_key_id": ident[0],
                "api_format": fmt,
                "endpoint": request.scope["path"],
                "session_id": h.get("x-tm-session") or h.get("x-session-id"),
                "agent": h.get("x-tm-agent"),
                "stream": False,
            },
            started,
            self.request_log,
        )
        headers = {"x-tm-request-id": str(rid)}
        try:
            return await (answer or self._handle)(request, h, fmt, row, headers)
        except BadRequest as err:
            row.done(status=err.status, error_class=err.error_class, error_message=err.message)
            return error_response(fmt, err.status, err.message, headers)
        except BaseException as err:
            if not isinstance(err, Exception):
                row.done(status=499, error_class="cancelled", error_message="the request was cancelled")
                raise
            log.exception("gateway error on request %s", rid)
            row.done(status=500, error_class="gateway_error", error_message=type(err).__name__)
            return error_response(fmt, 500, f"internal gateway error (request {rid})", headers)

    async def _handle(self, request: Request, h: dict[str, str], fmt: str, row: _Row,
                      headers: dict[str, str]) -> Response:
        body = await self._json_body(request, h, row)
        _validate(fmt, body)
        try:
            schemas.check_request(fmt, body)
        except schemas.InvalidShape as err:
            raise BadRequest(400, "invalid_request", str(err)) from None
        body, alias = self._alias(body, row, headers)
        stream = body.get("stream", False)
        body, dispatched = await self._agent(fmt, body, h, row, headers)
        system, prompt = _system_and_prompt(fmt, body)
        # The row's prompt stays this turn's own: the loop would read a task repeated on each tool
        # turn as the person asking again.
        route = await self.choose_model(body["model"], prompt, row, dispatched, "" if prompt else _task_text(body))
        if alias:
            row.data["route_reason"] = f"{alias}; {row.data['route_reason']}"
        r = row.data
        r.update(
            stream=stream,
            system=system,
            prompt=prompt,
            messages=orjson.dumps(body["messages"]).decode(),
            params=orjson.dumps({k: v for k, v in body.items() if k not in _NOT_PARAMS}).decode(),
        )
        if fmt == "anthropic" and r["session_id"] is None:
            r["session_id"] = claude_code_session(body.get("metadata"), h)
        headers["x-tm-route"] = route.route
        if self.cache_pool is not None:
            hit = await self._cache_lookup(body, h, row, headers)
            if hit is not None:
                return self._serve_cached(fmt, hit, stream, body, row, headers)

        if route.escalate_to and _cascadable(body):
            return await self._cascade(fmt, body, route, prompt, stream, h, row, headers)
        return await self._answer(fmt, body, route.model, list(route.chain), stream, h, row, headers)

    async def _json_body(self, request: Request, h: dict[str, str], row: _Row) -> Any:
        raw = await self._read_body(request, h)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise BadRequest(400, "invalid_json", f"the request body is not valid JSON: {err}") from None
        try:
            schemas.check_depth(raw, body)
        except schemas.InvalidShape as err:
            raise BadRequest(400, "invalid_json", str(err)) from None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            row.data["requested_model"] = body["model"]
        return body

    async def count_tokens(self, request: Request, h: dict[str, str], fmt: str, row: _Row,
                           headers: dict[str, str]) -> Response:
        """POST /v1/messages/count_tokens: the request's input tokens for the model it names, counted by
        the provider when it has an endpoint for it (Anthropic's), else by a local tokenizer (header
        x-tm-token-counter). Its row has route 'count_tokens' and no tokens or cost, so spend and the
        loop (which reads only completion endpoints) leave it out."""
        body = await self._json_body(request, h, row)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            raise BadRequest(400, "invalid_request", "'model' is required and must be a non-empty string")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise BadRequest(400, "invalid_request", "'messages' is required and must be a non-empty array")
        body, alias = self._alias(body, row, headers)
        if row.data["session_id"] is None:
            row.data["session_id"] = claude_code_session(body.get("metadata"), h)
        requested = body["model"]
        if machine_chooses(requested, self.config):
            # Which model answers depends on the prompt; counting need not classify it: the model
            # the request would get with no rule, tier or cascade (a preset's first, the default).
            model = default_for(requested, row.data["user_id"], row.data["agent"], self.config).model
        elif requested in self.config.models:
            model = requested
        else:
            raise _unknown_model(requested)
        mcfg = self.config.models[model]
        ep = self.endpoints[mcfg.provider]
        self._use(row, headers, model, ep)
        n, counter = None, "local"
        if ep.kind == "anthropic":
            n, counter = await self._provider_count(body, mcfg.upstream or model, ep, h)
        if n is None:
            text = "\n".join(_counted_texts(body))
            n = await asyncio.get_running_loop().run_in_executor(None, word_pieces, text)
        headers["x-tm-token-counter"] = counter
        row.done(status=200, route="count_tokens", attempts=[],
                 route_reason="; ".join(filter(None, (alias, f"{n} input tokens, counted by {counter}"))))
        return Response(orjson.dumps({"input_tokens": n}), status_code=200, media_type=JSON, headers=headers)

    async def _provider_count(self, body: dict, upstream: str, ep: Endpoint,
                              h: dict[str, str]) -> tuple[int | None, str]:
        """Anthropic's own count_tokens; (None, why not) when it cannot answer, and the local count
        stands in. A request it refuses as malformed is the caller's to fix: answered as it said."""
        url = ep.url.removesuffix("/messages") + "/messages/count_tokens"
        try:
            payload = orjson.dumps({**fm.merge_system_messages(body), "model": upstream})
        except fm.FormatError as err:
            raise BadRequest(400, "invalid_request", str(err)) from None
        try:
            async with self.session.post(url, data=payload, headers=ep.headers(0, h),
                                         timeout=self._timeouts[ep.name]) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            return None, f"local ({ep.name} unreachable: {type(err).__name__})"
        if status == 400:
            raise BadRequest(400, "upstream_bad_request", self.scrub(fm.error_message_from_body(data)))
        with contextlib.suppress(ValueError, AttributeError):
            n = orjson.loads(data).get("input_tokens") if status == 200 else None
            if isinstance(n, int) and not isinstance(n, bool):
                return n, ep.name
        return None, f"local ({ep.name} answered {status})"

    async def _answer(self, fmt: str, body: dict, model: str, chain: list[str], stream: bool, h: dict[str, str],
                      row: _Row, headers: dict[str, str]) -> Response:
        """Call `model` (falling back along its chain, then `chain`) and answer, streamed or whole."""
        outcome = await self._call(fmt, body, model, stream, h, row, headers, chain)
        if isinstance(outcome, Response):
            return outcome
        got, name, ep = outcome
        if isinstance(got, _Whole):
            return self._send_whole(got, name, row, headers)
        relay = _StreamRelay(self, fmt, ep.kind, name, body, row)
        return _LoggedStream(relay.run(got), relay, status_code=200, media_type=SSE,
                             headers={**headers, "cache-control": "no-cache"})

    async def _accept(self, fmt: str, resp: aiohttp.ClientResponse, name: str, ep: Endpoint,
                      stream: bool) -> aiohttp.ClientResponse | _Whole | tuple[int, str, str]:
        """A successful status's answer: read whole and checked, or, for a stream, the response once it
        is one (an HTML page or a JSON body instead of events is the provider's failure)."""
        if not stream:
            return await self._read_whole(fmt, resp, name, ep)
        if resp.content_type == SSE:
            return resp
        resp.close()
        return 502, "upstream_bad_response", (f"provider '{ep.name}' answered a streaming request with "
                                              f"'{resp.content_type}', not an event stream")

    async def _read_whole(self, fmt: str, resp: aiohttp.ClientResponse, name: str,
                          ep: Endpoint) -> _Whole | tuple[int, str, str]:
        """A whole (non-streamed) answer, read and translated to the caller's format; or what went wrong."""
        try:
            data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
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
            return 502, "upstream_bad_response", self.scrub(
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
        return _Whole(data, text, finish, usage)

    def _send_whole(self, got: _Whole, name: str, row: _Row, headers: dict[str, str]) -> Response:
        cost, baseline = self._costs(name, got.usage)
        row.done(status=200, response_text=got.text, finish_reason=got.finish, cost_usd=cost,
                 baseline_cost_usd=baseline, **_usage_fields(got.usage))
        headers["x-tm-cost-usd"] = f"{cost:.8f}"
        return Response(got.data, status_code=200, media_type=JSON, headers=headers)

    async def _cascade(self, fmt: str, body: dict, route: Route, prompt: str, stream: bool, h: dict[str, str],
                       row: _Row, headers: dict[str, str]) -> Response:
        """The cheap model answers first (whole, so the gate can read it); if its answer fails the quick
        gate, or it cannot answer, the escalation model answers. The user's answer is `row`; a replaced
        cheap answer gets a row of its own (served = false), which the answer's row names as parent_id."""
        first = _Row({**row.data, "id": uuid7(), "served": False, "request_hash": None, "context_hash": None},
                     row.started, self.request_log)
        scratch: dict[str, str] = {}
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        outcome = await self._call(fmt, plain, route.model, False, h, first, scratch, list(route.chain))
        if isinstance(outcome, Response):
            reasons = [f"no answer ({first.data.get('error_class')})"]  # its row is written, as failed
        else:
            got, name, ep = outcome  # whole: it was not asked to stream
            verdict = quick_gate(prompt, got.text, finish_reason=got.finish, expect_json=_json_asked(body))
            if verdict.passed:
                row.data.update({k: first.data[k] for k in ("model", "provider", "upstream_model", "attempts")})
                row.data["route_reason"] = f"{route.reason}; {name} passed the gate"
                headers.update(scratch)
                headers["x-tm-cascade"] = "passed"
                if not stream:
                    return self._send_whole(got, name, row, headers)
                cost, baseline = self._costs(name, got.usage)
                row.done(status=200, response_text=got.text, finish_reason=got.finish, cost_usd=cost,
                         baseline_cost_usd=baseline, **_usage_fields(got.usage))
                return self._text_stream(fmt, got.text, name, body, row, headers, got.usage)
            reasons = verdict.reasons
            cost, baseline = self._costs(name, got.usage)
            first.done(status=200, response_text=got.text, finish_reason=got.finish, cost_usd=cost,
                       baseline_cost_usd=baseline, route_reason=f"{route.reason}; failed the gate: "
                       + "; ".join(reasons), **_usage_fields(got.usage))
        why = "; ".join(reasons)
        row.data.update(parent_id=first.data["id"], route_reason=f"{route.reason}; escalated: {why}")
        headers["x-tm-cascade"] = f"escalated: {why}"
        headers["x-tm-cascade-first"] = str(first.data["id"])
        return await self._answer(fmt, body, route.escalate_to, [], stream, h, row, headers)

    def _text_stream(self, fmt: str, text: str, model: str, body: dict, row: _Row, headers: dict[str, str],
                     usage: fm.Usage | None = None) -> Response:
        """A whole answer's text sent as a stream in the caller's format (a cached or gated answer)."""
        rid = str(row.data["id"]).replace("-", "")
        events = fm.anthropic_text_events(text, model=model, id="msg_" + rid, usage=usage)
        if fmt == "anthropic":
            out = b"".join(_sse_anthropic(e, d) for e, d in events)
        else:
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            conv = fm.AnthropicToOpenAIStream(model=model, id="chatcmpl-" + rid, include_usage=wants_usage)
            chunks = [c for e, d in events for c in conv.feed(e, d)] + list(conv.finish())
            out = b"".join(_sse_openai(c) for c in chunks) + _DONE
        return Response(out, status_code=200, media_type=SSE, headers={**headers, "cache-control": "no-cache"})

    # -- the cache --------------------------------------------------------------------------

    async def _cache_lookup(self, body: dict, h: dict[str, str], row: _Row,
                            headers: dict[str, str]) -> cache.Hit | None:
        """Exact, then semantic (only for a prompt its vector covers whole: a long one is embedded
        from its opening only). Never fails the request: a slow or unreachable database is a miss."""
        directives = h.get("cache-control", "").lower()
        if h.get("x-tm-cache", "").strip().lower() in ("off", "no", "false", "0", "bypass") \
                or "no-cache" in directives or "no-store" in directives:
            headers["x-tm-cache"] = "off"
            return None
        keys = cache.keys(body, row.data["agent"])
        r = row.data
        r["request_hash"], r["context_hash"] = keys.request_hash, keys.context_hash
        config = self.config
        users = cache.scope_users(r["user_id"], config)
        headers["x-tm-cache"] = "miss"
        # Postgres is asked only for what may be there: an exact hash some replica has logged, a prompt
        # with a vector in a context that has semantic entries.
        hashes, contexts = self.shared.hashes, self.shared.contexts
        exact = hashes is None or hashes.may_have(keys.request_hash)
        vec = r.get("prompt_embedding")
        semantic = config.cache.semantic
        similar = keys.context_hash is not None and semantic.enabled and bool(r.get("prompt")) \
            and (contexts is None or contexts.may_have(keys.context_hash, r["requested_model"])) \
            and (vec is not None or (self.embed is not None and semantic.named_models)) \
            and fits_window([r["prompt"]])[0]
        if hashes is not None:
            hashes.add(keys.request_hash)
        if not (exact or similar):
            return None
        try:
            async with asyncio.timeout(config.cache.lookup_timeout_s):
                if similar and vec is None:  # a named model's prompt (semantic.named_models): embedded
                    # before a pooled connection is taken, not while holding one
                    vec = await asyncio.get_running_loop().run_in_executor(None, self.embed, r["prompt"])
                    r["prompt_embedding"] = vec
                async with self.cache_pool.connection() as conn:
                    hit = await cache.lookup_exact(conn, keys, users, config) if exact else None
                    if hit is None and similar:
                        hit = await cache.lookup_semantic(conn, r["requested_model"], keys, vec, users, config)
        except Exception as err:  # noqa: BLE001 - a cache problem must never cost the user their answer
            log.warning("cache lookup skipped: %s", type(err).__name__)
            headers["x-tm-cache"] = "error"
            return None
        if hit is not None and hit.model is not None and hit.model not in config.models:
            return None  # answered by a model no longer served (a rolled-back fine-tune)
        return hit

    def _serve_cached(self, fmt: str, hit: cache.Hit, stream: bool, body: dict, row: _Row,
                      headers: dict[str, str]) -> Response:
        """The stored answer, in the caller's format (streamed when asked), for nothing; the row says
        where it came from and what the frontier would have charged for it."""
        model = hit.model or row.data["requested_model"]
        rid = str(row.data["id"]).replace("-", "")
        how = (f"same request as {hit.source_id}" if hit.kind == "exact"
               else f"prompt {hit.similarity:.3f} similar to {hit.source_id}, an answer the loop scored well")
        route = f"cache:{hit.kind}"
        row.data.update(route=route, route_reason=how)
        row.done(status=200, model=model, provider="cache", upstream_model=None, response_text=hit.text,
                 finish_reason="stop" if fmt == "openai" else "end_turn", cost_usd=0.0,
                 baseline_cost_usd=hit.baseline_cost_usd, cache_hit=hit.kind, cache_source_id=hit.source_id,
                 cache_similarity=hit.similarity, attempts=[])
        headers.update({"x-tm-cache": hit.kind, "x-tm-cache-source": str(hit.source_id), "x-tm-model": model,
                        "x-tm-provider": "cache", "x-tm-route": route, "x-tm-cost-usd": f"{0:.8f}"})
        if stream:
            return self._text_stream(fmt, hit.text, model, body, row, headers)
        answer = fm.anthropic_text_message(hit.text, model=model, id="msg_" + rid)
        if fmt == "openai":
            answer = fm.anthropic_response_to_openai(answer, model=model)
            answer["id"] = "chatcmpl-" + rid
        return Response(orjson.dumps(answer), status_code=200, media_type=JSON, headers=headers)

    def _use(self, row: _Row, headers: dict[str, str], name: str, ep: Endpoint) -> None:
        row.data.update(model=name, provider=ep.name, upstream_model=self.config.models[name].upstream or name)
        headers.update({"x-tm-model": name, "x-tm-provider": ep.name})

    async def _call(self, fmt: str, body: dict, model: str, stream: bool, h: dict[str, str], row: _Row,
                    headers: dict[str, str], preset: list[str] | None = None,
                    ) -> tuple[aiohttp.ClientResponse | _Whole, str, Endpoint] | Response:
        """Call `model`, falling back along its chain by failure class; every attempt goes into the row.
        Returns the answer of the attempt that succeeded (read whole, or the open response of a stream),
        or the error response to send. An answer the gateway cannot read is that provider's failure."""
        config = self.config
        origin = config.models[model].tier
        candidates = fallback.chain(model, config)
        for m in preset or []:
            # A preset is a prioritized chain: its models, each with its own fallbacks.
            candidates += [c for c in fallback.chain(m, config) if c not in candidates]
        cooling = [m for m in candidates if self.cooldowns.cooling(m)]
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
            ep = self.endpoints[config.models[name].provider]
            upstream = config.models[name].upstream or name
            self._use(row, headers, name, ep)
            key = (ep.kind, upstream)
            if key not in payloads:
                try:
                    payloads[key] = self._upstream_body(fmt, ep, body, upstream, stream)
                except BadRequest as err:
                    # This provider's format cannot carry the request; the next one in the chain may.
                    attempts.append({"model": name, "provider": ep.name, "failure": fallback.CLIENT_ERROR,
                                     "outcome": f"not translatable: {err.message}"})
                    last = (err.status, err.error_class, err.message)
                    continue
            n_keys = max(1, len(ep.keys))
            key_index, retried, waited = 0, False, False
            while True:
                started = time.perf_counter()
                attempt: dict[str, Any] = {"model": name, "provider": ep.name, "key": key_index}
                attempts.append(attempt)
                try:
                    resp = await self.session.post(ep.url, data=payloads[key], headers=ep.headers(key_index, h),
                                                   timeout=self._timeouts[ep.name])
                except asyncio.TimeoutError:
                    status, message, retry_after = 504, f"provider '{ep.name}' did not answer in time", None
                    kind, error_class = fallback.TIMEOUT, "upstream_timeout"
                except aiohttp.ClientError as err:
                    status, message, retry_after = 502, f"provider '{ep.name}' is unreachable ({type(err).__name__})", None
                    kind, error_class = fallback.UNAVAILABLE, "upstream_unreachable"
                else:
                    got = await self._accept(fmt, resp, name, ep, stream) if resp.status < 400 else None
                    if isinstance(got, (aiohttp.ClientResponse, _Whole)):
                        attempt.update(status=resp.status, ms=round((time.perf_counter() - started) * 1000, 1))
                        self.cooldowns.clear(name)
                        if len(attempts) > 1:
                            headers["x-tm-attempts"] = str(len(attempts))
                        return got, name, ep
                    if got is not None:  # a success status, but nothing the gateway can read: the next model
                        status, error_class, message = got
                        kind, retry_after = fallback.UNAVAILABLE, None
                    else:
                        try:
                            data = await resp.read()
                        except (aiohttp.ClientError, asyncio.TimeoutError):
                            data = b""
                        finally:
                            resp.release()
                        status = resp.status
                        message = (self.scrub(fm.error_message_from_body(data))
                                   or f"provider '{ep.name}' answered {status}")
                        retry_after = _seconds(resp.headers.get("retry-after"))
                        kind, error_class = fallback.classify_failure(status, message), upstream_error_class(status)
                attempt.update(status=status, failure=kind, ms=round((time.perf_counter() - started) * 1000, 1))
                last = (status, error_class, message)
                if kind == fallback.CLIENT_ERROR:
                    if ep.kind == fmt:
                        return self._upstream_failed(fmt, row, headers, status, error_class, message)
                    break  # it may be our translation it refused: the next model may take the request
                if kind in (fallback.RATE_LIMITED, fallback.AUTH) and key_index + 1 < n_keys:
                    key_index += 1
                    continue
                if kind == fallback.AUTH:
                    return self._upstream_failed(fmt, row, headers, status, error_class, message)
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
                    self.cooldowns.trip(name)
                break
        status, error_class, message = last
        return self._upstream_failed(fmt, row, headers, status, error_class, message)

    def _upstream_failed(self, fmt: str, row: _Row, headers: dict, status: int, error_class: str, message: str) -> Response:
        row.done(status=status, error_class=error_class, error_message=message)
        return error_response(fmt, status, message, headers)

    def _costs(self, model: str, usage: fm.Usage) -> tuple[float, float | None]:
        """What the request cost, and what it would have cost on the configured frontier model."""
        args = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
        frontier = self.config.defaults.frontier_model
        baseline = self.config.models[frontier].price.cost(*args) if frontier else None
        return self.config.models[model].price.cost(*args), baseline


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _usage_fields(u: fm.Usage) -> dict[str, int]:
    # Usage's fields are named as the row's token columns.
    return dataclasses.asdict(u)


def _sse_openai(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _sse_anthropic(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _StreamRelay:
    """Moves server-sent events from the provider to the client as they arrive, translating between
    formats when they differ, while keeping what the row needs (text, usage, time to first token)."""

    def __init__(self, proxy: Proxy, fmt: str, upstream_kind: str, model: str, body: dict, row: _Row):
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
        if self.kind == "openai":
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
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
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
        return (acc.stop_reason if self.kind == "anthropic" else acc.finish_reason) is not None

    def close(self) -> None:
        """Called once the response is over, however it ended: writes the row."""
        acc = self.acc
        usage = acc.usage
        fields: dict[str, Any] = {
            "response_text": acc.log_text(),
            "finish_reason": acc.stop_reason if self.kind == "anthropic" else acc.finish_reason,
            "ttft_ms": self.ttft_ms,
            **dict(zip(("cost_usd", "baseline_cost_usd"), self.proxy._costs(self.model, usage))),
            **_usage_fields(usage),
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

