"""Translate between the OpenAI Chat Completions and Anthropic Messages wire formats, both ways.

One module per concern: usage, stop reasons, requests (both ways), responses, server-sent events,
stream accumulators (what the request log keeps), stream translators, errors. Import from here."""

from tm_resources.formats._common import FormatError
from tm_resources.formats.accumulate import AnthropicStreamAccumulator, OpenAIStreamAccumulator
from tm_resources.formats.errors import anthropic_error, error_message_from_body, openai_error
from tm_resources.formats.request import anthropic_request_to_openai, merge_system_messages, openai_request_to_anthropic
from tm_resources.formats.response import (
    anthropic_response_to_openai,
    openai_response_to_anthropic,
    response_text_anthropic,
    response_text_openai,
    stop_reason_anthropic,
    stop_reason_openai,
)
from tm_resources.formats.sse import SSEEvent, SSEParser, sse_encode
from tm_resources.formats.stream import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_text_events,
    anthropic_text_message,
)
from tm_resources.formats.usage import (
    Usage,
    usage_from_anthropic,
    usage_from_openai,
    usage_to_anthropic,
    usage_to_openai,
)

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
    "anthropic_text_message",
    "anthropic_text_events",
    "openai_error",
    "anthropic_error",
    "error_message_from_body",
]
