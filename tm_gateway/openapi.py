"""The gateway's OpenAPI description (GET /openapi.json), its request bodies from the types that check them."""

from __future__ import annotations

from typing import Any

from tm_gateway import schemas

_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
# What a caller may get back besides an answer: its own mistakes, then the providers' (passed on
# with their real status, or 502 for an answer the gateway could not read).
_ERRORS = {
    "400": "the body is not valid JSON or not a valid request",
    "401": "missing or unknown API key",
    "403": "a premium model for a user without premium",
    "404": "unknown model or endpoint",
    "405": "method not allowed",
    "413": "body over gateway.max_body_bytes",
    "429": "rate limited (the provider's), or too many failed logins from this address",
    "502": "the provider failed or answered something unreadable",
    "503": "the provider is unavailable",
    "504": "the provider did not answer in time",
}


def _errors(ref: str, statuses: list[str] | None = None) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
    return {s: {"description": d, "content": content} for s, d in _ERRORS.items() if statuses is None or s in statuses}


def _completion(summary: str, request: str, error: str, answer: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "security": _SECURITY,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {"description": answer, "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            }},
            **_errors(error),
        },
    }}


def openapi_description() -> dict[str, Any]:
    components: dict[str, Any] = {}
    bodies = {}
    for fmt, name in (("openai", "OpenAIChatRequest"), ("anthropic", "AnthropicMessagesRequest")):
        schema = schemas.request_schema(fmt)
        components.update(schema.pop("$defs", {}))
        bodies[name] = schema
    # count_tokens takes a Messages request without max_tokens (nothing is generated).
    counting = {**bodies["AnthropicMessagesRequest"]}
    counting["required"] = [k for k in counting.get("required", []) if k != "max_tokens"]
    bodies["AnthropicCountTokensRequest"] = counting
    components.update(bodies)
    components["OpenAIError"] = schemas.error_schema("openai")
    components["AnthropicError"] = schemas.error_schema("anthropic")
    listing = {"get": {
        "summary": "What `model` may be: auto, the presets, the configured models, the deployed fine-tunes "
                   "(Anthropic's shape when anthropic-version is sent)",
        "security": _SECURITY,
        "responses": {"200": {"description": "the models", "content": {"application/json": {"schema": {
            "type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}}}}},
            **_errors("OpenAIError", ["401", "429"])},
    }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Token Machine gateway", "version": "1",
                 "description": "OpenAI Chat Completions and Anthropic Messages, in front of any model. Errors "
                                "come in the caller's format: Anthropic's on /v1/messages (or when "
                                "anthropic-version or x-api-key is sent), OpenAI's elsewhere."},
        "paths": {
            "/v1/chat/completions": _completion("OpenAI Chat Completions, streamed (SSE) or whole",
                                                "OpenAIChatRequest", "OpenAIError", "a chat.completion"),
            "/v1/messages": _completion("Anthropic Messages, streamed (SSE) or whole",
                                        "AnthropicMessagesRequest", "AnthropicError", "a message"),
            "/v1/messages/count_tokens": {"post": {
                "summary": "Anthropic's token count for a Messages request (the provider's own count when it has "
                           "one, else a local tokenizer: header x-tm-token-counter); no spend",
                "security": _SECURITY,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/AnthropicCountTokensRequest"}}}},
                "responses": {
                    "200": {"description": "the count", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["input_tokens"],
                        "properties": {"input_tokens": {"type": "integer"}}}}}},
                    **_errors("AnthropicError", ["400", "401", "404", "413", "429"]),
                },
            }},
            "/v1/models": listing,
            "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
