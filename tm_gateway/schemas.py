"""Both APIs' wire shapes as pydantic types: what clients may send, and what upstreams must answer to be read."""

# The request types check every body whole before any provider is called, and are what /openapi.json
# publishes; the answer and event types keep an unreadable upstream answer from reaching the code that reads it.

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, Required

import orjson
from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

__all__ = ["MAX_DEPTH", "InvalidShape", "check_depth", "check_request", "check_answer", "check_stream_event",
           "too_deep", "request_schema", "error_schema"]

# orjson writes no JSON nested deeper than 254 levels, and the gateway writes each body again (its row,
# the upstream payload, a translation adds a level or two): a body must leave that room.
MAX_DEPTH = 200
_ORJSON_MAX_DEPTH = 254


class InvalidShape(ValueError):
    """A body of the wrong shape; the message names the field, as the caller or the operator reads it."""


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests lists and objects more than `limit` levels deep.

    orjson counts, at C speed: wrapped in (254 - limit) lists, the value fails to serialize exactly when
    it nests deeper than `limit` (a walk in Python cost 190 µs on a 30 kB agent turn, this 30 µs)."""
    for _ in range(_ORJSON_MAX_DEPTH - limit):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:  # parsed JSON holds nothing else orjson could refuse
        return True
    return False


def check_depth(raw: bytes, body: Any) -> None:
    """Raise InvalidShape when `body`, parsed from `raw`, nests deeper than MAX_DEPTH."""
    # Only a body with that many brackets can nest that deep: most never pay for the check.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and too_deep(body):
        raise InvalidShape(f"the request body nests deeper than {MAX_DEPTH} levels")


# Fields a type does not name pass through untouched (new API parameters, provider extensions);
# strict, so that "stream": "yes" or a number where text goes is refused rather than coerced.
_OPEN = ConfigDict(extra="allow", strict=True)


def _tagged(known: tuple[str, ...], field: str = "type"):
    """A discriminator that sends a value with an unknown `field` to the "other" branch: forward compatible
    for types this gateway does not know, while every type it knows is checked whole."""

    def tag(v: Any) -> str:
        t = v.get(field) if isinstance(v, dict) else None
        return t if t in known else "other"

    return Discriminator(tag)


@with_config(_OPEN)
class _Other(TypedDict):
    type: Required[str]


NonEmpty = Annotated[str, Field(min_length=1)]
PositiveInt = Annotated[int, Field(ge=1)]
Number = int | float

# ---------------------------------------------------------------- OpenAI Chat Completions


@with_config(_OPEN)
class OpenAITextPart(TypedDict):
    type: Required[Literal["text"]]
    text: Required[str]


@with_config(_OPEN)
class OpenAIImageURL(TypedDict):
    url: Required[str]
    detail: NotRequired[str]


@with_config(_OPEN)
class OpenAIImagePart(TypedDict):
    type: Required[Literal["image_url"]]
    image_url: Required[OpenAIImageURL]


@with_config(_OPEN)
class OpenAIAudioPart(TypedDict):
    type: Required[Literal["input_audio"]]
    input_audio: Required[dict[str, Any]]


@with_config(_OPEN)
class OpenAIFilePart(TypedDict):
    type: Required[Literal["file"]]
    file: Required[dict[str, Any]]


@with_config(_OPEN)
class OpenAIRefusalPart(TypedDict):
    type: Required[Literal["refusal"]]
    refusal: Required[str]


OpenAIPart = Annotated[
    Annotated[OpenAITextPart, Tag("text")] | Annotated[OpenAIImagePart, Tag("image_url")]
    | Annotated[OpenAIAudioPart, Tag("input_audio")] | Annotated[OpenAIFilePart, Tag("file")]
    | Annotated[OpenAIRefusalPart, Tag("refusal")] | Annotated[_Other, Tag("other")],
    _tagged(("text", "image_url", "input_audio", "file", "refusal")),
]
OpenAIContent = str | list[OpenAIPart]


@with_config(_OPEN)
class OpenAIFunctionCall(TypedDict):
    name: Required[NonEmpty]
    # A JSON string per the API; some clients (Ollama's) send the object itself.
    arguments: Required[str | dict[str, Any]]


@with_config(_OPEN)
class OpenAIToolCall(TypedDict):
    id: Required[NonEmpty]
    type: NotRequired[str]
    function: Required[OpenAIFunctionCall]


@with_config(_OPEN)
class OpenAISystemMessage(TypedDict):
    role: Required[Literal["system", "developer"]]
    content: Required[OpenAIContent]
    name: NotRequired[str]


@with_config(_OPEN)
class OpenAIUserMessage(TypedDict):
    role: Required[Literal["user"]]
    content: Required[OpenAIContent]
    name: NotRequired[str]


@with_config(_OPEN)
class OpenAIAssistantMessage(TypedDict):
    role: Required[Literal["assistant"]]
    content: NotRequired[OpenAIContent | None]
    tool_calls: NotRequired[list[OpenAIToolCall] | None]
    refusal: NotRequired[str | None]
    name: NotRequired[str]


@with_config(_OPEN)
class OpenAIToolMessage(TypedDict):
    role: Required[Literal["tool"]]
    content: Required[OpenAIContent]
    tool_call_id: Required[NonEmpty]


@with_config(_OPEN)
class OpenAIFunctionMessage(TypedDict):
    role: Required[Literal["function"]]
    content: Required[str | None]
    name: Required[str]


OpenAIMessage = Annotated[
    OpenAISystemMessage | OpenAIUserMessage | OpenAIAssistantMessage | OpenAIToolMessage | OpenAIFunctionMessage,
    Field(discriminator="role"),
]


@with_config(_OPEN)
class OpenAIFunction(TypedDict):
    name: Required[NonEmpty]
    description: NotRequired[str]
    parameters: NotRequired[dict[str, Any]]
    strict: NotRequired[bool | None]


@with_config(_OPEN)
class OpenAIFunctionTool(TypedDict):
    type: Required[Literal["function"]]
    function: Required[OpenAIFunction]


OpenAITool = Annotated[
    Annotated[OpenAIFunctionTool, Tag("function")] | Annotated[_Other, Tag("other")], _tagged(("function",))
]


@with_config(_OPEN)
class OpenAIStreamOptions(TypedDict):
    include_usage: NotRequired[bool]


@with_config(_OPEN)
class OpenAIResponseFormat(TypedDict):
    type: Required[str]


@with_config(_OPEN)
class OpenAIChatRequest(TypedDict):
    model: Required[NonEmpty]
    messages: Required[Annotated[list[OpenAIMessage], Field(min_length=1)]]
    stream: NotRequired[bool | None]
    stream_options: NotRequired[OpenAIStreamOptions | None]
    max_tokens: NotRequired[PositiveInt | None]
    max_completion_tokens: NotRequired[PositiveInt | None]
    temperature: NotRequired[Number | None]
    top_p: NotRequired[Number | None]
    n: NotRequired[PositiveInt | None]
    stop: NotRequired[str | list[str] | None]
    presence_penalty: NotRequired[Number | None]
    frequency_penalty: NotRequired[Number | None]
    seed: NotRequired[int | None]
    user: NotRequired[str]
    tools: NotRequired[list[OpenAITool]]
    tool_choice: NotRequired[str | dict[str, Any]]
    parallel_tool_calls: NotRequired[bool]
    response_format: NotRequired[OpenAIResponseFormat]
    metadata: NotRequired[dict[str, str] | None]


# ---------------------------------------------------------------- Anthropic Messages


@with_config(_OPEN)
class AnthropicTextBlock(TypedDict):
    type: Required[Literal["text"]]
    text: Required[str]
    cache_control: NotRequired[dict[str, Any] | None]


@with_config(_OPEN)
class AnthropicSource(TypedDict):
    type: Required[str]


@with_config(_OPEN)
class AnthropicImageBlock(TypedDict):
    type: Required[Literal["image"]]
    source: Required[AnthropicSource]
    cache_control: NotRequired[dict[str, Any] | None]


@with_config(_OPEN)
class AnthropicDocumentBlock(TypedDict):
    type: Required[Literal["document"]]
    source: Required[AnthropicSource]
    cache_control: NotRequired[dict[str, Any] | None]


@with_config(_OPEN)
class AnthropicToolUseBlock(TypedDict):
    type: Required[Literal["tool_use"]]
    id: Required[NonEmpty]
    name: Required[NonEmpty]
    input: Required[dict[str, Any]]


@with_config(_OPEN)
class AnthropicToolResultBlock(TypedDict):
    type: Required[Literal["tool_result"]]
    tool_use_id: Required[NonEmpty]
    content: NotRequired[str | list[AnthropicBlock]]
    is_error: NotRequired[bool]


@with_config(_OPEN)
class AnthropicThinkingBlock(TypedDict):
    type: Required[Literal["thinking"]]
    thinking: Required[str]
    signature: NotRequired[str]


AnthropicBlock = Annotated[
    Annotated[AnthropicTextBlock, Tag("text")] | Annotated[AnthropicImageBlock, Tag("image")]
    | Annotated[AnthropicDocumentBlock, Tag("document")] | Annotated[AnthropicToolUseBlock, Tag("tool_use")]
    | Annotated[AnthropicToolResultBlock, Tag("tool_result")] | Annotated[AnthropicThinkingBlock, Tag("thinking")]
    | Annotated[_Other, Tag("other")],
    _tagged(("text", "image", "document", "tool_use", "tool_result", "thinking")),
]


@with_config(_OPEN)
class AnthropicMessage(TypedDict):
    # "system" too: Claude Code puts system messages among the others for models it does not know.
    role: Required[Literal["user", "assistant", "system"]]
    content: Required[str | list[AnthropicBlock]]


@with_config(_OPEN)
class AnthropicTool(TypedDict):
    name: Required[NonEmpty]
    type: NotRequired[str]
    description: NotRequired[str]
    input_schema: NotRequired[dict[str, Any]]


@with_config(_OPEN)
class AnthropicToolChoice(TypedDict):
    type: Required[str]
    name: NotRequired[str]


@with_config(_OPEN)
class AnthropicMetadata(TypedDict):
    user_id: NotRequired[str | None]


@with_config(_OPEN)
class AnthropicMessagesRequest(TypedDict):
    model: Required[NonEmpty]
    messages: Required[Annotated[list[AnthropicMessage], Field(min_length=1)]]
    max_tokens: Required[PositiveInt]
    system: NotRequired[str | list[AnthropicTextBlock]]
    stream: NotRequired[bool]
    stop_sequences: NotRequired[list[str]]
    temperature: NotRequired[Number]
    top_p: NotRequired[Number]
    top_k: NotRequired[int]
    tools: NotRequired[list[AnthropicTool]]
    tool_choice: NotRequired[AnthropicToolChoice]
    metadata: NotRequired[AnthropicMetadata]
    thinking: NotRequired[dict[str, Any]]
    # Not Anthropic's, but OpenAI habits reach this endpoint too; it must at least be an object.
    stream_options: NotRequired[dict[str, Any] | None]


_REQUESTS: dict[str, TypeAdapter[Any]] = {
    "openai": TypeAdapter(OpenAIChatRequest),
    "anthropic": TypeAdapter(AnthropicMessagesRequest),
}


def _path(body: Any, loc: tuple) -> str:
    """`messages[0].content[1].text`: the error's location read against the body itself, so the
    union branches pydantic names along the way (tags, `str`, `list[...]`) drop out."""
    out, node = "", body
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and (part in node or part == loc[-1]):
            out += f".{part}" if out else part
            node = node.get(part)
    return out or "body"


def _message(body: Any, err: ValidationError) -> str:
    # Of a union's several complaints, the one that got deepest into the body says what is wrong.
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    best = max(errors, key=lambda e: len(_path(body, e["loc"])))
    return f"{_path(body, best['loc'])}: {best['msg']}"


def _check(adapter: TypeAdapter, value: Any) -> None:
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        raise InvalidShape(_message(value, err)) from None


def check_request(fmt: str, body: Any) -> None:
    """Raise InvalidShape naming the first bad field of an OpenAI ("openai") or Anthropic request body."""
    _check(_REQUESTS[fmt], body)


# ---------------------------------------------------------------- what upstreams answer
# Only what the gateway reads is required; the rest passes through as the provider sent it.


@with_config(_OPEN)
class _OpenAIAnswerFunction(TypedDict):
    name: Required[str]
    arguments: NotRequired[str | dict[str, Any] | None]


@with_config(_OPEN)
class _OpenAIAnswerToolCall(TypedDict):
    id: NotRequired[str | None]
    function: Required[_OpenAIAnswerFunction]


@with_config(_OPEN)
class _OpenAIAnswerPart(TypedDict):
    text: NotRequired[str | None]


@with_config(_OPEN)
class _OpenAIAnswerMessage(TypedDict):
    content: NotRequired[str | list[_OpenAIAnswerPart] | None]
    tool_calls: NotRequired[list[_OpenAIAnswerToolCall] | None]
    refusal: NotRequired[str | None]


@with_config(_OPEN)
class _OpenAIChoice(TypedDict):
    message: Required[_OpenAIAnswerMessage]
    finish_reason: NotRequired[str | None]


@with_config(_OPEN)
class _OpenAIAnswer(TypedDict):
    choices: Required[Annotated[list[_OpenAIChoice], Field(min_length=1)]]
    usage: NotRequired[dict[str, Any] | None]


@with_config(_OPEN)
class _AnthropicAnswer(TypedDict):
    content: Required[list[AnthropicBlock]]
    stop_reason: NotRequired[str | None]
    usage: NotRequired[dict[str, Any] | None]


_ANSWERS: dict[str, TypeAdapter[Any]] = {"openai": TypeAdapter(_OpenAIAnswer),
                                         "anthropic": TypeAdapter(_AnthropicAnswer)}


@with_config(_OPEN)
class _OpenAIFunctionDelta(TypedDict):
    name: NotRequired[str | None]
    arguments: NotRequired[str | dict[str, Any] | None]


@with_config(_OPEN)
class _OpenAIToolCallDelta(TypedDict):
    index: NotRequired[int]
    id: NotRequired[str | None]
    function: NotRequired[_OpenAIFunctionDelta | None]


@with_config(_OPEN)
class _OpenAIDelta(TypedDict):
    content: NotRequired[str | None]
    tool_calls: NotRequired[list[_OpenAIToolCallDelta] | None]


@with_config(_OPEN)
class _OpenAIChunkChoice(TypedDict):
    index: NotRequired[int]
    delta: NotRequired[_OpenAIDelta | None]
    finish_reason: NotRequired[str | None]


@with_config(_OPEN)
class _OpenAIChunk(TypedDict):
    choices: NotRequired[list[_OpenAIChunkChoice] | None]
    usage: NotRequired[dict[str, Any] | None]


@with_config(_OPEN)
class _AnthropicDelta(TypedDict):
    type: NotRequired[str]
    text: NotRequired[str]
    partial_json: NotRequired[str]
    stop_reason: NotRequired[str | None]


@with_config(_OPEN)
class _AnthropicEvent(TypedDict):
    type: NotRequired[str]
    index: NotRequired[int]
    delta: NotRequired[_AnthropicDelta]
    content_block: NotRequired[AnthropicBlock]
    message: NotRequired[dict[str, Any]]
    usage: NotRequired[dict[str, Any] | None]


_EVENTS: dict[str, TypeAdapter[Any]] = {"openai": TypeAdapter(_OpenAIChunk), "anthropic": TypeAdapter(_AnthropicEvent)}


def check_answer(kind: str, answer: Any) -> None:
    """Raise InvalidShape when a provider's whole answer (parsed JSON) is not one the gateway can read."""
    _check(_ANSWERS[kind], answer)


def _opt(value: Any, kind: type) -> bool:
    return value is None or type(value) is kind


def _plain_openai_chunk(d: Any) -> bool:
    """True for the events a stream is nearly all made of (text deltas, the role, the finish, usage) when
    they are well formed: a subset of what _OpenAIChunk accepts, checked by hand in a fraction of its
    time (a stream has one event per few tokens). Anything else, tool calls included, is left to it."""
    if type(d) is not dict or not _opt(d.get("usage"), dict):
        return False
    choices = d.get("choices")
    if choices is None:
        return True
    if type(choices) is not list:
        return False
    for c in choices:
        if type(c) is not dict or type(c.get("index", 0)) is not int or not _opt(c.get("finish_reason"), str):
            return False
        delta = c.get("delta")
        if delta is not None and (type(delta) is not dict or not _opt(delta.get("content"), str)
                                  or delta.get("tool_calls") is not None):
            return False
    return True


def _plain_anthropic_event(d: Any) -> bool:
    """As _plain_openai_chunk, for _AnthropicEvent: every event but content_block_start, whose block is
    left to the full check."""
    if type(d) is not dict or "content_block" in d:
        return False
    if ("type" in d and type(d["type"]) is not str) or ("index" in d and type(d["index"]) is not int) \
            or ("message" in d and type(d["message"]) is not dict) or not _opt(d.get("usage"), dict):
        return False
    delta = d.get("delta")
    if delta is None:
        return "delta" not in d
    return type(delta) is dict and _opt(delta.get("stop_reason"), str) \
        and all(k not in delta or type(delta[k]) is str for k in ("type", "text", "partial_json"))


_PLAIN_EVENT = {"openai": _plain_openai_chunk, "anthropic": _plain_anthropic_event}


def check_stream_event(kind: str, data: Any) -> None:
    """Raise InvalidShape when one streamed event's data is not one the gateway can read."""
    if not _PLAIN_EVENT[kind](data):
        _check(_EVENTS[kind], data)


def _any_of(schema: Any) -> Any:
    # A part of a type this gateway does not know is accepted too (the "other" branch), so a known one
    # matches two branches: "oneOf" would call it invalid where "anyOf" says what the gateway does.
    if isinstance(schema, dict):
        return {("anyOf" if k == "oneOf" else k): _any_of(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_any_of(v) for v in schema]
    return schema


def request_schema(fmt: str) -> dict:
    """The JSON Schema of a request body, its shared definitions under "$defs", for the OpenAPI description."""
    return _any_of(_REQUESTS[fmt].json_schema(ref_template="#/components/schemas/{model}"))


def error_schema(fmt: str) -> dict:
    inner: dict[str, Any] = {"type": "object", "required": ["type", "message"],
             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}
    if fmt == "anthropic":
        return {"type": "object", "required": ["type", "error"],
                "properties": {"type": {"const": "error"}, "error": inner}}
    inner = {**inner, "properties": {**inner["properties"], "param": {}, "code": {}}}
    return {"type": "object", "required": ["error"], "properties": {"error": inner}}
