"""Request bodies translated both ways (OpenAI Chat Completions <-> Anthropic Messages)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tm_resources.formats._common import FormatError, _dumps

if TYPE_CHECKING:  # the SDKs' request types, as annotations only: no model is built per request
    from anthropic.types import ToolChoiceParam, ToolParam
    from openai.types.chat import ChatCompletionFunctionToolParam
    from openai.types.shared_params import FunctionDefinition


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
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": _tool_id(tcid)}
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
        atools: list[ToolParam] = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise FormatError(
                    f"tools[{i}] must be a function tool ({{\"type\": \"function\", \"function\": {{...}}}})")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise FormatError(f"tools[{i}].function.name must be a non-empty string")
            at: ToolParam = {"name": name, "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
            if fn.get("description"):
                at["description"] = fn["description"]
            cc = t.get("cache_control")
            if cc is not None:
                at["cache_control"] = cc
            atools.append(at)
        req["tools"] = atools

        # Only with tools: clients send tool_choice "none" without any, which Anthropic rejects.
        tc = body.get("tool_choice")
        choice: ToolChoiceParam | None = None
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
        if body.get("parallel_tool_calls") is False:
            choice = choice or {"type": "auto"}
            if choice["type"] != "none":
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
    if not isinstance(src, dict):
        src = {}
    st = src.get("type")
    if st == "base64":
        url = f"data:{src.get('media_type')};base64,{src.get('data')}"
    elif st == "url":
        if not isinstance(src.get("url"), str) or not src["url"]:
            raise FormatError(f"{path}.source.url must be a non-empty string")
        url = src["url"]
    else:
        raise FormatError(f"{path}.source.type must be 'base64' or 'url' (got {st!r})")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_document(block: dict, path: str) -> dict:
    src = block.get("source")
    if not isinstance(src, dict):
        src = {}
    st = src.get("type")
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
        blocks.extend([{"type": "text", "text": content}] if isinstance(content, str) else content or [])
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
                raise FormatError(
                    f"{bp}: content blocks of type {t!r} are not supported in {role} messages by this provider")

        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            msg: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
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
        otools: list[ChatCompletionFunctionToolParam] = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict):
                raise FormatError(f"tools[{i}] must be an object")
            tt = t.get("type")
            if tt not in (None, "custom"):
                raise FormatError(f"tools[{i}]: tool type {tt!r} is not supported by this provider")
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise FormatError(f"tools[{i}].name must be a non-empty string")
            fn: FunctionDefinition = {"name": name}
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
