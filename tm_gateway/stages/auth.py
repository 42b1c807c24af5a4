"""The auth stage: the request's key, the user it maps to, and the back-off of an address guessing keys."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from tm_gateway.stages.context import error_response
from tm_gateway.stages.log import log_bodiless

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy


def key_of(h: Any) -> str | None:
    auth = h.get("authorization")
    return auth[7:].strip() if auth and auth[:7].lower() == "bearer " else h.get("x-api-key")


def _backing_off(fmt: str, seconds: float) -> Response:
    wait = math.ceil(seconds)
    return error_response(fmt, 429, f"too many failed logins from this address: retry in {wait} s",
                          {"retry-after": str(wait)})


def login(gw: Proxy, request: Request, fmt: str, h: Any) -> tuple[str, str] | Response:
    """The (key id, user) of the request's key, or the 401 to answer; a 429 while its address is
    backing off after too many failures, whatever key it sends, so that ignoring the 429 makes
    guessing no faster (a valid key refused that way still leaves its row)."""
    client = request.scope.get("client")
    source = client[0] if client else "unknown"
    wait = gw.logins.retry_after(source)
    ident = gw.shared.lookup(key_of(h))
    if wait > 0:
        refused = _backing_off(fmt, wait)
        if ident is not None:
            log_bodiless(gw.request_log, request, fmt, ident, 429, error_class="login_backoff",
                         error_message="too many failed logins from this address")
        return refused
    if ident is not None:
        return ident
    backoff = gw.logins.failed(source, key_of(h), request.scope["path"])
    if backoff > 0:
        return _backing_off(fmt, backoff)
    return error_response(
        fmt, 401, "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
