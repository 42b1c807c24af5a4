"""A fake OpenRouter key endpoint (GET /api/v1/key) answering in OpenRouter's documented shape."""

from __future__ import annotations

from aiohttp import web

from tests.fakes.server import _json_response, _ThreadedServer


class FakeOpenRouter(_ThreadedServer):
    """GET /api/v1/key with `Authorization: Bearer <key>`: {"data": {"usage": ..., "limit": ..., ...}}."""

    _name = "fake-openrouter"

    def __init__(self, api_key: str, *, usage: float = 0.0, limit: float | None = None,
                 limit_reset: str | None = None, usage_monthly: float | None = None, port: int = 0) -> None:
        super().__init__(port)
        self.api_key = api_key
        self.usage, self.limit, self.limit_reset = usage, limit, limit_reset
        self.usage_monthly = usage if usage_monthly is None else usage_monthly
        self.seen_keys: list[str] = []

    @property
    def base_url(self) -> str:
        return f"{self.url}/api/v1"

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/key", self._key)
        return app

    async def _key(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen_keys.append(auth.removeprefix("Bearer "))
        if auth != f"Bearer {self.api_key}":
            return _json_response({"error": {"code": 401, "message": "No auth credentials found"}}, 401)
        remaining = None if self.limit is None else self.limit - self.usage
        return _json_response({"data": {
            "label": f"{self.api_key[:10]}...{self.api_key[-3:]}", "limit": self.limit, "limit_remaining": remaining,
            "limit_reset": self.limit_reset, "include_byok_in_limit": False, "is_free_tier": False,
            "is_provisioning_key": False, "usage": self.usage, "usage_daily": self.usage, "usage_weekly": self.usage,
            "usage_monthly": self.usage_monthly, "byok_usage": 0, "byok_usage_daily": 0, "byok_usage_weekly": 0,
            "byok_usage_monthly": 0, "rate_limit": {"requests": 1000, "interval": "1h", "note": "deprecated"}}})
