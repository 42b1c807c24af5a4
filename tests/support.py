"""Helpers several test files share: loop config and traffic, materializing the loop, a refusing local model,
and SDK validation of request bodies."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pydantic
import yaml
from anthropic.types import message_create_params as a_params
from openai.types.chat import completion_create_params as o_params

from tests.conftest import make_config
from tests.fakes import echo_responder
from tm_assets.assets import loop_assets, requests_source
from tm_assets.checks import loop_checks
from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig, model_resources
from tm_gateway.requestlog import RequestLog

# ---------------------------------------------------------------- the loop

def write_config(tmp_path: Path, **loop) -> Path:
    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", loop=loop)
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def log_traffic(db_url: str, tmp_path: Path, rows: list[dict]) -> None:
    log = RequestLog(db_url, spool_dir=tmp_path / "spool").start()
    for r in rows:
        log.write(r)
    assert log.flush()
    log.close()


def materialize(db_url: str, config_path: Path, hour, posthog: PostHogResource | None = None,
                raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [requests_source, *loop_assets, *loop_checks],
        resources={"postgres": PostgresResource(url=db_url), "tm_config": TokenMachineConfig(path=str(config_path)),
                   "posthog": posthog or PostHogResource(api_key=None), **model_resources()},
        partition_key=hour.strftime("%Y-%m-%d-%H:%M"),
        raise_on_error=raise_on_error,
    )


# ---------------------------------------------------------------- a local model that refuses

REFUSAL = "I'm sorry, but I can't help with that."


def refuses_when_asked(fmt: str, body: dict) -> str:
    """A local model that refuses prompts containing 'refuse', and echoes the others."""
    text = echo_responder(fmt, body)
    return REFUSAL if "refuse" in text else text


# ---------------------------------------------------------------- SDK validation of request bodies

_A_REQUEST = pydantic.TypeAdapter(a_params.MessageCreateParamsNonStreaming)
_O_REQUEST = pydantic.TypeAdapter(o_params.CompletionCreateParamsNonStreaming)


def _force(x):
    """The SDK request types are TypedDicts of Iterables, which pydantic validates lazily: consume them."""
    if isinstance(x, dict):
        return {k: _force(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or hasattr(x, "__next__"):
        return [_force(v) for v in x]
    return x


def check_anthropic_request(req: dict) -> dict:
    body = {k: v for k, v in req.items() if k != "stream"}
    return _force(_A_REQUEST.validate_python(body))


def check_openai_request(req: dict) -> dict:
    body = {k: v for k, v in req.items() if k not in ("stream", "stream_options")}
    return _force(_O_REQUEST.validate_python(body))
