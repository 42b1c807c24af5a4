"""The gateway's published OpenAPI description, and schemathesis run from it against the live gateway: bodies
that fit the description and bodies that break it, on both endpoints; no 5xx, every 4xx in the caller's own
error format, and one row per request."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.conftest import Gateway

# Enough to walk every branch of both request shapes a few times, and stay well under a minute.
EXAMPLES = 40
SERVED = ["local-test", "claude-test", "auto", None]


def test_the_description_names_both_endpoints_their_bodies_and_error_shapes(gateway: Gateway):
    r = httpx.get(gateway.url + "/openapi.json")  # no key: a client's tooling reads it first
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    chat, messages = spec["paths"]["/v1/chat/completions"]["post"], spec["paths"]["/v1/messages"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIChatRequest")
    assert messages["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AnthropicMessagesRequest")
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert messages["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AnthropicError")
    required = spec["components"]["schemas"]["AnthropicMessagesRequest"]["required"]
    assert set(required) == {"model", "messages", "max_tokens"}


def _in_callers_format(path: str, response) -> str | None:
    """What is wrong with an error body, or None when it is in the caller's format."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if path.startswith("/v1/messages"):
        ok = (isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)
              and isinstance(body["error"].get("type"), str) and isinstance(body["error"].get("message"), str))
    else:
        ok = (isinstance(body, dict) and isinstance(body.get("error"), dict)
              and isinstance(body["error"].get("type"), str) and isinstance(body["error"].get("message"), str))
    return None if ok else f"not an error in the caller's format: {body!r:.300}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"])
def test_schemathesis_finds_no_5xx_and_every_4xx_in_the_callers_format(gateway: Gateway, path, mode):
    # NUL characters included: a row Postgres cannot hold as sent is stored escaped (nul_escaped).
    config = schemathesis.Config.from_dict({"generation": {"allow-x00": True}})
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json", config=config)
    operation = schema[path]["POST"]
    auth = {"authorization": f"Bearer {gateway.key}"}
    calls = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def exchange(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            # Generated model names are served by nobody: most valid bodies go to a real (fake) provider,
            # of either kind, so translation and relaying are fuzzed too, not only the checks.
            case.body["model"] = SERVED[len(calls) % len(SERVED)] or case.body["model"]
        response = case.call(base_url=gateway.url, headers=auth)
        calls.append(response.status_code)
        assert response.status_code < 500, f"{response.status_code} for {case.body!r:.300}: {response.text[:300]}"
        if response.status_code >= 400:
            problem = _in_callers_format(path, response)
            assert problem is None, f"{response.status_code} for {case.body!r:.300}: {problem}"

    exchange()
    assert len(calls) >= EXAMPLES // 2
    if mode is GenerationMode.POSITIVE:
        assert 200 in calls
    # The generated bodies include some the gateway answers, and (negative mode) many it refuses.
    assert len(gateway.rows()) == len(calls)
