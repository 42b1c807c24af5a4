"""Provider endpoints: where a model's requests go and how they are signed, for Anthropic and for
OpenAI-compatible servers (Ollama, vLLM, LM Studio, mlx_lm.server, any /v1/chat/completions)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tm_resources.config import Config, ProviderConfig

ANTHROPIC_VERSION = "2023-06-01"

# Headers a client may send that an Anthropic upstream must see to behave the same.
ANTHROPIC_PASSTHROUGH_HEADERS = ("anthropic-beta",)


@dataclass(frozen=True)
class Endpoint:
    """One provider as the gateway calls it."""

    name: str
    kind: str  # "anthropic" | "openai": the wire format it speaks
    url: str
    keys: tuple[str, ...]
    connect_timeout_s: float
    timeout_s: float
    extra_headers: tuple[tuple[str, str], ...] = ()

    def headers(self, key_index: int = 0, client_headers: dict[str, str] | None = None) -> dict[str, str]:
        h = {"content-type": "application/json"}
        key = self.keys[key_index % len(self.keys)] if self.keys else None
        if self.kind == "anthropic":
            h["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                h["x-api-key"] = key
            if client_headers:
                for name in ANTHROPIC_PASSTHROUGH_HEADERS:
                    if value := client_headers.get(name):
                        h[name] = value
        elif key:
            h["authorization"] = f"Bearer {key}"
        h.update(self.extra_headers)
        return h


def endpoint_for(name: str, cfg: ProviderConfig) -> Endpoint:
    base = cfg.base_url.rstrip("/")
    if cfg.kind == "anthropic":
        url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
    else:
        url = base + "/chat/completions"
    return Endpoint(
        name=name,
        kind=cfg.kind,
        url=url,
        keys=tuple(cfg.api_keys()),
        connect_timeout_s=cfg.connect_timeout_s,
        timeout_s=cfg.timeout_s,
        extra_headers=tuple(cfg.headers.items()),
    )


def endpoints(config: Config) -> dict[str, Endpoint]:
    return {name: endpoint_for(name, p) for name, p in config.providers.items()}


class SecretScrubber:
    """Removes provider keys from text that may leave the gateway (upstream error messages echo keys)."""

    _KEYLIKE = re.compile(r"\b(sk-(?:ant-)?[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-*]{8,}")

    def __init__(self, secrets: list[str]):
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return self._KEYLIKE.sub(r"\1***", text)

    @classmethod
    def for_config(cls, config: Config) -> SecretScrubber:
        return cls([k for p in config.providers.values() for k in p.api_keys()])
