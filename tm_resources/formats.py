"""Translate between the OpenAI Chat Completions and Anthropic Messages wire formats, both ways."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

__all__ = [
    "FormatError",
    "Usage",
    "usage_from_anthropic",
    "usage_from_openai",
    "usage_to_anthropic",
    "usage_to_openai",
    "openai_request_to_anthropic",
    "anthropic_request_to_openai",
    "merge_system_messages",
    "anthropic_response_to_openai",
    "openai_response_to_anthropic",
    "response_text_openai",
    "response_text_anthropic",
    "stop_reason_openai",
    "stop_reason_anthropic",
    "SSEEvent",
    "SSEParser",
    "sse_encode",
    "OpenAIStreamAccumulator",
    "AnthropicStreamAccumulator",
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "openai_error",
    "anthropic_error",
    "error_message_from_body",
]


class FormatError(ValueError):
    """A body that cannot be translated; the message is shown to the API caller as is."""


_COMPACT = (",", ":")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=_COMPACT, ensure_ascii=False)


def _int(v) -> int:
    # Servers send null, floats or omit fields; usage must never break a response.
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float):
        return int(v)
    return 0


# ---------------------------------------------------------------- usage


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # uncached prompt tokens
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


def usage_from_anthropic(u: dict | None) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        _int(u.get("input_tokens")),
        _int(u.get("output_tokens")),
        _int(u.get("cache_read_input_tokens")),
        _int(u.get("cache_creation_input_tokens")),
    )


def usage_from_openai(u: dict | None) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    prompt = _int(u.get("prompt_tokens"))
    details = u.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = _int(details.get("cached_tokens"))
        # Not OpenAI's own field, but some OpenAI-compatible routers report cache writes here.
        written = _int(details.get("cache_write_tokens"))
    else:
        # DeepSeek-style servers report the cache hit at top level.
        cached = _int(u.get("prompt_cache_hit_tokens"))
        written = 0
    return Usage(
        max(prompt - cached - written, 0),
        _int(u.get("completion_tokens")),
        cached,
        written,
    )


def usage_to_anthropic(u: Usage) -> dict:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
    }


def usage_to_openai(u: Usage) -> dict:
    prompt = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens},
    }


# ---------------------------------------------------------------- stop reasons

_A2O_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}
_O2A_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _finish_from_anthropic(stop_reason, has_tools: bool) -> str:
    r = _A2O_STOP.get(stop_reason)
    if r is None:
        r = "tool_calls" if has_tools else "stop"
    return r


def _stop_from_openai(finish_reason, has_tools: bool) -> str:
    r = _O2A_STOP.get(finish_reason, "end_turn")
    # Some local servers (older Ollama, some vLLM parsers) say "stop" after emitting tool calls;
    # Anthropic clients run tools only when stop_reason is tool_use.
    if has_tools and r == "end_turn":
        r = "tool_use"
    return r


# ---------------------------------------------------------------- request helpers


def _parse_data_url(url: str, path: str) -> tuple[str, str]:
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise FormatError(f"{path} must be a base64 data: URL (data:<media type>;base64,<data>)")
    return head[5:-7], data


def _openai_image(part: dict, path: str) -> dict:
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise FormatError(f"{path}.image_url.url must be a non-empty string")
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url, f"{path}.image_url.url")
        block = {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    elif url.startswith(("http://", "https://")):
        block = {"type": "image", "source": {"type": "url", "url": url}}
    else:
        raise FormatError(f"{path}.image_url.url must be a data: URL or an http(s) URL")
    cc = part.get("cache_control")
    if cc is not None:
        block["cache_control"] = cc
    return block


def _openai_file(part: dict, path: str) -> dict:
    f = part.get("file")
    data_url = f.get("file_data") if isinstance(f, dict) else None
    if not isinstance(data_url, str):
        raise FormatError(f"{path}.file: only inline file_data (a base64 data: URL) is supported, not file_id")
    if not data_url.startswith("data:"):
        raise FormatError(f"{path}.file.file_data must be a base64 data: URL")
    media_type, data = _parse_data_url(data_url, f"{path}.file.file_data")
    block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
    cc = part.get("cache_control")
    if cc is not None:
        block["cache_control"] = cc
    return block


def _openai_content_to_blocks(content, path: str, *, images: bool) -> list[dict]:
    """OpenAI message content -> Anthropic content blocks (empty text dropped: Anthropic rejects it)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise FormatError(f"{path} must be a string or a list of content parts")
    out = []
    for j, part in enumerate(content):
        p = f"{path}[{j}]"
        if not isinstance(part, dict):
            raise FormatError(f"{p} must be an object")
        t = part.get("type")
        if t == "text" or t == "refusal":
            text = part.get(t)
            if not isinstance(text, str):
                raise FormatError(f"{p}.{t} must be a string")
            if text:
                block = {"type": "text", "text": text}
                cc = part.get("cache_control")
                if cc is not None:
                    block["cache_control"] = cc
                out.append(block)
        elif t == "image_url" and images:
            out.append(_openai_image(part, p))
        elif t == "file" and images:
            out.append(_openai_file(part, p))
        elif t in ("image_url", "file", "input_audio"):
            raise FormatError(f"{p}: content parts of type '{t}' are not supported here")
        else:
            raise FormatError(f"{p}.type must be one of 'text', 'image_url', 'file' (got {t!r})")
    return out


def _tool_arguments(args, path: str) -> dict:
    if isinstance(args, dict):
        return args
    if args is None or args == "" or (isinstance(args, str) and args.isspace()):
        return {}
    if not isinstance(args, str):
        raise FormatError(f"{path} must be a JSON string")
    try:
        value = json.loads(args)
    except ValueError:
        raise FormatError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path} must be a JSON object")
    return value


def _tool_id(tid: str) -> str:
    # Anthropic requires ^[a-zA-Z0-9_-]+$; some local servers mint ids like "functions.get:0".
    # Mapping is deterministic so a tool_use and its tool_result still match.
    if tid.isascii() and tid.replace("_", "").replace("-", "").isalnum():
        return tid
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in tid)


_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


def openai_request_to_anthropic(body: dict, *, model: str, default_max_tokens: int = 4096) -> dict:
    if not isinstance(body, dict):
        raise FormatError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise FormatError("messages must be a list")

    system: list[dict] = []
    system_plain = True
    out: list[dict] = []  # {"role", "content": list[block]}

    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FormatError(f"{path} must be an object")
        role = m.get("role")
        if role not in _OPENAI_ROLES:
            if role == "function":
                raise FormatError(f"{path}.role 'function' is deprecated and not supported; use 'tool'")
            raise FormatError(f"{path}.role must be one of {', '.join(_OPENAI_ROLES)} (got {role!r})")
        content = m.get("content")

        if role == "system" or role == "developer":
            if isinstance(content, str):
                if content:
                    system.append({"type": "text", "text": content})
            else:
                if content is None:
                    raise FormatError(f"{path}.content is required")
                blocks = _openai_content_to_blocks(content, f"{path}.content", images=False)
                system_plain = system_plain and all(len(b) == 2 for b in blocks)
                system.extend(blocks)
            continue

        if role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid:
                raise FormatError(f"{path}.tool_call_id must be a non-empty string")
            block = {"type": "tool_result", "tool_use_id": _tool_id(tcid)}
            if isinstance(content, str):
                if content:
                    block["content"] = content
            elif content is not None:
                blocks = _openai_content_to_blocks(content, f"{path}.content", images=True)
                if blocks:
                    block["content"] = blocks
            role, blocks = "user", [block]
        elif role == "user":
            if content is None:
                raise FormatError(f"{path}.content is required")
            blocks = _openai_content_to_blocks(content, f"{path}.content", images=True)
        else:  # assistant
            blocks = _openai_content_to_blocks(content, f"{path}.content", images=False)
            tcs = m.get("tool_calls")
            if tcs:
                if not isinstance(tcs, list):
                    raise FormatError(f"{path}.tool_calls must be a list")
                for k, tc in enumerate(tcs):
                    tp = f"{path}.tool_calls[{k}]"
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if not isinstance(fn, dict):
                        raise FormatError(f"{tp}.function must be an object")
                    tid, name = tc.get("id"), fn.get("name")
                    if not isinstance(tid, str) or not tid:
                        raise FormatError(f"{tp}.id must be a non-empty string")
                    if not isinstance(name, str) or not name:
                        raise FormatError(f"{tp}.function.name must be a non-empty string")
                    blocks.append({
                        "type": "tool_use",
                        "id": _tool_id(tid),
                        "name": name,
                        "input": _tool_arguments(fn.get("arguments"), f"{tp}.function.arguments"),
                    })

        if not blocks:
            continue  # Anthropic rejects empty messages; merging below keeps alternation.
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    if not out:
        raise FormatError("messages must contain at least one non-empty user or assistant message")

    for msg in out:
        blocks = msg["content"]
        if msg["role"] == "user" and len(blocks) > 1:
            # Anthropic requires a user turn's tool_result blocks to come before anything else.
            other = False
            for b in blocks:
                if b["type"] != "tool_result":
                    other = True
                elif other:
                    msg["content"] = [b for b in blocks if b["type"] == "tool_result"] + [
                        b for b in blocks if b["type"] != "tool_result"
                    ]
                    break
        elif len(blocks) == 1 and blocks[0]["type"] == "text" and len(blocks[0]) == 2:
            msg["content"] = blocks[0]["text"]

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise FormatError("max_tokens must be a positive integer")

    req: dict = {"model": model, "max_tokens": max_tokens, "messages": out}
    if system:
        req["system"] = "\n\n".join(b["text"] for b in system) if system_plain else system

    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise FormatError("tools must be a list")
        atools = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise FormatError(f"tools[{i}] must be a function tool ({{\"type\": \"function\", \"function\": {{...}}}})")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise FormatError(f"tools[{i}].function.name must be a non-empty string")
            at = {"name": name}
            if fn.get("description"):
                at["description"] = fn["description"]
            at["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
            cc = t.get("cache_control")
            if cc is not None:
                at["cache_control"] = cc
            atools.append(at)
        req["tools"] = atools

        # Only with tools: clients send tool_choice "none" without any, which Anthropic rejects.
        tc = body.get("tool_choice")
        choice = None
        if tc == "auto":
            choice = {"type": "auto"}
        elif tc == "required":
            choice = {"type": "any"}
        elif tc == "none":
            choice = {"type": "none"}
        elif isinstance(tc, dict):
            fn = tc.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str) or not name:
                raise FormatError("tool_choice.function.name must be a non-empty string")
            choice = {"type": "tool", "name": name}
        elif tc is not None:
            raise FormatError("tool_choice must be 'auto', 'required', 'none' or a function choice object")
        if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
            choice = choice or {"type": "auto"}
            choice["disable_parallel_tool_use"] = True
        if choice is not None:
            req["tool_choice"] = choice

    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise FormatError("temperature must be a number")
        # OpenAI accepts 0..2, Anthropic rejects anything above 1.
        req["temperature"] = min(max(temperature, 0), 1)
    top_p = body.get("top_p")
    if top_p is not None:
        req["top_p"] = top_p
    stop = body.get("stop")
    if stop:
        if isinstance(stop, str):
            req["stop_sequences"] = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            req["stop_sequences"] = stop
        else:
            raise FormatError("stop must be a string or a list of strings")
    stream = body.get("stream")
    if stream is not None:
        req["stream"] = bool(stream)
    user = body.get("user")
    if isinstance(user, str) and user:
        req["metadata"] = {"user_id": user}
    return req


def _anthropic_image(block: dict, path: str) -> dict:
    src = block.get("source")
    st = src.get("type") if isinstance(src, dict) else None
    if st == "base64":
        url = f"data:{src.get('media_type')};base64,{src.get('data')}"
    elif st == "url":
        url = src.get("url")
    else:
        raise FormatError(f"{path}.source.type must be 'base64' or 'url' (got {st!r})")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_document(block: dict, path: str) -> dict:
    src = block.get("source")
    st = src.get("type") if isinstance(src, dict) else None
    if st == "text":
        return {"type": "text", "text": src.get("data") or ""}
    if st == "base64":
        f = {"file_data": f"data:{src.get('media_type')};base64,{src.get('data')}"}
        if block.get("title"):
            f["filename"] = block["title"]
        return {"type": "file", "file": f}
    raise FormatError(f"{path}: document sources of type {st!r} are not supported by this provider")


def _tool_result_text(content, path: str, images: list) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise FormatError(f"{path} must be a string or a list of content blocks")
    texts = []
    for j, b in enumerate(content):
        t = b.get("type") if isinstance(b, dict) else None
        if t == "text":
            texts.append(b.get("text") or "")
        elif t == "image":
            # OpenAI tool messages are text-only; the image follows in the user turn.
            images.append(_anthropic_image(b, f"{path}[{j}]"))
        elif t == "document":
            texts.append(_anthropic_document(b, f"{path}[{j}]").get("text", ""))
        else:
            raise FormatError(f"{path}[{j}].type must be 'text' or 'image' (got {t!r})")
    return "\n".join(texts)


_DROPPED_BLOCKS = ("thinking", "redacted_thinking")


def _system_text(system, path: str) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        parts = []
        for j, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise FormatError(f"{path}[{j}] must be a text block")
            parts.append(b["text"])
        return "\n\n".join(parts)
    raise FormatError(f"{path} must be a string or a list of text blocks")


def merge_system_messages(body: dict) -> dict:
    """An Anthropic request with its `role: "system"` messages (which Claude Code puts in `messages`)
    moved to the end of the top-level system, in order, as the Messages API expects; their blocks
    keep every field (cache_control with its ttl and scope). A request without any is returned as is."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "system"
                                                 for m in messages):
        return body
    system = body.get("system")
    if not isinstance(system, (str, list, type(None))):
        raise FormatError("system must be a string or a list of text blocks")
    blocks: list = [{"type": "text", "text": system}] if isinstance(system, str) and system else list(system or [])
    kept = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") == "system"):
            kept.append(m)
            continue
        content = m.get("content")
        _system_text(content, f"messages[{i}].content")  # the same check the other direction makes
        blocks.extend([{"type": "text", "text": content}] if isinstance(content, str) else content)
    if not kept:
        raise FormatError("messages must hold at least one 'user' or 'assistant' message")
    return {**body, "system": blocks, "messages": kept}


def anthropic_request_to_openai(body: dict, *, model: str) -> dict:
    if not isinstance(body, dict):
        raise FormatError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise FormatError("messages must be a list")

    out: list[dict] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _system_text(system, "system")})

    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FormatError(f"{path} must be an object")
        role = m.get("role")
        if role == "system":
            # Claude Code sends these for models it does not know; OpenAI-kind servers take them in place.
            out.append({"role": "system", "content": _system_text(m.get("content"), f"{path}.content")})
            continue
        if role not in ("user", "assistant"):
            raise FormatError(f"{path}.role must be 'user', 'assistant' or 'system' (got {role!r})")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise FormatError(f"{path}.content must be a string or a list of content blocks")

        parts: list[dict] = []
        all_text = True
        tool_calls: list[dict] = []
        for j, b in enumerate(content):
            bp = f"{path}.content[{j}]"
            if not isinstance(b, dict):
                raise FormatError(f"{bp} must be an object")
            t = b.get("type")
            if t == "text":
                text = b.get("text")
                if not isinstance(text, str):
                    raise FormatError(f"{bp}.text must be a string")
                parts.append({"type": "text", "text": text})
            elif t in _DROPPED_BLOCKS:
                continue
            elif role == "assistant" and t == "tool_use":
                tool_calls.append({
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": _dumps(b.get("input") or {})},
                })
            elif role == "user" and t == "tool_result":
                images: list[dict] = []
                text = _tool_result_text(b.get("content"), f"{bp}.content", images)
                # Tool messages must directly follow the assistant turn that called them.
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
                if images:
                    all_text = False
                    parts.extend(images)
            elif role == "user" and t == "image":
                all_text = False
                parts.append(_anthropic_image(b, bp))
            elif role == "user" and t == "document":
                p = _anthropic_document(b, bp)
                all_text = all_text and p["type"] == "text"
                parts.append(p)
            else:
                raise FormatError(f"{bp}: content blocks of type {t!r} are not supported in {role} messages by this provider")

        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            msg = {"role": "assistant", "content": text if text or not tool_calls else None}
            if tool_calls:
                msg["tool_calls"] = tool_calls
            out.append(msg)
        elif parts:
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts) if all_text else parts})
        elif not content:
            out.append({"role": "user", "content": ""})

    req: dict = {"model": model, "messages": out}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        # max_tokens, not max_completion_tokens: local OpenAI-compatible servers only know the former.
        req["max_tokens"] = max_tokens
    for k in ("temperature", "top_p"):
        v = body.get(k)
        if v is not None:
            req[k] = v
    stop = body.get("stop_sequences")
    if stop:
        req["stop"] = stop
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    md = body.get("metadata")
    if isinstance(md, dict) and md.get("user_id"):
        req["user"] = md["user_id"]

    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise FormatError("tools must be a list")
        otools = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict):
                raise FormatError(f"tools[{i}] must be an object")
            tt = t.get("type")
            if tt not in (None, "custom"):
                raise FormatError(f"tools[{i}]: tool type {tt!r} is not supported by this provider")
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise FormatError(f"tools[{i}].name must be a non-empty string")
            fn = {"name": name}
            if t.get("description"):
                fn["description"] = t["description"]
            fn["parameters"] = t.get("input_schema") or {"type": "object", "properties": {}}
            otools.append({"type": "function", "function": fn})
        req["tools"] = otools
        tc = body.get("tool_choice")
        if isinstance(tc, dict):
            tct = tc.get("type")
            if tct == "auto":
                req["tool_choice"] = "auto"
            elif tct == "any":
                req["tool_choice"] = "required"
            elif tct == "none":
                req["tool_choice"] = "none"
            elif tct == "tool":
                req["tool_choice"] = {"type": "function", "function": {"name": tc.get("name")}}
            else:
                raise FormatError(f"tool_choice.type must be 'auto', 'any', 'tool' or 'none' (got {tct!r})")
            if tc.get("disable_parallel_tool_use"):
                req["parallel_tool_calls"] = False
        elif tc is not None:
            raise FormatError("tool_choice must be an object")
    return req


# ---------------------------------------------------------------- responses


def _strip_prefix(s, prefix: str) -> str:
    s = s if isinstance(s, str) and s else uuid.uuid4().hex
    return s[len(prefix):] if s.startswith(prefix) else s


def anthropic_response_to_openai(resp: dict, *, model: str) -> dict:
    texts = []
    tool_calls = []
    for b in resp.get("content") or ():
        t = b.get("type")
        if t == "text":
            texts.append(b.get("text") or "")
        elif t == "tool_use":
            tool_calls.append({
                "id": b.get("id"),
                "type": "function",
                "function": {"name": b.get("name"), "arguments": _dumps(b.get("input") or {})},
            })
    text = "".join(texts)
    message: dict = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-" + _strip_prefix(resp.get("id"), "msg_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": _finish_from_anthropic(resp.get("stop_reason"), bool(tool_calls)),
            "logprobs": None,
        }],
        "usage": usage_to_openai(usage_from_anthropic(resp.get("usage"))),
    }


def openai_response_to_anthropic(resp: dict, *, model: str) -> dict:
    choices = resp.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise FormatError("upstream response has no choices")
    choice = choices[0]
    msg = choice.get("message") or {}
    content = msg.get("content")
    blocks: list[dict] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        text = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        if text:
            blocks.append({"type": "text", "text": text})
    if not blocks and msg.get("refusal"):
        blocks.append({"type": "text", "text": msg["refusal"]})
    tcs = msg.get("tool_calls") or ()
    for k, tc in enumerate(tcs):
        fn = tc.get("function") or {}
        blocks.append({
            "type": "tool_use",
            "id": tc.get("id") or "toolu_" + uuid.uuid4().hex[:24],
            "name": fn.get("name") or "",
            "input": _tool_arguments(
                fn.get("arguments"), f"upstream choices[0].message.tool_calls[{k}].function.arguments"
            ),
        })
    return {
        "id": "msg_" + _strip_prefix(resp.get("id"), "chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": _stop_from_openai(choice.get("finish_reason"), bool(tcs)),
        "stop_sequence": None,
        "usage": usage_to_anthropic(usage_from_openai(resp.get("usage"))),
    }


def _log_text(text: str, calls) -> str:
    lines = [text] if text else []
    for name, args in calls:
        lines.append(f"[tool_call {name} {args}]")
    return "\n".join(lines)


def _compact_args(args) -> str:
    if isinstance(args, str):
        if not args or args.isspace():
            return "{}"
        try:
            return _dumps(json.loads(args))
        except ValueError:
            return args
    return _dumps(args if args is not None else {})


def response_text_openai(resp: dict) -> str:
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices:
        return ""
    msg = choices[0].get("message") or {}
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    calls = []
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        calls.append((fn.get("name"), _compact_args(fn.get("arguments"))))
    return _log_text(content or "", calls)


def response_text_anthropic(resp: dict) -> str:
    texts, calls = [], []
    for b in (resp.get("content") if isinstance(resp, dict) else None) or ():
        t = b.get("type")
        if t == "text":
            texts.append(b.get("text") or "")
        elif t == "tool_use":
            calls.append((b.get("name"), _dumps(b.get("input") or {})))
    return _log_text("".join(texts), calls)


def stop_reason_openai(resp) -> str | None:
    try:
        return resp["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def stop_reason_anthropic(resp) -> str | None:
    return resp.get("stop_reason") if isinstance(resp, dict) else None


# ---------------------------------------------------------------- server-sent events


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str


class SSEParser:
    """Incremental text/event-stream parser (WHATWG): feed raw bytes, get complete events."""

    __slots__ = ("_buf", "_skip_lf", "_bom", "_data", "_event", "last_event_id", "retry")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the previous chunk ended in \r; a leading \n belongs to it
        self._bom = True  # still at stream start, where a UTF-8 BOM is dropped
        self._data: list[str] | None = None
        self._event: str | None = None
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        buf = self._buf + chunk if self._buf else chunk
        if self._bom:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._bom = False
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        if self._skip_lf and buf:
            self._skip_lf = False
            if buf[0] == 10:
                buf = buf[1:]
        events: list[SSEEvent] = []
        n = len(buf)
        start = 0
        # Lines split on ASCII bytes only, so a UTF-8 sequence cut by the chunking is never decoded half.
        nr = buf.find(b"\r")
        nn = buf.find(b"\n")
        while nr != -1 or nn != -1:
            if nn == -1 or (nr != -1 and nr < nn):
                end = nr
                if end + 1 < n:
                    nxt = end + 2 if buf[end + 1] == 10 else end + 1
                else:
                    nxt = n
                    self._skip_lf = True
            else:
                end = nn
                nxt = nn + 1
            self._line(buf[start:end], events)
            start = nxt
            if nr != -1 and nr < start:
                nr = buf.find(b"\r", start)
            if nn != -1 and nn < start:
                nn = buf.find(b"\n", start)
        self._buf = buf[start:] if start < n else b""
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._data is not None:
                events.append(SSEEvent(self._event, "\n".join(self._data)))
            self._data = None
            self._event = None
            return
        if raw[0] == 58:  # ":" comment, used for keep-alives
            return
        line = raw.decode("utf-8", "replace")
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif field == "event":
            self._event = value or None
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)


def sse_encode(data: str, event: str | None = None) -> bytes:
    if "\n" in data or "\r" in data:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        body = "".join(f"data: {line}\n" for line in lines)
    else:
        body = f"data: {data}\n"
    if event is not None:
        body = f"event: {event}\n{body}"
    return (body + "\n").encode()


# ---------------------------------------------------------------- stream accumulators (request log)


class _Accumulator:
    __slots__ = ("_text", "usage", "tool_calls", "got_content", "error")

    def __init__(self) -> None:
        self._text: list[str] = []
        self.usage = Usage()
        self.tool_calls: list[dict] = []  # {"id", "name", "arguments"}
        self.got_content = False
        self.error: dict | None = None

    @property
    def text(self) -> str:
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def log_text(self) -> str:
        """Same shape as response_text_openai / response_text_anthropic, for streamed responses."""
        return _log_text(self.text, ((c["name"], _compact_args(c["arguments"])) for c in self.tool_calls))


class OpenAIStreamAccumulator(_Accumulator):
    __slots__ = ("finish_reason", "_by_index")

    def __init__(self) -> None:
        super().__init__()
        self.finish_reason: str | None = None
        self._by_index: dict[int, dict] = {}

    def feed(self, chunk: dict) -> None:
        u = chunk.get("usage")
        if u:
            self.usage = usage_from_openai(u)
        if "error" in chunk:
            self.error = chunk["error"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                c = delta.get("content")
                if c:
                    self._text.append(c)
                    self.got_content = True
                for tc in delta.get("tool_calls") or ():
                    self.got_content = True
                    idx = tc.get("index", 0)
                    call = self._by_index.get(idx)
                    if call is None:
                        call = self._by_index[idx] = {"id": tc.get("id"), "name": "", "arguments": ""}
                        self.tool_calls.append(call)
                    elif tc.get("id"):
                        call["id"] = tc["id"]
                    fn = tc.get("function")
                    if fn:
                        if fn.get("name"):
                            call["name"] += fn["name"]
                        args = fn.get("arguments")
                        if args:  # Ollama can send the parsed object whole
                            call["arguments"] += args if isinstance(args, str) else _dumps(args)
            fr = choice.get("finish_reason")
            if fr:
                self.finish_reason = fr


class AnthropicStreamAccumulator(_Accumulator):
    __slots__ = ("stop_reason", "_by_index")

    def __init__(self) -> None:
        super().__init__()
        self.stop_reason: str | None = None
        self._by_index: dict[int, dict] = {}

    def feed(self, event_type: str, data: dict) -> None:
        if event_type == "content_block_delta":
            d = data.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                t = d.get("text")
                if t:
                    self._text.append(t)
                    self.got_content = True
            elif dt == "input_json_delta":
                call = self._by_index.get(data.get("index"))
                if call is not None:
                    call["arguments"] += d.get("partial_json") or ""
        elif event_type == "content_block_start":
            b = data.get("content_block") or {}
            if b.get("type") == "tool_use":
                self.got_content = True
                call = {"id": b.get("id"), "name": b.get("name") or "", "arguments": ""}
                self._by_index[data.get("index")] = call
                self.tool_calls.append(call)
            elif b.get("type") == "text" and b.get("text"):
                self._text.append(b["text"])
                self.got_content = True
        elif event_type == "message_start":
            self.usage = usage_from_anthropic((data.get("message") or {}).get("usage"))
        elif event_type == "message_delta":
            sr = (data.get("delta") or {}).get("stop_reason")
            if sr:
                self.stop_reason = sr
            u = data.get("usage")
            if u:
                _merge_anthropic_usage(self.usage, u)
        elif event_type == "error":
            self.error = data.get("error") or data


def _merge_anthropic_usage(usage: Usage, u: dict) -> None:
    # message_delta counts are cumulative and only sometimes carry the input side.
    v = u.get("output_tokens")
    if v is not None:
        usage.output_tokens = _int(v)
    v = u.get("input_tokens")
    if v is not None:
        usage.input_tokens = _int(v)
    v = u.get("cache_read_input_tokens")
    if v is not None:
        usage.cache_read_tokens = _int(v)
    v = u.get("cache_creation_input_tokens")
    if v is not None:
        usage.cache_write_tokens = _int(v)


# ---------------------------------------------------------------- stream translators


def anthropic_text_message(text: str, *, model: str, id: str) -> dict:
    """A whole Anthropic answer made of `text` alone, with no tokens used (a cached answer)."""
    return {"id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}


def anthropic_text_events(text: str, *, model: str, id: str, usage: Usage | None = None,
                          piece_chars: int = 64) -> list[tuple[str, dict]]:
    """The Anthropic stream events of `anthropic_text_message` (with `usage` when tokens were used),
    its text in pieces of about `piece_chars` (cut after a space where there is one)."""
    head = anthropic_text_message("", model=model, id=id)
    head.update(content=[], stop_reason=None)
    if usage is not None:
        head["usage"] = {**usage_to_anthropic(usage), "output_tokens": 0}
    events: list[tuple[str, dict]] = [
        ("message_start", {"type": "message_start", "message": head}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    ]
    start = 0
    while start < len(text):
        end = min(len(text), start + piece_chars)
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space + 1 if space > start else end
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": text[start:end]}}))
        start = end
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": usage.output_tokens if usage is not None else 0}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


class AnthropicToOpenAIStream:
    """Anthropic upstream stream events -> OpenAI chat.completion.chunk dicts."""

    __slots__ = ("model", "id", "include_usage", "created", "usage", "stop_reason",
                 "_started", "_done", "_tools", "_head")

    def __init__(self, *, model: str, id: str, include_usage: bool) -> None:
        self.model = model
        self.id = id
        self.include_usage = include_usage
        self.created = int(time.time())
        self.usage = Usage()
        self.stop_reason: str | None = None
        self._started = False
        self._done = False
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._head = {"id": id, "object": "chat.completion.chunk", "created": self.created, "model": model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        c = dict(self._head)
        c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return c

    def _delta(self, delta: dict) -> list[dict]:
        if self._started:
            return [self._chunk(delta)]
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""}), self._chunk(delta)]

    def feed(self, event_type: str, data: dict) -> list[dict]:
        if self._done:
            return []
        if event_type == "content_block_delta":
            d = data.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                t = d.get("text")
                return self._delta({"content": t}) if t else []
            if dt == "input_json_delta":
                pj = d.get("partial_json")
                k = self._tools.get(data.get("index"))
                if not pj or k is None:
                    return []
                return self._delta({"tool_calls": [{"index": k, "function": {"arguments": pj}}]})
            return []  # thinking, signature and citation deltas have no OpenAI counterpart
        if event_type == "content_block_start":
            b = data.get("content_block") or {}
            bt = b.get("type")
            if bt == "tool_use":
                k = self._tools[data.get("index")] = len(self._tools)
                return self._delta({"tool_calls": [{
                    "index": k,
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": ""},
                }]})
            if bt == "text" and b.get("text"):
                return self._delta({"content": b["text"]})
            return []
        if event_type == "message_start":
            self.usage = usage_from_anthropic((data.get("message") or {}).get("usage"))
            if self._started:
                return []
            self._started = True
            return [self._chunk({"role": "assistant", "content": ""})]
        if event_type == "message_delta":
            sr = (data.get("delta") or {}).get("stop_reason")
            if sr:
                self.stop_reason = sr
            u = data.get("usage")
            if u:
                _merge_anthropic_usage(self.usage, u)
            return []
        if event_type == "message_stop":
            return self.finish()
        if event_type == "error":
            # The OpenAI SDK raises on a stream chunk with an "error" key.
            self._done = True
            err = data.get("error") or {}
            return [{"error": {
                "message": err.get("message") or "upstream stream error",
                "type": err.get("type") or "api_error",
                "param": None,
                "code": None,
            }}]
        return []  # ping, content_block_stop

    def finish(self) -> list[dict]:
        if self._done:
            return []
        self._done = True
        out = [] if self._started else [self._chunk({"role": "assistant", "content": ""})]
        self._started = True
        out.append(self._chunk({}, _finish_from_anthropic(self.stop_reason, bool(self._tools))))
        if self.include_usage:
            c = dict(self._head)
            c["choices"] = []
            c["usage"] = usage_to_openai(self.usage)
            out.append(c)
        return out


class OpenAIToAnthropicStream:
    """OpenAI upstream chat.completion.chunk dicts -> Anthropic (event, data) pairs."""

    __slots__ = ("model", "id", "usage", "finish_reason", "_started", "_done",
                 "_block", "_block_type", "_next_index", "_tools")

    def __init__(self, *, model: str, id: str) -> None:
        self.model = model
        self.id = id
        self.usage = Usage()
        self.finish_reason: str | None = None
        self._started = False
        self._done = False
        self._block = -1  # index of the open content block, -1 when none
        self._block_type: str | None = None
        self._next_index = 0
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index

    def _start(self, out: list) -> None:
        self._started = True
        out.append(("message_start", {"type": "message_start", "message": {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_to_anthropic(self.usage),
        }}))

    def _close(self, out: list) -> None:
        if self._block >= 0:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._block}))
            self._block = -1
            self._block_type = None

    def _open(self, out: list, block: dict) -> int:
        self._close(out)
        i = self._block = self._next_index
        self._next_index += 1
        self._block_type = block["type"]
        out.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": block}))
        return i

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        if self._done:
            return []
        out: list[tuple[str, dict]] = []
        u = chunk.get("usage")
        if u:
            self.usage = usage_from_openai(u)
        err = chunk.get("error")
        if err:
            self._done = True
            msg = err.get("message") if isinstance(err, dict) else str(err)
            return [("error", {"type": "error", "error": {"type": "api_error", "message": msg or "upstream stream error"}})]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                text = delta.get("content")
                if text:
                    if not self._started:
                        self._start(out)
                    if self._block_type != "text":
                        self._open(out, {"type": "text", "text": ""})
                    out.append(("content_block_delta", {
                        "type": "content_block_delta", "index": self._block,
                        "delta": {"type": "text_delta", "text": text},
                    }))
                for tc in delta.get("tool_calls") or ():
                    if not self._started:
                        self._start(out)
                    k = tc.get("index", 0)
                    fn = tc.get("function") or {}
                    bi = self._tools.get(k)
                    if bi is None:
                        bi = self._tools[k] = self._open(out, {
                            "type": "tool_use",
                            "id": tc.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                            "name": fn.get("name") or "",
                            "input": {},
                        })
                    args = fn.get("arguments")
                    if args:
                        if not isinstance(args, str):  # Ollama can send the parsed object whole
                            args = _dumps(args)
                        # Sent even to an already closed block: SDKs accumulate by index.
                        out.append(("content_block_delta", {
                            "type": "content_block_delta", "index": bi,
                            "delta": {"type": "input_json_delta", "partial_json": args},
                        }))
            fr = choice.get("finish_reason")
            if fr:
                self.finish_reason = fr
        if not self._started and chunk.get("choices"):
            # Even the role-only first chunk starts the message, so clients see bytes early.
            self._start(out)
        return out

    def finish(self) -> list[tuple[str, dict]]:
        if self._done:
            return []
        self._done = True
        out: list[tuple[str, dict]] = []
        if not self._started:
            self._start(out)
        self._close(out)
        out.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_from_openai(self.finish_reason, bool(self._tools)), "stop_sequence": None},
            "usage": usage_to_anthropic(self.usage),
        }))
        out.append(("message_stop", {"type": "message_stop"}))
        return out


# ---------------------------------------------------------------- errors

_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str, *, type: str | None = None, code: str | None = None) -> dict:
    if type is None:
        type = _OPENAI_ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def anthropic_error(status: int, message: str, *, type: str | None = None) -> dict:
    if type is None:
        type = _ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type, "message": message}}


def error_message_from_body(body: bytes | str | dict | None) -> str:
    if body is None:
        return ""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        s = body.strip()
        if s[:1] in ("{", "["):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None
            msg = _message_from_dict(parsed) if isinstance(parsed, dict) else None
            if msg:
                s = msg
    elif isinstance(body, dict):
        s = _message_from_dict(body) or _dumps(body)
    else:
        s = str(body)
    s = s.strip()
    return s if len(s) <= 500 else s[:497] + "..."


def _message_from_dict(d: dict) -> str | None:
    err = d.get("error")
    if isinstance(err, dict):
        m = err.get("message")
        if isinstance(m, str) and m:
            return m
    elif isinstance(err, str) and err:
        return err  # Ollama: {"error": "model 'x' not found"}
    for k in ("message", "detail"):
        m = d.get(k)
        if isinstance(m, str) and m:
            return m
        if m:  # FastAPI validation details are a list
            return _dumps(m)
    return None
