"""What every stage of a request shares: its API format, headers both ways, the row being built."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson
from starlette.responses import Response

from tm_gateway.stages.log import Row
from tm_resources import formats as fm

JSON = "application/json"
SSE = "text/event-stream"


class ApiFormat(enum.StrEnum):
    """The API the caller speaks; a str, so it compares with an endpoint's kind and goes into the row as is."""

    openai = "openai"
    anthropic = "anthropic"


@dataclass(slots=True)
class Ctx:
    """One request on its way through the stages."""

    fmt: ApiFormat
    client_headers: dict[str, str]
    reply_headers: dict[str, str]
    row: Row
    stream: bool = False


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
