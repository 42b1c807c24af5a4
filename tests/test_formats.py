"""Tests for tm_resources.formats: OpenAI <-> Anthropic wire-format translation, checked against the SDK models."""

from __future__ import annotations

import json

import anthropic.types as at
import openai.types as ot
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support import check_anthropic_request, check_openai_request
from tm_resources import formats as f
from tm_resources.formats import FormatError, Usage

MODEL = "claude-sonnet-4-5"
LOCAL = "qwen3:8b"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

_A_EVENT = pydantic.TypeAdapter(at.RawMessageStreamEvent)


# ---------------------------------------------------------------- SDK validation helpers


def check_event(event: str, data: dict):
    assert data["type"] == event  # the SDK discriminates on the type inside data
    return _A_EVENT.validate_python({"type": event, **data})


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, Usage()),
        ({}, Usage()),
        ({"input_tokens": 10, "output_tokens": 5}, Usage(10, 5)),
        (
            {"input_tokens": 3, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
            Usage(3, 7, 100, 20),
        ),
        ({"input_tokens": 3, "output_tokens": 7, "cache_read_input_tokens": None}, Usage(3, 7)),
    ],
)
def test_usage_from_anthropic(raw, expected):
    assert f.usage_from_anthropic(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, Usage()),
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, Usage(10, 5)),
        (
            {"prompt_tokens": 130, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 100}},
            Usage(30, 5, 100, 0),
        ),
        ({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": None}, Usage(10, 1)),
        ({"prompt_tokens": 50, "completion_tokens": 1, "prompt_cache_hit_tokens": 40}, Usage(10, 1, 40)),
    ],
)
def test_usage_from_openai(raw, expected):
    assert f.usage_from_openai(raw) == expected


def test_usage_to_wire_formats_validate_and_round_trip():
    u = Usage(input_tokens=30, output_tokens=5, cache_read_tokens=100, cache_write_tokens=20)
    o = f.usage_to_openai(u)
    assert o == {
        "prompt_tokens": 150,
        "completion_tokens": 5,
        "total_tokens": 155,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    ot.CompletionUsage.model_validate(o)
    a = f.usage_to_anthropic(u)
    assert a == {
        "input_tokens": 30,
        "output_tokens": 5,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
    }
    at.Usage.model_validate(a)
    assert f.usage_from_anthropic(a) == u
    # OpenAI has no cache-write counter: those tokens come back as plain input.
    assert f.usage_from_openai(o) == Usage(50, 5, 100, 0)
    assert f.usage_from_openai(f.usage_to_openai(Usage(30, 5, 100))) == Usage(30, 5, 100)


# ---------------------------------------------------------------- requests: OpenAI -> Anthropic


def test_openai_request_text_and_params():
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
        ],
        "max_completion_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-42",
        "n": 1,
        "logprobs": False,
        "seed": 7,
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req == {
        "model": MODEL,
        "max_tokens": 100,
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-42"},
    }
    check_anthropic_request(req)


@pytest.mark.parametrize(
    "extra, expected_max",
    [({}, 4096), ({"max_tokens": 50}, 50), ({"max_tokens": 50, "max_completion_tokens": 60}, 60)],
)
def test_openai_request_max_tokens(extra, expected_max):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    assert f.openai_request_to_anthropic(body, model=MODEL)["max_tokens"] == expected_max


def test_openai_request_default_max_tokens_and_temperature_clamp():
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 1.7, "stop": ["a", "b"]}
    req = f.openai_request_to_anthropic(body, model=MODEL, default_max_tokens=123)
    assert req["max_tokens"] == 123
    assert req["temperature"] == 1
    assert req["stop_sequences"] == ["a", "b"]


def test_openai_request_system_with_cache_control_keeps_blocks():
    cc = {"type": "ephemeral"}
    body = {
        "messages": [
            {"role": "system", "content": "static"},
            {"role": "system", "content": [{"type": "text", "text": "big doc", "cache_control": cc}]},
            {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": cc}]},
        ]
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req["system"] == [
        {"type": "text", "text": "static"},
        {"type": "text", "text": "big doc", "cache_control": cc},
    ]
    assert req["messages"] == [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": cc}]}]
    check_anthropic_request(req)


def test_openai_request_images():
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ]
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    check_anthropic_request(req)


OPENAI_TOOL_CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ],
    "tool_choice": "auto",
}


def test_openai_request_tools_and_results():
    req = f.openai_request_to_anthropic(OPENAI_TOOL_CONVERSATION, model=MODEL)
    assert req["system"] == "You are a weather bot."
    assert req["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    assert req["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert req["tool_choice"] == {"type": "auto"}
    check_anthropic_request(req)


def test_openai_request_merges_consecutive_roles_and_drops_empty():
    body = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "b"}]},
            {"role": "user", "content": "three"},
        ]
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "three"},
    ]
    check_anthropic_request(req)


def test_openai_request_tool_results_moved_before_text():
    body = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "t", "arguments": ""}}]},
            {"role": "user", "content": "note"},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req["messages"][1] == {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "t", "input": {}}]}
    assert [b["type"] for b in req["messages"][2]["content"]] == ["tool_result", "text"]


def test_openai_request_sanitizes_tool_ids_consistently():
    body = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "functions.get:0", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get:0", "content": "ok"},
        ]
    }
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req["messages"][1]["content"][0]["id"] == "functions_get_0"
    assert req["messages"][2]["content"][0]["tool_use_id"] == "functions_get_0"


@pytest.mark.parametrize(
    "tool_choice, parallel, expected",
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "now"}}, None, {"type": "tool", "name": "now"}),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ({"type": "function", "function": {"name": "now"}}, False, {"type": "tool", "name": "now", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_openai_tool_choice(tool_choice, parallel, expected):
    body = {"messages": [{"role": "user", "content": "x"}], "tools": OPENAI_TOOL_CONVERSATION["tools"]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert req.get("tool_choice") == expected
    check_anthropic_request(req)


def test_openai_tool_choice_without_tools_is_dropped():
    body = {"messages": [{"role": "user", "content": "x"}], "tool_choice": "none", "tools": []}
    req = f.openai_request_to_anthropic(body, model=MODEL)
    assert "tool_choice" not in req and "tools" not in req


def test_openai_request_does_not_mutate_input():
    body = json.loads(json.dumps(OPENAI_TOOL_CONVERSATION))
    f.openai_request_to_anthropic(body, model=MODEL)
    assert body == OPENAI_TOOL_CONVERSATION


# ---------------------------------------------------------------- requests: Anthropic -> OpenAI


ANTHROPIC_TOOL_CONVERSATION = {
    "model": "claude-x",
    "max_tokens": 1024,
    "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need the tool.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "Thanks. And this picture?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            ],
        },
    ],
    "tools": [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ],
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    "temperature": 0.2,
    "top_k": 5,
    "stop_sequences": ["STOP"],
    "stream": True,
    "metadata": {"user_id": "u-1"},
    "thinking": {"type": "enabled", "budget_tokens": 2000},
}


def test_anthropic_request_tools_images_and_params():
    req = f.anthropic_request_to_openai(ANTHROPIC_TOOL_CONVERSATION, model=LOCAL)
    assert req == {
        "model": LOCAL,
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18C"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Thanks. And this picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
        ],
        "max_tokens": 1024,
        "temperature": 0.2,
        "stop": ["STOP"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    check_openai_request(req)


def test_anthropic_request_tool_only_assistant_and_result_images():
    body = {
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "screen"},
                            {"type": "image", "source": {"type": "url", "url": "https://x.test/s.png"}},
                        ],
                    }
                ],
            },
        ],
    }
    req = f.anthropic_request_to_openai(body, model=LOCAL)
    assert req["messages"] == [
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "screen"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/s.png"}}]},
    ]
    assert "stream" not in req and "stream_options" not in req
    check_openai_request(req)


@pytest.mark.parametrize(
    "choice, expected, parallel",
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        ({"type": "tool", "name": "now"}, {"type": "function", "function": {"name": "now"}}, None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ],
)
def test_anthropic_tool_choice(choice, expected, parallel):
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "now", "input_schema": {"type": "object"}}], "tool_choice": choice}
    req = f.anthropic_request_to_openai(body, model=LOCAL)
    assert req["tool_choice"] == expected
    assert req.get("parallel_tool_calls") == parallel
    check_openai_request(req)


# ---------------------------------------------------------------- request round trips


ROUND_TRIP_OPENAI = [
    pytest.param({"messages": [{"role": "user", "content": "hello"}]}, id="text"),
    pytest.param(
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]},
        id="system-multiturn",
    ),
    pytest.param(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ]
        },
        id="images",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "w", "arguments": '{"c":"x"}'}}],
                },
                {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ],
            "tools": [{"type": "function", "function": {"name": "w", "description": "d", "parameters": {"type": "object", "properties": {"c": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "w"}},
            "parallel_tool_calls": False,
            "max_tokens": 99,
            "temperature": 0.5,
            "stop": ["x"],
            "user": "me",
        },
        id="tools",
    ),
]


@pytest.mark.parametrize("body", ROUND_TRIP_OPENAI)
def test_round_trip_openai_anthropic_openai(body):
    a = f.openai_request_to_anthropic(body, model=MODEL)
    check_anthropic_request(a)
    back = f.anthropic_request_to_openai(a, model=LOCAL)
    check_openai_request(back)
    assert back["messages"] == body["messages"]
    for k in ("tools", "tool_choice", "parallel_tool_calls", "temperature", "stop", "user", "max_tokens"):
        assert back.get(k) == body.get(k, 4096 if k == "max_tokens" else None), k


ROUND_TRIP_ANTHROPIC = [
    pytest.param({"max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}, id="text"),
    pytest.param(
        {"max_tokens": 10, "system": "sys", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]},
        id="system-multiturn",
    ),
    pytest.param(
        {
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                    ],
                }
            ],
        },
        id="images",
    ),
    pytest.param(
        {
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "x", "n": [1, 2]}},
                    {"type": "tool_use", "id": "toolu_2", "name": "w", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "rain"},
                    {"type": "text", "text": "thanks"},
                ]},
            ],
            "tools": [{"name": "w", "description": "d", "input_schema": {"type": "object", "properties": {"c": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "w", "disable_parallel_tool_use": True},
            "stop_sequences": ["x"],
            "metadata": {"user_id": "me"},
        },
        id="tools",
    ),
]


@pytest.mark.parametrize("body", ROUND_TRIP_ANTHROPIC)
def test_round_trip_anthropic_openai_anthropic(body):
    o = f.anthropic_request_to_openai(body, model=LOCAL)
    check_openai_request(o)
    back = f.openai_request_to_anthropic(o, model=MODEL)
    check_anthropic_request(back)
    assert back["messages"] == body["messages"]
    for k in ("system", "tools", "tool_choice", "stop_sequences", "metadata", "max_tokens"):
        assert back.get(k) == body.get(k), k


# ---------------------------------------------------------------- request validation errors


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "request body must be a JSON object"),
        ({}, "messages must be a list"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": []}, "messages must contain at least one non-empty user or assistant message"),
        ({"messages": [{"role": "system", "content": "s"}]}, "messages must contain at least one"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"content": "x"}]}, "messages[0].role must be one of system, developer, user, assistant, tool (got None)"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role 'function' is deprecated"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string or a list of content parts"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is required"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0] must be an object"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type must be one of"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text must be a string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
            "messages[0].content[0].image_url.url must be a data: URL or an http(s) URL",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
            "messages[0].content[0].image_url.url must be a base64 data: URL",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]},
            "messages[1].content[0]: content parts of type 'image_url' are not supported here",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]},
            "messages[2].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]},
            "messages[0].tool_calls[0].function.arguments must be a JSON object",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
            "messages[0].tool_calls[0].id must be a non-empty string",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id must be a non-empty string"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
            "tools[0] must be a function tool",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens must be a positive integer"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop must be a string or a list of strings"),
    ],
)
def test_openai_request_errors(body, message):
    with pytest.raises(FormatError) as e:
        f.openai_request_to_anthropic(body, model=MODEL)
    assert str(e.value).startswith(message)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": {}}, "messages must be a list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be 'user', 'assistant' or 'system' (got 'tool')"),
        ({"messages": [{"role": "system", "content": 3}]}, "messages[0].content must be a string or a list of text blocks"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string or a list of content blocks"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]}, "messages[0].content[0]: content blocks of type 'tool_use' are not supported in user messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
            "messages[0].content[0].source.type must be 'base64' or 'url' (got 'file')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url"}}]}]},
            "messages[0].content[0].source.url must be a non-empty string",
        ),
        ({"system": 5, "messages": []}, "system must be a string or a list of text blocks"),
        ({"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]: tool type 'web_search_20250305' is not supported"),
    ],
)
def test_anthropic_request_errors(body, message):
    with pytest.raises(FormatError) as e:
        f.anthropic_request_to_openai(body, model=LOCAL)
    assert str(e.value).startswith(message)


# ---------------------------------------------------------------- responses


ANTHROPIC_TEXT_RESPONSE = {
    "id": "msg_01ABC",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0},
}

ANTHROPIC_TOOL_RESPONSE = {
    "id": "msg_02",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris", "units": "C"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 50, "output_tokens": 20},
}


def test_anthropic_response_to_openai_text():
    o = f.anthropic_response_to_openai(ANTHROPIC_TEXT_RESPONSE, model="my-alias")
    cc = ChatCompletion.model_validate(o)
    assert cc.id == "chatcmpl-01ABC"
    assert cc.model == "my-alias"
    assert isinstance(o["created"], int)
    assert o["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert o["usage"] == {"prompt_tokens": 112, "completion_tokens": 3, "total_tokens": 115, "prompt_tokens_details": {"cached_tokens": 100}}
    assert f.response_text_openai(o) == "Hello world"
    assert f.stop_reason_openai(o) == "stop"


def test_anthropic_response_to_openai_tool_use():
    o = f.anthropic_response_to_openai(ANTHROPIC_TOOL_RESPONSE, model="m")
    cc = ChatCompletion.model_validate(o)
    msg = o["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"] == [
        {"id": "toolu_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","units":"C"}'}}
    ]
    assert cc.choices[0].finish_reason == "tool_calls"
    assert f.response_text_openai(o) == '[tool_call get_weather {"city":"Paris","units":"C"}]'
    assert f.response_text_anthropic(ANTHROPIC_TOOL_RESPONSE) == '[tool_call get_weather {"city":"Paris","units":"C"}]'


OPENAI_TOOL_RESPONSE = {
    "id": "chatcmpl-xyz",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "qwen3:8b",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Sure.",
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
                    {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}},
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49, "prompt_tokens_details": {"cached_tokens": 32}},
}


def test_openai_response_to_anthropic_tools():
    a = f.openai_response_to_anthropic(OPENAI_TOOL_RESPONSE, model="claude-alias")
    m = at.Message.model_validate(a)
    assert m.id == "msg_xyz" and m.model == "claude-alias" and m.type == "message" and m.role == "assistant"
    assert a["content"] == [
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Rome"}},
        {"type": "tool_use", "id": "call_b", "name": "now", "input": {}},
    ]
    assert a["stop_reason"] == "tool_use" and a["stop_sequence"] is None
    assert a["usage"] == {"input_tokens": 8, "output_tokens": 9, "cache_read_input_tokens": 32, "cache_creation_input_tokens": 0}
    assert f.response_text_anthropic(a) == 'Sure.\n[tool_call get_weather {"city":"Rome"}]\n[tool_call now {}]'
    assert f.response_text_openai(OPENAI_TOOL_RESPONSE) == f.response_text_anthropic(a)
    assert f.stop_reason_anthropic(a) == "tool_use"
    assert f.stop_reason_openai(OPENAI_TOOL_RESPONSE) == "tool_calls"


def test_openai_response_stop_with_tool_calls_becomes_tool_use():
    resp = json.loads(json.dumps(OPENAI_TOOL_RESPONSE))
    resp["choices"][0]["finish_reason"] = "stop"  # older Ollama does this
    assert f.openai_response_to_anthropic(resp, model="m")["stop_reason"] == "tool_use"


def test_openai_response_bad_tool_arguments_and_no_choices():
    resp = json.loads(json.dumps(OPENAI_TOOL_RESPONSE))
    resp["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    with pytest.raises(FormatError, match=r"tool_calls\[0\]\.function\.arguments is not valid JSON"):
        f.openai_response_to_anthropic(resp, model="m")
    with pytest.raises(FormatError, match="no choices"):
        f.openai_response_to_anthropic({"choices": []}, model="m")


@pytest.mark.parametrize(
    "anthropic_reason, openai_reason",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
def test_stop_reason_mapping_anthropic_to_openai(anthropic_reason, openai_reason):
    resp = dict(ANTHROPIC_TEXT_RESPONSE, stop_reason=anthropic_reason)
    o = f.anthropic_response_to_openai(resp, model="m")
    ChatCompletion.model_validate(o)
    assert o["choices"][0]["finish_reason"] == openai_reason


@pytest.mark.parametrize(
    "openai_reason, anthropic_reason",
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"), ("content_filter", "refusal"), (None, "end_turn")],
)
def test_stop_reason_mapping_openai_to_anthropic(openai_reason, anthropic_reason):
    resp = {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": openai_reason}]}
    a = f.openai_response_to_anthropic(resp, model="m")
    at.Message.model_validate(a)
    assert a["stop_reason"] == anthropic_reason


@pytest.mark.parametrize("resp", [ANTHROPIC_TEXT_RESPONSE, ANTHROPIC_TOOL_RESPONSE])
def test_response_round_trip_anthropic(resp):
    back = f.openai_response_to_anthropic(f.anthropic_response_to_openai(resp, model="m"), model="m")
    at.Message.model_validate(back)
    assert back["id"] == resp["id"]
    assert back["stop_reason"] == resp["stop_reason"]
    assert f.response_text_anthropic(back) == f.response_text_anthropic(resp)
    assert f.usage_from_anthropic(back["usage"]) == f.usage_from_anthropic(resp["usage"])


def test_response_round_trip_openai():
    back = f.anthropic_response_to_openai(f.openai_response_to_anthropic(OPENAI_TOOL_RESPONSE, model="m"), model="m")
    ChatCompletion.model_validate(back)
    assert back["id"] == OPENAI_TOOL_RESPONSE["id"]
    assert back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city":"Rome"}'
    assert back["choices"][0]["finish_reason"] == "tool_calls"
    assert back["usage"]["prompt_tokens"] == 40 and back["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


def test_log_helpers_tolerate_garbage():
    assert f.response_text_openai({}) == ""
    assert f.response_text_anthropic({"content": None}) == ""
    assert f.stop_reason_openai({"choices": []}) is None
    assert f.stop_reason_openai(None) is None
    assert f.stop_reason_anthropic(None) is None


# ---------------------------------------------------------------- streaming: Anthropic upstream


def _anthropic_events_text():
    return [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 5},
        }}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo ✓"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def _anthropic_events_tools():
    return [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": "claude", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 400, "output_tokens": 1},
        }}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Two cities."}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking both."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 88}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_anthropic_upstream_events_are_valid_sdk_events():
    # Guards the fixtures themselves: they are what the Anthropic API sends.
    for events in (_anthropic_events_text(), _anthropic_events_tools()):
        for ev, data in events:
            if ev != "ping":
                check_event(ev, data)


def _openai_final(chunks, tools=None):
    """Assemble chunks with the OpenAI SDK's own stream state, as a real client would."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState(input_tools=tools) if tools else ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


@pytest.mark.parametrize("include_usage", [True, False])
def test_anthropic_to_openai_stream_text(include_usage):
    tr = f.AnthropicToOpenAIStream(model="alias", id="chatcmpl-1", include_usage=include_usage)
    chunks = []
    for ev, data in _anthropic_events_text():
        chunks += tr.feed(ev, data)
    assert tr.finish() == []  # message_stop already finished the stream
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert c["id"] == "chatcmpl-1" and c["model"] == "alias" and c["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo ✓"]
    finish_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish_chunks) == 1 and finish_chunks[0]["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 40, "completion_tokens": 15, "total_tokens": 55, "prompt_tokens_details": {"cached_tokens": 10},
        }
    else:
        assert all("usage" not in c for c in chunks)
    final = _openai_final(chunks)
    assert final.choices[0].message.content == "Hello ✓"
    assert final.choices[0].finish_reason == "stop"

    acc = f.OpenAIStreamAccumulator()
    for c in chunks:
        acc.feed(c)
    assert acc.text == "Hello ✓" and acc.finish_reason == "stop" and acc.got_content
    if include_usage:
        assert acc.usage == Usage(input_tokens=30, output_tokens=15, cache_read_tokens=10, cache_write_tokens=0)


def test_anthropic_to_openai_stream_tools():
    tr = f.AnthropicToOpenAIStream(model="alias", id="chatcmpl-2", include_usage=True)
    chunks = []
    for ev, data in _anthropic_events_tools():
        chunks += tr.feed(ev, data)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert tool_deltas == [
        {"index": 0, "id": "toolu_A", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": "Pa'}},
        {"index": 0, "function": {"arguments": 'ris"}'}},
        {"index": 1, "id": "toolu_B", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"city": "Rome"}'}},
    ]
    assert not any("Two cities" in json.dumps(c) for c in chunks)  # thinking is dropped
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    final = _openai_final(chunks, tools)
    msg = final.choices[0].message
    assert msg.content == "Checking both."
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
        ("toolu_A", "get_weather", {"city": "Paris"}),
        ("toolu_B", "get_weather", {"city": "Rome"}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.prompt_tokens == 400 and final.usage.completion_tokens == 88

    # Both accumulators see the same response, whichever side of the translator they sit on.
    oacc, aacc = f.OpenAIStreamAccumulator(), f.AnthropicStreamAccumulator()
    for c in chunks:
        oacc.feed(c)
    for ev, data in _anthropic_events_tools():
        aacc.feed(ev, data)
    for acc in (oacc, aacc):
        assert acc.text == "Checking both."
        assert acc.tool_calls == [
            {"id": "toolu_A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "toolu_B", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        ]
        assert acc.usage == Usage(input_tokens=400, output_tokens=88)
        assert acc.got_content
        assert acc.log_text() == 'Checking both.\n[tool_call get_weather {"city":"Paris"}]\n[tool_call get_weather {"city":"Rome"}]'
    assert oacc.finish_reason == "tool_calls" and aacc.stop_reason == "tool_use"


def test_anthropic_to_openai_stream_finish_without_message_stop_and_error():
    tr = f.AnthropicToOpenAIStream(model="m", id="c", include_usage=True)
    out = tr.feed(*_anthropic_events_text()[0])
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    fin = tr.finish()
    assert [c["choices"][0]["finish_reason"] if c["choices"] else "usage" for c in fin] == ["stop", "usage"]
    assert tr.finish() == [] and tr.feed("message_stop", {"type": "message_stop"}) == []

    tr = f.AnthropicToOpenAIStream(model="m", id="c", include_usage=False)
    fin = tr.finish()  # nothing arrived at all: still a valid, closed stream
    assert [c["choices"][0]["delta"] for c in fin] == [{"role": "assistant", "content": ""}, {}]
    for c in fin:
        ChatCompletionChunk.model_validate(c)

    tr = f.AnthropicToOpenAIStream(model="m", id="c", include_usage=True)
    tr.feed(*_anthropic_events_text()[0])
    err = tr.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert err == [{"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}]
    assert tr.finish() == []


def test_anthropic_accumulator_merges_delta_usage():
    acc = f.AnthropicStreamAccumulator()
    assert not acc.got_content
    acc.feed("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 7}}})
    acc.feed("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 30}})
    acc.feed("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 31, "input_tokens": 6, "cache_read_input_tokens": None}})
    assert acc.usage == Usage(6, 31, 7, 0)
    assert acc.stop_reason == "max_tokens"
    assert acc.text == "" and acc.tool_calls == [] and not acc.got_content


# ---------------------------------------------------------------- streaming: OpenAI upstream


def _oc(delta=None, finish=None, usage=None, choices=True):
    c = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "qwen3:8b"}
    c["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}] if choices else []
    if usage is not None:
        c["usage"] = usage
    return c


def _openai_chunks_text():
    return [
        _oc({"role": "assistant", "content": ""}),
        _oc({"content": "Bon"}),
        _oc({"content": "jour ☀"}),
        _oc({}, "stop"),
        _oc(choices=False, usage={"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24, "prompt_tokens_details": {"cached_tokens": 16}}),
    ]


def _openai_chunks_tools():
    return [
        _oc({"role": "assistant", "content": None}),
        _oc({"reasoning_content": "thinking..."}),
        _oc({"content": "Let me look."}),
        _oc({"tool_calls": [{"index": 0, "id": "call_X", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        _oc({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _oc({"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}),
        _oc({"tool_calls": [{"index": 1, "id": "call_Y", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}),
        _oc({}, "tool_calls"),
        _oc(choices=False, usage={"prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340}),
    ]


def _anthropic_final(events):
    """Assemble events with the Anthropic SDK's own accumulator, as a real client would."""
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot, bufs = None, {}
    for ev, data in events:
        parsed = check_event(ev, data)
        try:
            snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=bufs)
        except TypeError:  # older SDKs have no json_bufs
            snapshot = accumulate_event(event=parsed, current_snapshot=snapshot)
    return snapshot


def _run_openai_upstream(chunks):
    tr = f.OpenAIToAnthropicStream(model="claude-alias", id="msg_up")
    events = []
    for c in chunks:
        events += tr.feed(c)
    events += tr.finish()
    assert tr.finish() == [] and tr.feed(chunks[-1]) == []
    for ev, data in events:
        check_event(ev, data)
    return events


def _assert_block_structure(events):
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop" and events[-2][0] == "message_delta"
    assert [e for e, _ in events].count("message_start") == 1
    open_index = None
    for ev, data in events:
        if ev == "content_block_start":
            assert open_index is None
            open_index = data["index"]
        elif ev == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        elif ev == "content_block_delta":
            assert data["index"] == open_index
    assert open_index is None


def test_openai_to_anthropic_stream_text():
    events = _run_openai_upstream(_openai_chunks_text())
    _assert_block_structure(events)
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"] == "msg_up" and start["model"] == "claude-alias" and start["usage"]["input_tokens"] == 0
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 4, "output_tokens": 4, "cache_read_input_tokens": 16, "cache_creation_input_tokens": 0}
    msg = _anthropic_final(events)
    assert msg.content[0].text == "Bonjour ☀"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 4

    acc = f.AnthropicStreamAccumulator()
    for ev, data in events:
        acc.feed(ev, data)
    assert acc.text == "Bonjour ☀" and acc.stop_reason == "end_turn" and acc.usage == Usage(4, 4, 16, 0)


def test_openai_to_anthropic_stream_tools():
    chunks = _openai_chunks_tools()
    events = _run_openai_upstream(chunks)
    _assert_block_structure(events)
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert starts == [
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_X", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_Y", "name": "now", "input": {}},
    ]
    partial = [d["delta"]["partial_json"] for e, d in events if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert partial == ['{"city":', ' "Oslo"}', "{}"]
    assert not any("thinking..." in json.dumps(d) for _, d in events)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    msg = _anthropic_final(events)
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
    assert msg.content[1].input == {"city": "Oslo"} and msg.content[2].input == {}
    assert msg.stop_reason == "tool_use"

    oacc, aacc = f.OpenAIStreamAccumulator(), f.AnthropicStreamAccumulator()
    for c in chunks:
        oacc.feed(c)
    for ev, data in events:
        aacc.feed(ev, data)
    for acc in (oacc, aacc):
        assert acc.text == "Let me look."
        assert acc.tool_calls == [
            {"id": "call_X", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"id": "call_Y", "name": "now", "arguments": "{}"},
        ]
        assert acc.usage == Usage(300, 40)
        assert acc.got_content
    assert oacc.finish_reason == "tool_calls"


def test_openai_to_anthropic_stream_edge_cases():
    # Nothing but [DONE]: a complete, empty message.
    tr = f.OpenAIToAnthropicStream(model="m", id="msg_e")
    events = tr.finish()
    assert [e for e, _ in events] == ["message_start", "message_delta", "message_stop"]
    for ev, data in events:
        check_event(ev, data)
    # Ollama-style: the whole tool call in one chunk with "stop", usage on the same chunk.
    tr = f.OpenAIToAnthropicStream(model="m", id="msg_o")
    events = tr.feed(_oc({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "ls", "arguments": {"path": "/"}}}]}, "stop",
                         usage={"prompt_tokens": 9, "completion_tokens": 3}))
    events += tr.finish()
    _assert_block_structure(events)
    msg = _anthropic_final(events)
    assert msg.content[0].input == {"path": "/"} and msg.stop_reason == "tool_use"
    assert events[0][1]["message"]["usage"]["input_tokens"] == 9
    # Text after a tool call opens a new block.
    tr = f.OpenAIToAnthropicStream(model="m", id="msg_t")
    events = tr.feed(_oc({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "a", "arguments": "{}"}}]}))
    events += tr.feed(_oc({"content": "after"}))
    events += tr.finish()
    _assert_block_structure(events)
    assert [d["content_block"]["type"] for e, d in events if e == "content_block_start"] == ["tool_use", "text"]
    # Upstream error chunk mid-stream.
    tr = f.OpenAIToAnthropicStream(model="m", id="msg_x")
    tr.feed(_oc({"content": "a"}))
    err = tr.feed({"error": {"message": "backend crashed", "type": "server_error"}})
    assert err == [("error", {"type": "error", "error": {"type": "api_error", "message": "backend crashed"}})]
    assert tr.finish() == []


@pytest.mark.parametrize("make", [_openai_chunks_text, _openai_chunks_tools])
def test_openai_accumulator_matches_sdk(make):
    chunks = make()
    acc = f.OpenAIStreamAccumulator()
    for c in chunks:
        acc.feed(c)
    final = _openai_final(chunks)
    assert acc.text == (final.choices[0].message.content or "")
    assert acc.finish_reason == final.choices[0].finish_reason
    assert [(t["id"], t["name"], t["arguments"]) for t in acc.tool_calls] == [
        (t.id, t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls or ()
    ]


# ---------------------------------------------------------------- SSE over the wire


def test_translated_streams_survive_sse_encoding():
    tr = f.OpenAIToAnthropicStream(model="m", id="msg_s")
    events = [e for c in _openai_chunks_tools() for e in tr.feed(c)] + tr.finish()
    wire = b"".join(f.sse_encode(json.dumps(d), e) for e, d in events)
    parsed = f.SSEParser().feed(wire)
    assert [(p.event, json.loads(p.data)) for p in parsed] == events

    tr = f.AnthropicToOpenAIStream(model="m", id="c", include_usage=True)
    chunks = [c for ev, d in _anthropic_events_tools() for c in tr.feed(ev, d)]
    wire = b"".join(f.sse_encode(json.dumps(c)) for c in chunks) + f.sse_encode("[DONE]")
    parsed = f.SSEParser().feed(wire)
    assert all(p.event is None for p in parsed)
    assert [json.loads(p.data) for p in parsed[:-1]] == chunks and parsed[-1].data == "[DONE]"


SSE_STREAM = (
    "\ufeff: keep-alive comment\r\n"
    "event: message_start\r\n"
    'data: {"text": "héllo — 日本語 🎉"}\r\n'
    "\r\n"
    "data:no-space\n"
    "data:  two spaces\n"
    "\n"
    "event: multi\r"
    "data: line1\r"
    "data: line2\r"
    "id: 7\r"
    "retry: 1500\r"
    "\r"
    "event: no-data-is-not-dispatched\n"
    "\n"
    "data\n"
    "\n"
    "data:\n"
    "data:\n"
    "\n"
    "unknown: field\n"
    "data: last ✓\r\n"
    "\r\n"
    "data: incomplete, never dispatched\n"
).encode()

SSE_EXPECTED = [
    f.SSEEvent("message_start", '{"text": "héllo — 日本語 🎉"}'),
    f.SSEEvent(None, "no-space\n two spaces"),
    f.SSEEvent("multi", "line1\nline2"),
    f.SSEEvent(None, ""),
    f.SSEEvent(None, "\n"),
    f.SSEEvent(None, "last ✓"),
]


def test_sse_parser_whole_stream():
    p = f.SSEParser()
    assert p.feed(SSE_STREAM) == SSE_EXPECTED
    assert p.last_event_id == "7" and p.retry == 1500


@pytest.mark.parametrize("offset", range(1, len(SSE_STREAM)))
def test_sse_parser_split_at_every_offset(offset):
    p = f.SSEParser()
    assert p.feed(SSE_STREAM[:offset]) + p.feed(SSE_STREAM[offset:]) == SSE_EXPECTED


def test_sse_parser_byte_by_byte_and_three_way_splits():
    p = f.SSEParser()
    out = []
    for i in range(len(SSE_STREAM)):
        out += p.feed(SSE_STREAM[i : i + 1])
    assert out == SSE_EXPECTED
    n = len(SSE_STREAM)
    for a in range(1, n, 7):
        for b in range(a, n, 5):
            p = f.SSEParser()
            assert p.feed(SSE_STREAM[:a]) + p.feed(b"") + p.feed(SSE_STREAM[a:b]) + p.feed(SSE_STREAM[b:]) == SSE_EXPECTED


def test_sse_parser_crlf_split_does_not_make_blank_line():
    p = f.SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\ndata: b\r") == []
    assert p.feed(b"\n\r") == [f.SSEEvent(None, "a\nb")]
    assert p.feed(b"\n") == []  # the \n completing the \r\n above, not another blank line


@pytest.mark.parametrize(
    "data, event, wire",
    [
        ("x", None, b"data: x\n\n"),
        ('{"a":1}', "message_delta", b'event: message_delta\ndata: {"a":1}\n\n'),
        ("a\nb", None, b"data: a\ndata: b\n\n"),
        ("a\r\nb\rc", "e", b"event: e\ndata: a\ndata: b\ndata: c\n\n"),
        ("日本", None, "data: 日本\n\n".encode()),
    ],
)
def test_sse_encode(data, event, wire):
    assert f.sse_encode(data, event) == wire
    ev = f.SSEParser().feed(wire)
    assert ev == [f.SSEEvent(event, data.replace("\r\n", "\n").replace("\r", "\n"))]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "status, expected",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (408, "timeout"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
    ],
)
def test_openai_error(status, expected):
    body = f.openai_error(status, "boom")
    assert body == {"error": {"message": "boom", "type": expected, "param": None, "code": None}}
    ot.ErrorObject.model_validate(body["error"])
    assert f.openai_error(429, "slow", type="x", code="rate_limit_exceeded")["error"] == {
        "message": "slow", "type": "x", "param": None, "code": "rate_limit_exceeded",
    }


@pytest.mark.parametrize(
    "status, expected",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error(status, expected):
    body = f.anthropic_error(status, "boom")
    assert body == {"type": "error", "error": {"type": expected, "message": "boom"}}
    if expected != "request_too_large":  # documented by Anthropic but absent from the SDK's union
        at.ErrorResponse.model_validate(body)
    assert f.anthropic_error(400, "m", type="billing_error")["error"]["type"] == "billing_error"


@pytest.mark.parametrize(
    "body, expected",
    [
        (None, ""),
        (b"", ""),
        (b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}', "Incorrect API key provided"),
        ('{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "Overloaded"),
        ({"error": "model 'llama9' not found"}, "model 'llama9' not found"),
        ({"object": "error", "message": "max_tokens too large", "code": 400}, "max_tokens too large"),
        (b'{"detail": [{"loc": ["body"], "msg": "bad"}]}', '[{"loc":["body"],"msg":"bad"}]'),
        (b"<html>502 Bad Gateway</html>\n", "<html>502 Bad Gateway</html>"),
        (b"{not json", "{not json"),
        ({"weird": 1}, '{"weird":1}'),
        ("caf\u00e9 ".encode() + b"\xff", "café \ufffd"),
    ],
)
def test_error_message_from_body(body, expected):
    assert f.error_message_from_body(body) == expected


def test_error_message_from_body_truncates():
    msg = f.error_message_from_body({"error": {"message": "x" * 2000}})
    assert len(msg) == 500 and msg.endswith("...")


def test_system_messages_join_the_top_level_system_for_anthropic():
    cached = {"type": "text", "text": "tools list", "cache_control": {"type": "ephemeral", "ttl": "1h", "scope": "global"}}
    body = {"model": "m", "system": "be brief", "messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": [cached]},
        {"role": "assistant", "content": "hello"}, {"role": "system", "content": "and polite"}]}
    merged = f.merge_system_messages(body)
    assert merged["system"] == [{"type": "text", "text": "be brief"}, cached, {"type": "text", "text": "and polite"}]
    assert [m["role"] for m in merged["messages"]] == ["user", "assistant"]
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert f.merge_system_messages(plain) is plain
    with pytest.raises(FormatError, match="system must be a string or a list of text blocks"):
        f.merge_system_messages({**body, "system": 5})
    with pytest.raises(FormatError, match="at least one 'user' or 'assistant'"):
        f.merge_system_messages({"messages": [{"role": "system", "content": "x"}]})
    with pytest.raises(FormatError, match=r"messages\[1\].content\[0\] must be a text block"):
        f.merge_system_messages({"messages": [{"role": "user", "content": "x"},
                                              {"role": "system", "content": [{"type": "image"}]}]})


def test_a_streamed_tool_call_whose_arguments_come_as_an_object_is_logged():
    # Ollama can send a tool call's arguments parsed, in one chunk; the row keeps them as JSON.
    acc = f.OpenAIStreamAccumulator()
    acc.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}}]})
    acc.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    assert acc.log_text() == '[tool_call get_weather {"city":"Paris"}]'


def test_the_package_exports_every_public_name_of_its_modules():
    # A name a caller can reach only through a submodule, or one in __all__ that is gone, is a broken API.
    import importlib
    import pkgutil

    public = set()
    for info in pkgutil.iter_modules(f.__path__):
        mod = importlib.import_module(f"tm_resources.formats.{info.name}")
        public |= {n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None)
                   == mod.__name__}
    assert set(f.__all__) == public
    namespace: dict = {}
    exec("from tm_resources.formats import *", namespace)
    assert set(namespace) - {"__builtins__"} == public
