"""Error bodies in each format, and the message inside a provider's error body."""

from __future__ import annotations

import json

from tm_resources.formats._common import _dumps

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
