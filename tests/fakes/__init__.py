"""Fake Anthropic / OpenAI-compatible / PostHog servers on 127.0.0.1 that speak the real wire protocols."""

from tests.fakes.posthog import FakePostHog
from tests.fakes.server import Recorded, ToolCall, free_port
from tests.fakes.upstream import FAULTS, FakeUpstream, _last_user_text, echo_responder, inject_fault

__all__ = ["ToolCall", "Recorded", "FakeUpstream", "FakePostHog", "free_port", "echo_responder", "inject_fault",
           "FAULTS", "_last_user_text"]
