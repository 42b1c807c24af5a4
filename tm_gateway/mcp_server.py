"""`tm mcp`: the operator's questions as MCP tools (the official `mcp` package's server) for chat clients;
read-only unless the caller's Token Machine key is an admin key."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from tm_gateway import console, keys, ops
from tm_resources import quotas
from tm_resources.config import Config, ConfigError, load_config
from tm_resources.operator_rules import RuleNotFound

KEY_ENV = "TM_API_KEY"

INSTRUCTIONS = """Token Machine is the team's LLM gateway. These tools answer an operator's questions about it:
how much of each provider's quota is used and when it runs out (status, predict), which models exist
and what they are good at (providers), which agents and users send work a cheaper model serves as well
and what that would save (analyze), the overrides that would move that work (optimize; with apply=true
it writes them as rules, which needs an admin key), and the rules in force (rules; revert_rule undoes
an operator rule, admin key too)."""


@dataclass(frozen=True)
class Session:
    conn: psycopg.Connection
    config: Config
    key: keys.KeyInfo


def _caller_key(ctx: Context) -> str | None:
    """The key the caller presented: its HTTP request's Authorization (or x-api-key) header, or on stdio,
    where there is no request, the key the server was started with."""
    headers = ctx.headers
    if headers is None:
        return os.environ.get(KEY_ENV)
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def _plain(value: Any) -> Any:
    """What a tool returns: plain JSON (times as ISO 8601), the same shape `tm ... --json` prints."""
    return json.loads(console.dumps(value))


class ToolServer:
    """The MCP server and what each tool call needs: a connection, the configuration read afresh (the
    operator may have edited tm.yaml), and the caller's key, checked on every call so a revoked key
    stops working at once. Adding a tool is a function under `build` that opens `self.session(ctx)`
    (`admin=True` when it changes anything), as `status` does."""

    def __init__(self, database_url: str, config_file: Path):
        self.database_url = database_url
        self.config_file = config_file
        self.mcp = MCPServer("token-machine", instructions=INSTRUCTIONS)
        self.build()

    @contextmanager
    def session(self, ctx: Context, *, admin: bool = False) -> Iterator[Session]:
        try:
            config = load_config(self.config_file)
        except ConfigError as err:
            raise ToolError(str(err)) from None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            key = keys.key_in_force(conn, _caller_key(ctx))
            if key is None:
                raise ToolError("no Token Machine key in force: start `tm mcp` with TM_API_KEY set to your key"
                                " (stdio), or send Authorization: Bearer <key> (HTTP)")
            if admin and not key.admin:
                raise ToolError(f"this tool changes the gateway's rules and needs an admin key; key {key.id}"
                                f" (user {key.user_id}) is not one: an admin runs `tm keys create --user NAME --admin`")
            yield Session(conn, config, key)

    def build(self) -> None:
        mcp = self.mcp

        @mcp.tool(description="Each provider's quota (or one provider's): usage since its last reset, limit,"
                  " state (ok, warning, critical, exhausted), the current rate, and when at this rate it runs"
                  " out, with an interval, compared with its next reset.")
        def status(ctx: Context, provider: str | None = None) -> dict:
            with self.session(ctx) as s:
                try:
                    return {"providers": _plain([q.as_dict() for q in quotas.status(s.conn, s.config,
                                                                                    provider=provider)])}
                except ConfigError as err:
                    raise ToolError(str(err)) from None

        @mcp.tool(description="Where each provider's quota (or one's) will stand `hours` from now (1 to a"
                  " week) at the team's usual pace, with an interval, and whether it runs out or resets first:"
                  " 'when will I run out of Anthropic tokens?'")
        def predict(ctx: Context, hours: int = 24, provider: str | None = None) -> dict:
            with self.session(ctx) as s:
                try:
                    return {"forecasts": _plain(quotas.predict(s.conn, s.config, hours=hours, provider=provider))}
                except (ConfigError, ValueError) as err:
                    raise ToolError(str(err)) from None

        @mcp.tool(description="Providers and their models: tier, price per million tokens, and capability"
                  " scores 0-1 (coding, reasoning, creative, instruction_following, context, speed), with where"
                  " each score comes from (learned from the loop's evidence, or seeded from tm.yaml).")
        def providers(ctx: Context) -> dict:
            with self.session(ctx) as s:
                return {"providers": _plain(ops.providers_report(s.conn, s.config))}

        @mcp.tool(description="Which agents and users send work a cheaper model serves as well: per agent or"
                  " user and task type, the model used now, the cheaper one, the quality evidence on both, and"
                  " the monthly saving. type: all, agents or users.")
        def analyze(ctx: Context, type: str = "all") -> dict:
            with self.session(ctx) as s:
                try:
                    return _plain(ops.analysis_report(s.conn, s.config, type))
                except ValueError as err:
                    raise ToolError(str(err)) from None

        @mcp.tool(description="The overrides the analysis proposes (agent or user + task type -> a cheaper"
                  " model). safe_only: only those whose evidence says quality holds. apply=true writes them as"
                  " rules the gateway obeys at once (needs an admin key); each is undone by revert_rule.")
        def optimize(ctx: Context, apply: bool = False, safe_only: bool = False) -> dict:
            with self.session(ctx, admin=apply) as s:
                return _plain(ops.optimize_report(s.conn, s.config, apply=apply, safe_only=safe_only,
                                                  by=f"{s.key.user_id} (mcp, key {s.key.id})"))

        @mcp.tool(description="The routing rules in force: the loop's (newest hour) and the operator's"
                  " overrides. include_inactive: also manual mode's rules and reverted overrides.")
        def rules(ctx: Context, include_inactive: bool = False) -> dict:
            with self.session(ctx) as s:
                return _plain(ops.rules_report(s.conn, include_inactive=include_inactive))

        @mcp.tool(description="Take an operator rule (op-N, from rules or optimize) out of force; needs an"
                  " admin key.")
        def revert_rule(ctx: Context, rule_id: str) -> dict:
            with self.session(ctx, admin=True) as s:
                try:
                    return _plain(ops.revert_rule(s.conn, rule_id, by=f"{s.key.user_id} (mcp, key {s.key.id})"))
                except RuleNotFound as err:
                    raise ToolError(str(err)) from None


def serve(database_url: str, config_file: Path, *, http: bool = False, host: str = "127.0.0.1",
          port: int = 8788) -> int:
    server = ToolServer(database_url, config_file).mcp
    if http:
        server.run("streamable-http", host=host, port=port)
    else:
        server.run("stdio")
    return 0
