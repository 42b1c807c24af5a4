"""Models served beyond tm.yaml: deployed fine-tunes, entered by the model_versions asset and read by
every gateway replica when the table changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from tm_resources.config import Config, ModelConfig, ProviderConfig, Tier


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    base_url: str
    upstream: str
    tier: str = "local"
    context_window: int = 8192
    base_model: str | None = None


def load_registry(conn: psycopg.Connection) -> list[RegisteredModel]:
    rows = conn.execute("SELECT name, base_url, upstream, tier, context_window, base_model FROM model_registry"
                        " WHERE active ORDER BY name").fetchall()
    return [RegisteredModel(*r) for r in rows]


def register(conn: psycopg.Connection, m: RegisteredModel) -> None:
    conn.execute(
        "INSERT INTO model_registry (name, base_url, upstream, tier, context_window, base_model)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET base_url = EXCLUDED.base_url, upstream = EXCLUDED.upstream,"
        " tier = EXCLUDED.tier, context_window = EXCLUDED.context_window, base_model = EXCLUDED.base_model,"
        " active = true",
        (m.name, m.base_url, m.upstream, m.tier, m.context_window, m.base_model),
    )


def deactivate(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("UPDATE model_registry SET active = false WHERE name = %s AND active", (name,)).rowcount > 0


def served_config(conn: psycopg.Connection, config: Config) -> Config:
    """The configuration with the deployed fine-tunes, as the gateway serves it right now."""
    return with_registry(config, load_registry(conn))


def with_registry(config: Config, entries: list[RegisteredModel]) -> Config:
    """The configuration plus one OpenAI-compatible provider and one model per registered entry.
    A name the configuration already has keeps its configured meaning."""
    if not entries:
        return config
    providers = dict(config.providers)
    models = dict(config.models)
    for e in entries:
        if e.name in config.models:
            continue
        provider = f"registry:{e.name}"
        providers[provider] = ProviderConfig(kind="openai", base_url=e.base_url)
        # If its server is gone (a restart, a crash), its base answers instead.
        fallbacks = [e.base_model] if e.base_model in config.models else []
        models[e.name] = ModelConfig(provider=provider, upstream=e.upstream, tier=Tier(e.tier),
                                     context_window=e.context_window, fallbacks=fallbacks)
    return config.model_copy(update={"providers": providers, "models": models})


def rollback_version(conn: psycopg.Connection[Any], version: str) -> bool:
    """Mark a fine-tuned version rolled back and take it out of every gateway's registry at once:
    requests fall back to its base now, and decision rule 6 drops its swap on the next run."""
    changed = conn.execute("UPDATE model_versions SET status = 'rolled_back' WHERE version = %s"
                           " AND status <> 'rolled_back'", (version,)).rowcount > 0
    deactivate(conn, version)
    return changed
