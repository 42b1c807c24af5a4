"""`tm detect-local`: find the local model servers on the usual ports (Ollama, LM Studio, vLLM, llama.cpp's
server, mlx_lm.server), tell them apart by what they answer, list their models, and the tm.yaml lines
that would serve them."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tm_resources.capabilities import quantization_of
from tm_resources.config import Config

# The port each server listens on unless told otherwise (llama.cpp's llama-server shares 8080 with
# mlx_lm.server: what answers there says which it is).
DEFAULT_PORTS = {"ollama": 11434, "lmstudio": 1234, "mlx": 8080, "llamacpp": 8080, "vllm": 8000}
DEFAULT_HOSTS = ("127.0.0.1",)
NAMES = {"ollama": "Ollama", "lmstudio": "LM Studio", "vllm": "vLLM", "llamacpp": "llama.cpp server",
         "mlx": "mlx_lm.server"}


@dataclass(frozen=True)
class LocalModel:
    upstream: str                     # the name the server knows it by
    context_window: int | None = None
    quantization: str | None = None   # as the server reports it (Q4_K_M, 4bit), when it does


@dataclass(frozen=True)
class LocalServer:
    kind: str                         # ollama | lmstudio | vllm | llamacpp | mlx
    host: str
    port: int
    version: str | None = None
    models: list[LocalModel] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def as_dict(self) -> dict:
        return {**asdict(self), "name": NAMES[self.kind], "base_url": self.base_url}


async def _json(client: httpx.AsyncClient, url: str, method: str = "GET", body: Any = None) -> Any:
    """The JSON a URL answers with a 2xx, or None (nothing there, an error, not JSON)."""
    try:
        r = await client.request(method, url, json=body)
    except httpx.HTTPError:
        return None
    if not r.is_success:
        return None
    try:
        return r.json()
    except ValueError:
        return None


def _data(listing: Any) -> list[dict]:
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        return [m for m in listing["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return []


async def _ollama_context(client: httpx.AsyncClient, root: str, name: str) -> int | None:
    shown = await _json(client, f"{root}/api/show", "POST", {"model": name})
    info = shown.get("model_info") if isinstance(shown, dict) else None
    if isinstance(info, dict):
        for key, value in info.items():
            if key.endswith(".context_length") and isinstance(value, int):
                return value
    return None


async def probe(host: str, port: int, *, timeout: float = 1.0) -> LocalServer | None:
    """What model server, if any, answers on host:port, and its models. Each kind is recognised by an
    answer only it gives: Ollama's /api/tags and /api/version, LM Studio's /api/v0/models, vLLM's
    /version with models owned_by "vllm", llama.cpp's /props (or models owned_by "llamacpp"), and
    mlx_lm.server's OpenAI listing (or its /health) with none of those."""
    root = f"http://{host}:{port}"
    async with httpx.AsyncClient(timeout=timeout) as client:
        version = await _json(client, f"{root}/api/version")
        tags = await _json(client, f"{root}/api/tags")
        if isinstance(tags, dict) and isinstance(tags.get("models"), list):
            models = []
            for m in tags["models"]:
                if isinstance(m, dict) and isinstance(m.get("name"), str):
                    details = m["details"] if isinstance(m.get("details"), dict) else {}
                    models.append(LocalModel(m["name"], await _ollama_context(client, root, m["name"]),
                                             details.get("quantization_level")))
            return LocalServer("ollama", host, port, version.get("version") if isinstance(version, dict) else None,
                               models)
        lms = _data(await _json(client, f"{root}/api/v0/models"))
        if lms:
            return LocalServer("lmstudio", host, port, None, [
                LocalModel(m["id"], m.get("max_context_length"), m.get("quantization")) for m in lms
                if m.get("type", "llm") in ("llm", "vlm")])
        listing = _data(await _json(client, f"{root}/v1/models"))
        owners = {m.get("owned_by") for m in listing}
        if "vllm" in owners:
            v = await _json(client, f"{root}/version")
            return LocalServer("vllm", host, port, v.get("version") if isinstance(v, dict) else None,
                               [LocalModel(m["id"], m.get("max_model_len")) for m in listing])
        props = await _json(client, f"{root}/props")
        if "llamacpp" in owners or (isinstance(props, dict) and "default_generation_settings" in props):
            props = props if isinstance(props, dict) else {}
            settings = props.get("default_generation_settings") or {}
            n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
            models = [LocalModel(m["id"], n_ctx or (m.get("meta") or {}).get("n_ctx_train")) for m in listing]
            if not models and isinstance(props.get("model_path"), str):
                models = [LocalModel(Path(props["model_path"]).name, n_ctx)]
            return LocalServer("llamacpp", host, port, props.get("build_info"), models)
        health = await _json(client, f"{root}/health")
        if listing or (isinstance(health, dict) and health.get("status") == "ok"):
            # mlx_lm.server's /v1/models lists its Hugging Face cache; without one, it fails: then it
            # serves whatever --model it was started with, under the name "default_model".
            return LocalServer("mlx", host, port, None, [LocalModel(m["id"]) for m in listing]
                               or [LocalModel("default_model")])
    return None


def targets(config: Config | None, hosts: list[str] | None = None,
            ports: list[int] | None = None) -> list[tuple[str, int]]:
    """Each host with each usual port (or the given ones), and the host:port of every configured
    OpenAI-compatible provider; each once."""
    out: dict[tuple[str, int], None] = {}
    for host in hosts or DEFAULT_HOSTS:
        for port in ports or sorted(set(DEFAULT_PORTS.values())):
            out[(host, port)] = None
    for p in (config.providers.values() if config else []):
        if p.kind != "openai":
            continue
        u = urlsplit(p.base_url)
        if u.hostname and u.scheme == "http":
            out[(u.hostname, u.port or 80)] = None
    return list(out)


async def detect(where: list[tuple[str, int]], *, timeout: float = 1.0) -> list[LocalServer]:
    found = await asyncio.gather(*(probe(h, p, timeout=timeout) for h, p in where))
    return [s for s in found if s is not None]


# -- what to add to tm.yaml ----------------------------------------------------------------------


def _model_name(upstream: str) -> str:
    name = upstream.removesuffix(":latest")
    name = name.rsplit("/", 1)[-1]
    return re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)


def additions(servers: list[LocalServer], config: Config | None) -> dict[str, dict]:
    """{"providers": {...}, "models": {...}}: what tm.yaml lacks to serve these servers' models. A
    server already configured (same base URL) keeps its provider name; a model already configured
    there (same upstream name) is left as it is."""
    providers: dict[str, dict] = {}
    models: dict[str, dict] = {}
    have_providers = dict(config.providers) if config else {}
    have_models = dict(config.models) if config else {}
    factors = config.optimize.capabilities.quantization if config else {}
    for s in servers:
        provider = next((n for n, p in have_providers.items() if p.base_url.rstrip("/") == s.base_url), None)
        if provider is None:
            provider = s.kind if s.kind not in have_providers and s.kind not in providers else f"{s.kind}-{s.port}"
            providers[provider] = {"kind": "openai", "base_url": s.base_url}
        for m in s.models:
            if any(c.provider == provider and (c.upstream or n) == m.upstream for n, c in have_models.items()):
                continue
            name = _model_name(m.upstream)
            if name in have_models or name in models:
                name = f"{provider}-{name}"
            entry: dict[str, Any] = {"provider": provider}
            if name != m.upstream:
                entry["upstream"] = m.upstream
            entry["tier"] = "local"
            if m.context_window:
                entry["context_window"] = int(m.context_window)
            # The name says nothing of the quantization the server reports: record it, so capability
            # scores can apply its factor.
            if m.quantization and quantization_of(m.upstream, factors)[0] is None:
                entry["capabilities"] = {"quantization": m.quantization}
            models[name] = entry
    return {"providers": providers, "models": models}


def yaml_lines(added: dict[str, dict]) -> str:
    import yaml

    parts = []
    for section in ("providers", "models"):
        if added[section]:
            parts.append(yaml.safe_dump({section: added[section]}, sort_keys=False, default_flow_style=False))
    return "".join(parts)


def write_additions(path: Path, added: dict[str, dict]) -> None:
    """Add the entries to the config file, keeping its comments, order and layout (ruamel.yaml)."""
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    data = y.load(path.read_text()) or {}
    for section in ("providers", "models"):
        if not added[section]:
            continue
        if data.get(section) is None:
            data[section] = {}
        for name, entry in added[section].items():
            data[section][name] = entry
    with path.open("w") as f:
        y.dump(data, f)
