"""The read-only `tm` commands: what the request log and the loop's tables hold (`tm requests`,
`tm rules`, `tm grades`, `tm models`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg
import psycopg.rows

from tm_gateway import console
from tm_resources import db
from tm_resources.config import tm_home


def _database(home: Path) -> str:
    url = db.database_url(home)
    db.migrate(url)
    return url


def _table(rows: list[dict], columns: list[str]) -> str:
    return console.table(rows, columns)


def cmd_rules(args: argparse.Namespace) -> int:
    from tm_gateway.ops import rules_report

    if args.verb == "revert":
        from tm_gateway.cli_ops import cmd_rules_revert

        return cmd_rules_revert(args)
    if args.verb is not None or args.rule_id is not None:
        return console.fail(f"tm rules: unknown '{args.verb or args.rule_id}' (tm rules, or tm rules revert ID)")
    url = _database(tm_home())
    with psycopg.connect(url) as conn:
        report = rules_report(conn, include_inactive=args.all)
    if args.json:
        console.emit(report, as_json=True)
        return 0
    hour, rows, ops = report["hour"], report["loop_rules"], report["operator_rules"]
    if hour is None:
        print("no routing rules from the loop yet: it has not run (tm loop run, or wait for the hourly run)")
    else:
        print(f"routing rules of {hour:%Y-%m-%d %H:00} UTC ({len(rows)}):")
        if not rows:
            print("  none in force")
    for r in rows:
        print(f"  [{r['status']}] {r['rule_id']}: {r['reason']}")
        if args.evidence:
            print(f"      evidence: {r['evidence']}")
    if ops:
        print(f"operator rules ({len(ops)}; tm rules revert ID undoes one):")
        for r in ops:
            print(f"  [{r['status']}] {r['rule_id']}: {r['reason']}  (by {r['created_by']}, "
                  f"{r['created_at']:%Y-%m-%d %H:%M})")
            if args.evidence:
                print(f"      evidence: {r['evidence']}")
    return 0


def cmd_grades(args: argparse.Namespace) -> int:
    from tm_resources.grading import WRONG_MODEL_ABOVE

    url = _database(tm_home())
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        hour = db.one(conn.execute("SELECT max(hour) AS h FROM grades"))["h"]
        if hour is None:
            print("no grades yet: the loop has not run (tm loop run, or wait for the hourly run)")
            return 0
        rows = conn.execute(
            "SELECT user_id, grade, avg_quality_score, samples, requests_today, tokens_today, cost_today,"
            " escalations, wrong_model_rate, prompt_quality_avg FROM grades WHERE hour = %s"
            " ORDER BY avg_quality_score DESC NULLS LAST, user_id", (hour,)).fetchall()
    for r in rows:
        # A rate alone reads as alarming on a handful of escalations: show the counts behind it.
        rate, n = r["wrong_model_rate"], r["escalations"] or 0
        r["wrong_model"] = f"{round(rate * n)} of {n} ({rate:.0%})" if n and rate is not None else None
    print(f"leaderboard at {hour:%Y-%m-%d %H:00} UTC (trailing 24 h):")
    print(_table(rows, ["user_id", "grade", "avg_quality_score", "samples", "requests_today", "tokens_today",
                        "cost_today", "wrong_model", "prompt_quality_avg"]))
    print(f"wrong_model: of the user's escalations to a bigger model, those whose local answer had scored above"
          f" {WRONG_MODEL_ABOVE} (the local model would have done)")
    return 0


REQUEST_COLUMNS = ["ts", "user_id", "requested_model", "model", "status", "input_tokens", "output_tokens", "cost_usd",
                   "latency_ms", "route", "cache_hit", "error_class", "prompt"]


def _requests_query(args: argparse.Namespace, after: tuple | None) -> tuple[str, list]:
    where, params = ["true"], []
    if args.user:
        where.append("user_id = %s")
        params.append(args.user)
    if args.model:
        where.append("(model = %s OR requested_model = %s)")
        params += [args.model, args.model]
    if args.status:
        low, high = _status_range(args.status)
        where.append("status BETWEEN %s AND %s")
        params += [low, high]
    if after is not None:
        where.append("(ts, id) > (%s, %s)")
        params += list(after)
    # The newest rows, shown oldest first as a log reads.
    sql = (f"SELECT * FROM (SELECT id, {', '.join(REQUEST_COLUMNS)} FROM requests WHERE {' AND '.join(where)}"
           " ORDER BY ts DESC, id DESC LIMIT %s) recent ORDER BY ts, id")
    return sql, [*params, args.limit]


def _status_range(text: str) -> tuple[int, int]:
    t = text.strip().lower()
    if t in ("ok", "error"):
        return (200, 299) if t == "ok" else (300, 599)
    if len(t) == 3 and t[0].isdigit() and t[1:] == "xx":
        return int(t[0]) * 100, int(t[0]) * 100 + 99
    if t.isdigit():
        return int(t), int(t)
    raise argparse.ArgumentTypeError(f"--status {text!r}: give a code (404), a class (4xx), 'ok' or 'error'")


def _request_line(r: dict) -> dict:
    prompt = " ".join((r["prompt"] or "").split())
    return {**r, "ts": r["ts"].strftime("%Y-%m-%d %H:%M:%S"),
            "prompt": prompt[:48] + ("…" if len(prompt) > 48 else ""),
            "latency_ms": round(r["latency_ms"]) if r["latency_ms"] is not None else None}


def _json_line(r: dict) -> str:
    import json

    return json.dumps({k: (str(v) if k in ("id", "ts") else v) for k, v in r.items()}, ensure_ascii=False)


def cmd_requests(args: argparse.Namespace) -> int:

    from tabulate import tabulate

    try:
        _status_range(args.status) if args.status else None
    except argparse.ArgumentTypeError as err:
        print(f"tm: {err}", file=sys.stderr)
        return 2
    url = _database(tm_home())
    last, headers_shown = None, False
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row, autocommit=True) as conn:
        while True:
            sql, params = _requests_query(args, last)
            rows = conn.execute(sql, params).fetchall()
            if rows:
                last = (rows[-1]["ts"], rows[-1]["id"])
                if args.json:
                    print("\n".join(_json_line(r) for r in rows), flush=True)
                else:
                    shown = [[_request_line(r)[c] for c in REQUEST_COLUMNS] for r in rows]
                    table = tabulate(shown, headers=() if headers_shown else REQUEST_COLUMNS, floatfmt=".4f",
                                     missingval="-")
                    print(table, flush=True)
                    headers_shown = True
            elif last is None and not args.follow:
                print("no requests logged yet" + (" matching these filters" if args.user or args.model
                                                  or args.status else ""))
            if not args.follow:
                return 0
            try:
                time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tm_resources.registry import rollback_version

    url = _database(tm_home())
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        if args.models_cmd == "rollback":
            if not rollback_version(conn, args.version):
                print(f"no version '{args.version}' to roll back", file=sys.stderr)
                return 1
            conn.commit()
            print(f"rolled back {args.version}: the gateway stops serving it now; the next routing_rules run "
                  "drops its swap (tm loop run, or wait for the hour)")
            return 0
        rows = conn.execute("SELECT version, status, task_type, base_model, base_loss, adapter_loss, approver,"
                            " created_at, endpoint_url FROM model_versions ORDER BY created_at DESC").fetchall()
    if not rows:
        print("no fine-tuned versions yet: materialize model_versions in the Dagster UI")
        return 0
    print(_table(rows, ["version", "status", "task_type", "base_model", "base_loss", "adapter_loss", "approver",
                        "created_at", "endpoint_url"]))
    return 0
