"""Product events to PostHog through the official SDK, for the loop (decisions, anomalies, coaching briefs) and the
gateway (alerts). Off (a no-op) when no project key is set."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

# A fixed namespace, so re-running an hour sends the same event ids and PostHog keeps one of each.
_EVENT_NAMESPACE = uuid.UUID("6f1c4c1e-6b8a-4f0e-9a55-1d0c2b7f9e10")
DEFAULT_HOST = "https://us.i.posthog.com"


def event_uuid(*parts: object) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, "|".join(str(p) for p in parts)))


class EventSink:
    def __init__(self, api_key: str | None, host: str | None = None, *, sync: bool = False):
        self.enabled = bool(api_key)
        self._client = None
        if api_key:
            from posthog import Posthog

            # Feature flags are not used: no polling, no /flags calls.
            self._client = Posthog(project_api_key=api_key, host=host or DEFAULT_HOST, sync_mode=sync,
                                   enable_local_evaluation=False, disable_geoip=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, sync: bool = False) -> EventSink:
        env = os.environ if env is None else env
        key = env.get("POSTHOG_API_KEY") or env.get("POSTHOG_PROJECT_API_KEY")
        return cls(key, env.get("POSTHOG_HOST"), sync=sync)

    def capture(self, event: str, *, distinct_id: str, properties: dict[str, Any],
                event_id: str | None = None, timestamp: datetime | None = None) -> None:
        if self._client is None:
            return
        try:
            self._client.capture(event, distinct_id=distinct_id, properties=properties,
                                 uuid=event_id, timestamp=timestamp)
        except Exception as err:  # noqa: BLE001 - analytics must never stop the loop
            log.warning("posthog capture failed: %s", type(err).__name__)

    def close(self) -> None:
        if self._client is not None:
            self._client.flush()
            self._client.shutdown()
            self._client = None
