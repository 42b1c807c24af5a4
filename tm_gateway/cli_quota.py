"""The quota commands: `tm status`, `tm predict`, `tm set-usage`, `tm reset` and `tm mode`, each a thin shell
around tm_resources.quotas (which the MCP tools call too)."""

from __future__ import annotations

import argparse
from datetime import datetime

import psycopg

from tm_gateway import console
from tm_gateway.cli_views import _database
from tm_resources import quotas
from tm_resources.config import ConfigError, load_config, tm_home

_CONFIG_HELP = "configuration file (default: $TM_CONFIG, ./tm.yaml)"


def _connect(args: argparse.Namespace):
    return load_config(args.config), psycopg.connect(_database(tm_home()), autocommit=True)


def _hours(h: float | None) -> str | None:
    if h is None:
        return None
    return f"{h / 24:.1f} d" if h >= 48 else f"{h:.1f} h"


def _local(at: datetime | None, tz: str) -> str | None:
    from zoneinfo import ZoneInfo

    return None if at is None else f"{at.astimezone(ZoneInfo(tz)):%a %Y-%m-%d %H:%M}"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config, conn = _connect(args)
        with conn:
            found = quotas.status(conn, config, provider=args.provider)
    except (ConfigError, ValueError) as err:
        return console.fail(str(err))
    rows = [{"provider": s.provider, "state": s.state, "used": quotas.amount_text(s.used, s.unit),
             "limit": quotas.amount_text(s.limit, s.unit) if s.limit else None,
             "used_%": None if s.used_fraction is None else f"{s.used_fraction:.0%}",
             "rate/h": quotas.amount_text(s.rate_per_h, s.unit),
             "exhausted in": None if s.exhausts_in_h is None else
             f"{_hours(s.exhausts_in_h)} ({_hours(s.exhausts_early_h) or '-'} to "
             f"{_hours(s.exhausts_late_h) or 'later'})",
             "resets": _local(s.reset_at, s.timezone)} for s in found]
    text = console.table(rows, ["provider", "state", "used", "limit", "used_%", "rate/h", "exhausted in", "resets"])
    text += "\n\n" + "\n".join(s.summary for s in found)
    console.emit([s.as_dict() for s in found], as_json=args.json, text=text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    try:
        config, conn = _connect(args)
        with conn:
            found = quotas.predict(conn, config, hours=args.hours, provider=args.provider)
    except (ConfigError, ValueError) as err:
        return console.fail(str(err))

    def share(p: dict, key: str) -> str | None:
        f = p["projected_fraction"]
        return None if f is None else f"{f[key]:.0%}"

    rows = [{"provider": p["provider"], "now": quotas.amount_text(p["used"], p["unit"]),
             f"in {args.hours} h": quotas.amount_text(p["projected_used"]["expected"], p["unit"]),
             "of limit": share(p, "expected"),
             "range": None if p["projected_fraction"] is None else f"{share(p, 'low')} to {share(p, 'high')}",
             "runs out": "yes" if p["exhausts_within"] else "no", "resets": "yes" if p["resets_within"] else "no"}
            for p in found]
    text = console.table(rows, ["provider", "now", f"in {args.hours} h", "of limit", "range", "runs out", "resets"])
    console.emit(found, as_json=args.json, text=text)
    return 0


def cmd_set_usage(args: argparse.Namespace) -> int:
    try:
        config, conn = _connect(args)
        with conn:
            done = quotas.set_usage(conn, config, args.provider, args.usage)
            now = quotas.status(conn, config, provider=args.provider)[0]
    except (ConfigError, ValueError) as err:
        return console.fail(str(err))
    console.emit({**done, "status": now.as_dict()}, as_json=args.json,
                 text=f"{args.provider}: usage set to {quotas.amount_text(done['used'], done['quota_unit'])}"
                      f" at {done['set_at']:%Y-%m-%d %H:%M} UTC; what is logged from now on adds to it.\n{now.summary}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    try:
        config, conn = _connect(args)
        with conn:
            done = quotas.record_reset(conn, config, args.provider)
            now = quotas.status(conn, config, provider=args.provider)[0]
    except (ConfigError, ValueError) as err:
        return console.fail(str(err))
    console.emit({**done, "status": now.as_dict()}, as_json=args.json,
                 text=f"{args.provider}: quota reset at {done['reset_at']:%Y-%m-%d %H:%M} UTC.\n{now.summary}")
    return 0


def cmd_mode(args: argparse.Namespace) -> int:
    try:
        config, conn = _connect(args)
        with conn:
            if args.mode is not None:
                quotas.set_loop_mode(conn, args.mode)
            mode, source = quotas.loop_mode(conn, config)
    except (ConfigError, ValueError) as err:
        return console.fail(str(err))
    what = {"auto": "rules are applied", "dry-run": "rules are proposed, not applied",
            "manual": "rules are computed and shown, never applied"}[mode]
    text = (f"loop mode: {mode} ({what}); from {source}"
            + ("; the next loop run reads it" if args.mode is not None else ""))
    console.emit({"mode": mode, "source": source, "changed": args.mode is not None}, as_json=args.json, text=text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the quota commands to the `tm` parser."""

    def command(name: str, help_: str, example: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=f"{help_[0].upper()}{help_[1:]}.",
                           epilog=f"example: {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="JSON for scripts")
        p.add_argument("--config", help=_CONFIG_HELP)
        p.set_defaults(func=func)
        return p

    st = command("status", "each provider's quota: used since its last reset, its state, and when it runs out "
                 "at the current rate", "tm status anthropic", cmd_status)
    st.add_argument("provider", nargs="?", help="one provider (default: all)")
    pr = command("predict", "where each quota will stand after the next hours at the current rate, with its "
                 "range", "tm predict --hours 48", cmd_predict)
    pr.add_argument("provider", nargs="?", help="one provider (default: all)")
    pr.add_argument("--hours", type=int, default=24, help="how far ahead (default 24)")
    su = command("set-usage", "record what the provider's own dashboard says is used now (a percentage of the "
                 "limit, or an amount); usage logged afterwards adds to it", "tm set-usage anthropic 79%",
                 cmd_set_usage)
    su.add_argument("provider")
    su.add_argument("usage", help="79%%, or an amount in the quota's unit: 1200000, 1.2M, $12.50")
    rs = command("reset", "record that a provider's quota starts again now", "tm reset anthropic", cmd_reset)
    rs.add_argument("provider")
    mo = command("mode", "show or set the loop's mode (auto: rules applied; dry-run: proposed; manual: shown "
                 "only), stored in the database and read by the next loop run, over tm.yaml's loop.mode",
                 "tm mode dry-run", cmd_mode)
    mo.add_argument("mode", nargs="?", choices=quotas.MODES, help="the new mode (default: show the current one)")
