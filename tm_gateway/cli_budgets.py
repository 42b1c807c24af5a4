"""`tm budgets set|list|clear`: the spend limits and token pools every replica enforces, changed at run time."""

from __future__ import annotations

import argparse

import psycopg

from tm_gateway import budgets as bg
from tm_gateway import console
from tm_resources import db
from tm_resources.config import load_config, tm_home


def _connect() -> psycopg.Connection:
    url = db.database_url(tm_home())
    db.migrate(url)
    return psycopg.connect(url)


def cmd_budgets(args: argparse.Namespace) -> int:
    try:
        with _connect() as conn:
            if args.budgets_cmd == "set":
                bg.set_limit(conn, args.scope, args.name, args.period, args.amount)
                unit = "standard tokens" if args.scope == "pool" else "USD"
                said = {"scope": args.scope, "subject": args.name, "period": args.period, "amount": args.amount}
                console.emit(said, as_json=args.json, text=f"{args.scope} {args.name}: {args.amount:g} {unit} per"
                             f" {args.period}, in force on every replica within a second")
                return 0
            if args.budgets_cmd == "clear":
                n = bg.clear_limit(conn, args.scope, args.name, args.period)
                if not n:
                    return console.fail(f"no limit set for {args.scope} {args.name}"
                                        f"{' ' + args.period if args.period else ''} (tm budgets list)", 1)
                console.emit({"cleared": n}, as_json=args.json,
                             text=f"cleared {n} limit(s) of {args.scope} {args.name}; tm.yaml's apply again, if any")
                return 0
            return _list(conn, args)
    except ValueError as err:
        return console.fail(str(err))


def _list(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    rows = bg.report(conn, load_config(args.config))
    if not rows and not args.json:
        print("no budgets or pools: set them in tm.yaml (budgets:) or with tm budgets set")
        return 0
    console.emit(rows, as_json=args.json, text=console.table(
        rows, ["scope", "subject", "period", "amount", "used", "fraction", "resets_at", "source"], floatfmt=".2f"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("budgets", help="spend limits (USD per day / week / month) and team token pools")
    bsub = b.add_subparsers(dest="budgets_cmd", required=True)
    bs = bsub.add_parser("set", help="set a limit, over tm.yaml's; every replica obeys it within a second")
    bs.add_argument("scope", choices=bg.SCOPES, help="user, team, key (by id, k_...), or pool (a team's tokens)")
    bs.add_argument("name", help="the user ('*': every user), team or key id")
    bs.add_argument("period", choices=bg.PERIODS, help="calendar day, week or month (pools: month)")
    bs.add_argument("amount", type=float, help="USD; for a pool, standard tokens")
    bl = bsub.add_parser("list", help="every limit in force and what it has used this period")
    bl.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    bc = bsub.add_parser("clear", help="remove a limit set with tm budgets set")
    bc.add_argument("scope", choices=bg.SCOPES)
    bc.add_argument("name")
    bc.add_argument("period", nargs="?", choices=bg.PERIODS, help="default: every period of that name")
    for p in (bs, bl, bc):
        p.add_argument("--json", action="store_true", help="JSON, for scripts")
    b.set_defaults(func=cmd_budgets)
