"""The parse-and-validate stage: the body read (within its size limit), parsed, checked against the
API's shape, its model alias resolved; and the texts that routing, the cache and the row read from it."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request

from tm_gateway import schemas
from tm_gateway.stages.context import BadRequest, Ctx
from tm_resources.prompts import person_text

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy


async def parse(gw: Proxy, request: Request, ctx: Ctx) -> tuple[dict, str | None]:
    """The request's body, checked whole, with its model name resolved through `aliases`; and what the
    row's route_reason should say of the alias."""
    body = await json_body(gw, request, ctx)
    _validate(ctx.fmt, body)
    try:
        schemas.check_request(ctx.fmt, body)
    except schemas.InvalidShape as err:
        raise BadRequest(400, "invalid_request", str(err)) from None
    body, alias = resolve_alias(gw, ctx, body)
    ctx.stream = body.get("stream", False)
    return body, alias


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


def system_and_prompt(fmt: str, body: dict) -> tuple[str | None, str]:
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


def task_text(body: dict) -> str:
    """The person's last words in the conversation (a turn of tool results has none of its own)."""
    for m in reversed(body["messages"]):
        if m.get("role") == "user" and (words := person_text(text_of(m.get("content")))):
            return words
    return ""


def counted_texts(body: dict) -> list[str]:
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


def unknown_model(name: str) -> BadRequest:
    return BadRequest(
        404, "model_not_found",
        f"model '{name}' is not configured here: name one that GET /v1/models lists (Claude Code: "
        "--model NAME or ANTHROPIC_MODEL=NAME; `auto` lets the gateway choose), or map this name to one "
        "in tm.yaml under `aliases` (e.g. 'claude-opus-*': tm:complex)")


def _too_large(limit: int) -> BadRequest:
    return BadRequest(413, "request_too_large", f"the request body is larger than {limit} bytes")


async def _read_body(gw: Proxy, request: Request, headers: dict[str, str]) -> bytes:
    limit = gw.config.gateway.max_body_bytes
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    # The ASGI messages read as they come (Starlette's request.stream() is an async generator over the
    # same loop, a few microseconds more per request); a client gone before its body has arrived is the
    # client's doing, not the gateway's (a 499 row, no traceback).
    receive = request.receive
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(499, "client_disconnected", "the client closed the connection before its request body "
                             "arrived")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def json_body(gw: Proxy, request: Request, ctx: Ctx) -> Any:
    raw = await _read_body(gw, request, ctx.client_headers)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise BadRequest(400, "invalid_json", f"the request body is not valid JSON: {err}") from None
    try:
        schemas.check_depth(raw, body)
    except schemas.InvalidShape as err:
        raise BadRequest(400, "invalid_json", str(err)) from None
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        ctx.row.data["requested_model"] = body["model"]
    return body


def resolve_alias(gw: Proxy, ctx: Ctx, body: dict) -> tuple[dict, str | None]:
    """The body with its model name resolved through `aliases` (routing, the cache and the row see
    the model, preset or `auto` it stands for), and what the row's route_reason should say of it."""
    asked = body["model"]
    target, pattern = gw.config.resolve_alias(asked)
    if pattern is None:
        return body, None
    ctx.row.data["requested_model"] = target
    ctx.reply_headers["x-tm-alias"] = f"{asked} -> {target}"
    return {**body, "model": target}, f"'{asked}' is an alias ({pattern}) of {target}"
