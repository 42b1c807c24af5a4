"""`tm savings`: what the team spent against sending everything to the frontier model, the saving, and the
quality the loop scored, overall or per user, agent, model or task type."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import psycopg

from tm_gateway import console
from tm_gateway.cli_views import _database
from tm_resources import savings as sv
from tm_resources.config import load_config, tm_home

_COLUMNS = ["requests", "cost_usd", "baseline_usd", "saving_usd", "saving_pct", "avg_quality", "scored"]


def cmd_savings(args: argparse.Namespace) -> int:
    try:
        span = sv.parse_since(args.since)
    except ValueError as err:
        return console.fail(str(err))
    config = load_config(args.config)
    until = datetime.now(UTC)
    since = until - span
    with psycopg.connect(_database(tm_home())) as conn:
        total, groups = sv.savings(conn, config, since, until, args.by)
    frontier = config.defaults.frontier_model
    value = {"since": since, "until": until, "frontier_model": frontier, "by": args.by,
             "total": total.as_dict(), "groups": [g.as_dict() for g in groups]}
    if args.json:
        console.emit(value, as_json=True)
        return 0
    head = (f"savings {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC, against every request on "
            f"{frontier or 'the frontier model (none configured: no saving is claimed)'}")
    rows = [{"group": g.group, **g.as_dict()} for g in groups]
    rows.append({**total.as_dict(), "group": "total"})
    columns = ([args.by] if args.by else []) + _COLUMNS
    for r in rows:
        r[args.by or "group"] = r["group"]
    console.emit(value, as_json=False, text=f"{head}\n{console.table(rows, columns, floatfmt='.4f')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("savings", help="cost against the all-frontier baseline, the saving and quality")
    p.add_argument("--since", default="7d", help="how far back: 90m, 24h, 7d, 2w (default 7d)")
    p.add_argument("--by", choices=sorted(sv.GROUPINGS), help="one line per user, agent, model or task type")
    p.add_argument("--config", help="tm.yaml to read the frontier model and its price from")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_savings)
