"""Operator rules: overrides an operator applied by hand (`tm optimize --apply`, the MCP optimize tool),
kept apart from the loop's hourly routing_rules so the loop's rewrite never drops them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from tm_resources.db import one

COLUMNS = ("id, created_at, created_by, action, agent, user_id, task_type, model, target_model, reason, evidence,"
           " reverted_at, reverted_by")


class RuleNotFound(LookupError):
    """An id that names no operator rule in force, worded for the operator."""


@dataclass(frozen=True)
class OperatorRule:
    id: int
    created_at: datetime
    created_by: str
    action: str
    agent: str | None
    user_id: str | None
    task_type: str | None
    model: str | None
    target_model: str
    reason: str
    evidence: dict = field(default_factory=dict)
    reverted_at: datetime | None = None
    reverted_by: str | None = None

    @property
    def rule_id(self) -> str:
        return f"op-{self.id}"

    @property
    def subject(self) -> str:
        return f"agent {self.agent}" if self.agent else f"user {self.user_id}"

    def as_dict(self) -> dict:
        return {"rule_id": self.rule_id, "action": self.action, "agent": self.agent, "user_id": self.user_id,
                "task_type": self.task_type, "model": self.model, "target_model": self.target_model,
                "reason": self.reason, "evidence": self.evidence, "created_at": self.created_at,
                "created_by": self.created_by, "reverted_at": self.reverted_at, "reverted_by": self.reverted_by,
                "status": "reverted" if self.reverted_at else "active"}


def list_rules(conn: psycopg.Connection, *, include_reverted: bool = False) -> list[OperatorRule]:
    sql = f"SELECT {COLUMNS} FROM operator_rules"
    if not include_reverted:
        sql += " WHERE reverted_at IS NULL"
    return [OperatorRule(*r) for r in conn.execute(sql + " ORDER BY id")]


def apply_override(conn: psycopg.Connection, *, by: str, target_model: str, reason: str, agent: str | None = None,
                   user_id: str | None = None, task_type: str | None = None, model: str | None = None,
                   evidence: dict | None = None) -> OperatorRule:
    """Write an override for an agent's or a user's work (of one task type, or all); one already in
    force for the same agent or user and type is reverted first, so applying twice replaces."""
    if (agent is None) == (user_id is None):
        raise ValueError("an override steers either an agent's or a user's work")
    with conn.transaction():
        conn.execute(
            "UPDATE operator_rules SET reverted_at = now(), reverted_by = %s WHERE reverted_at IS NULL"
            " AND agent IS NOT DISTINCT FROM %s AND user_id IS NOT DISTINCT FROM %s"
            " AND task_type IS NOT DISTINCT FROM %s", (f"{by} (replaced)", agent, user_id, task_type))
        row = one(conn.execute(
            "INSERT INTO operator_rules (created_by, action, agent, user_id, task_type, model, target_model, reason,"
            f" evidence) VALUES (%s, 'override', %s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
            (by, agent, user_id, task_type, model, target_model, reason, json.dumps(evidence or {}, default=str)),
        ))
    return OperatorRule(*row)


def parse_rule_id(text: str) -> int | None:
    m = re.fullmatch(r"(?:op-)?(\d+)", text.strip())
    return int(m.group(1)) if m else None


def revert(conn: psycopg.Connection, rule_id: str, *, by: str) -> OperatorRule:
    """Take an operator rule out of force now (the gateway stops obeying it within its refresh interval)."""
    n = parse_rule_id(rule_id)
    if n is None:
        raise RuleNotFound(f"'{rule_id}' is not an operator rule's id (op-N, as `tm rules` lists them); the loop's"
                           " own rules are rewritten every hour: change loop.mode or loop.thresholds for those")
    with conn.transaction():
        row = conn.execute(
            f"UPDATE operator_rules SET reverted_at = now(), reverted_by = %s WHERE id = %s AND reverted_at IS NULL"
            f" RETURNING {COLUMNS}", (by, n)).fetchone()
    if row is None:
        raise RuleNotFound(f"no operator rule op-{n} in force (`tm rules` lists them; `tm rules --all` the reverted)")
    return OperatorRule(*row)
