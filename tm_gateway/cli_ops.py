"""The operator's `tm` commands: providers and capability scores, analyze, optimize, rules revert,
detect-local, and the MCP server that answers the same questions for chat clients."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from pathlib import Path
from typing import Any

import psycopg

from tm_gateway import console
from tm_gateway.cli_views import _database
from tm_resources.capabilities import CAPABILITIES
from tm_resources.config import EXAMPLE_CONFIG, Config, config_path, load_config, tm_home
from tm_resources.operator_rules import RuleNotFound


def operator() -> str:
    """Who is acting, for the rule's record: $TM_USER, else the login name."""
    return os.environ.get("TM_USER") or getpass.getuser() or "operator"


def _connect() -> psycopg.Connection:
    return psycopg.connect(_database(tm_home()), autocommit=True)


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_providers(args: argparse.Namespace) -> int:
    from tm_gateway.ops import provider_rows, providers_report

    config = _config(args)
    with _connect() as conn:
        report = providers_report(conn, config)
    rows = provider_rows(report)
    text = console.table(rows, ["provider", "model", "tier", "$/M in", "$/M out", "quant", *CAPABILITIES],
                         floatfmt=".2f")
    text += ("\n* learned from the loop's scored requests (blended with the tm.yaml seed where there is one);"
             " others seeded from tm.yaml (models.<name>.capabilities) or, for context, the context window")
    console.emit(report, as_json=args.json, text=text)
    return 0


def _opportunity_rows(items: list[dict]) -> list[dict]:
    return [{"who": f"{o['kind']} {o['who']}", "task_type": o["task_type"], "now": o["model"],
             "requests": o["requests"], "quality_now": o["evidence"]["current"].get("avg_quality"),
             "cheaper": o["proposed_model"],
             "quality_cheaper": o["evidence"]["proposed"].get("avg_quality",
                                                               o["evidence"]["proposed"].get("capability")),
             "samples": o["evidence"]["proposed"].get("samples", 0), "basis": o["basis"],
             "safe": "yes" if o["safe"] else "no", "$/month saved": o["monthly_saving_usd"]} for o in items]


_OPPORTUNITY_COLUMNS = ["who", "task_type", "now", "requests", "quality_now", "cheaper", "quality_cheaper", "samples",
                        "basis", "safe", "$/month saved"]


def cmd_analyze(args: argparse.Namespace) -> int:
    from tm_gateway.ops import analysis_report

    config = _config(args)
    with _connect() as conn, console.working("reading the scored requests…"):
        report = analysis_report(conn, config, args.type)
    if not report["opportunities"]:
        text = (f"nothing to move: over {report['scored_requests']} scored requests of the last "
                f"{report['window_days']:g} days, no agent or user sends work a cheaper model serves as well"
                if report["scored_requests"] else
                "no scored requests yet: the loop scores each hour (tm loop run, or wait for the hourly run)")
    else:
        text = "\n".join([
            console.table(_opportunity_rows(report["opportunities"]), _OPPORTUNITY_COLUMNS, floatfmt=".2f"),
            f"${report['monthly_saving_usd']:.2f} a month in all, extrapolated from {report['observed_days']:.2f} days"
            f" of scored traffic; quality: the loop's 0-1 score on the task type, team-wide; `safe`: enough"
            f" samples that its lower bound stays within {config.optimize.max_quality_drop} of the current model;"
            " tm optimize --apply writes them as rules"])
    console.emit(report, as_json=args.json, text=text)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from tm_gateway.ops import optimize_report

    config = _config(args)
    with _connect() as conn, console.working("reading the scored requests…"):
        report = optimize_report(conn, config, apply=args.apply, safe_only=args.safe_only, by=operator())
    if not report["proposals"]:
        text = "no override to propose" + (" whose evidence says quality holds" if args.safe_only else "") + \
            " (tm analyze shows the evidence)"
    else:
        rows = [{"rule": r["rule_id"], "who": f"agent {r['agent']}" if r["agent"] else f"user {r['user_id']}",
                 "task_type": r["task_type"], "from": r["model"], "to": r["target_model"],
                 "$/month saved": r["evidence"]["monthly_saving_usd"], "safe": "yes" if r["evidence"]["safe"] else "no"}
                for r in report["rules"]] if args.apply else \
            [{"who": f"agent {p['agent']}" if p["agent"] else f"user {p['user_id']}", "task_type": p["task_type"],
              "from": p["model"], "to": p["target_model"], "$/month saved": p["evidence"]["monthly_saving_usd"],
              "safe": "yes" if p["safe"] else "no"} for p in report["proposals"]]
        cols = (["rule"] if args.apply else []) + ["who", "task_type", "from", "to", "$/month saved", "safe"]
        tail = ("applied: the gateway obeys them within a second; tm rules lists them, tm rules revert ID undoes one"
                if args.apply else "proposed only: --apply writes them as rules (--safe-only: the safe ones)")
        text = console.table(rows, cols, floatfmt=".2f") + "\n" + tail
    console.emit(report, as_json=args.json, text=text)
    return 0


def cmd_rules_revert(args: argparse.Namespace) -> int:
    from tm_gateway.ops import revert_rule

    if not args.rule_id:
        return console.fail("tm rules revert needs the rule's id: tm rules revert op-3 (tm rules lists them)")
    with _connect() as conn:
        try:
            rule = revert_rule(conn, args.rule_id, by=operator())
        except RuleNotFound as err:
            return console.fail(str(err), 1)
    console.emit(rule, as_json=args.json, text=f"reverted {rule['rule_id']} ({rule['reason']}): the gateway stops"
                 " obeying it within a second")
    return 0


def cmd_detect_local(args: argparse.Namespace) -> int:
    from tm_gateway import detect_local

    path = config_path(args.config)
    config = load_config(path)
    try:
        ports = [int(p) for p in args.ports.split(",")] if args.ports else None
    except ValueError:
        return console.fail(f"--ports {args.ports!r}: a comma-separated list of port numbers (11434,1234)")
    hosts = [h for item in args.hosts or [] for h in item.split(",") if h] or None
    where = detect_local.targets(config, hosts, ports)
    servers = asyncio.run(detect_local.detect(where, timeout=args.timeout))
    added = detect_local.additions(servers, config)
    lines = detect_local.yaml_lines(added)
    probed = [f"{h}:{p}" for h, p in where]
    report: dict[str, Any] = {"probed": probed, "servers": [s.as_dict() for s in servers],
              "add": added, "yaml": lines, "written": None}
    if args.write and lines:
        if path.resolve() == EXAMPLE_CONFIG.resolve():
            return console.fail("no tm.yaml to write to: `tm init` writes one here, or pass --config FILE")
        detect_local.write_additions(Path(path), added)
        report["written"] = str(path)
    if not servers:
        text = (f"no local model server answers on {', '.join(probed)}: start Ollama, LM Studio's server,"
                " vLLM, llama-server or mlx_lm.server, or name other hosts with --hosts")
    else:
        rows = [{"server": s.as_dict()["name"], "url": s.base_url, "version": s.version, "model": m.upstream,
                 "context": m.context_window, "quant": m.quantization} for s in servers for m in s.models]
        text = console.table(rows, ["server", "url", "version", "model", "context", "quant"])
        if not lines:
            text += "\ntm.yaml already serves all of them"
        elif report["written"]:
            text += f"\nadded to {path}:\n{lines}"
        else:
            text += f"\nto serve them, add to tm.yaml (or run again with --write):\n{lines}"
    console.emit(report, as_json=args.json, text=text)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from tm_gateway.mcp_server import serve

    config_file = config_path(args.config)
    load_config(config_file)  # a bad file is refused here, not at the first tool call
    # On stdio, stdout is the protocol: whatever starting the database prints must go elsewhere.
    with contextlib.redirect_stdout(sys.stderr):
        url = _database(tm_home())
    return serve(url, config_file, http=args.http, host=args.host, port=args.port)


def _with_config(p: argparse.ArgumentParser, json_help: str = "the same as JSON, for scripts") -> None:
    p.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    p.add_argument("--json", action="store_true", help=json_help)


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    pr = sub.add_parser("providers", help="providers, their models, tier, price and capability scores",
                        formatter_class=fmt, description="Each configured model with its provider, tier, price per"
                        " million tokens and capability scores (0-1: coding, reasoning, creative, instruction"
                        " following, context, speed), learned from the loop where it has evidence.\n\n"
                        "example: tm providers --json | jq '.[].models[].scores.coding'")
    _with_config(pr)
    pr.set_defaults(func=cmd_providers)

    an = sub.add_parser("analyze", help="which agents and users send work a cheaper model serves as well",
                        formatter_class=fmt, description="Per agent and per user (their requests without an agent)"
                        " and task type: a cheaper model whose quality on that type, measured by the loop, is as"
                        " good, the evidence, and the monthly saving.\n\nexample: tm analyze --type agents")
    an.add_argument("--type", choices=["all", "agents", "users"], default="all", help="whose work (default all)")
    _with_config(an)
    an.set_defaults(func=cmd_analyze)

    op = sub.add_parser("optimize", help="turn the analysis into overrides; --apply writes them as rules",
                        formatter_class=fmt, description="One override per opportunity tm analyze finds (agent or"
                        " user + task type -> the cheaper model). --apply writes them as operator rules the"
                        " gateway obeys for auto and preset requests, listed by tm rules, each undone by"
                        " tm rules revert ID.\n\nexample: tm optimize --safe-only --apply")
    op.add_argument("--apply", action="store_true", help="write the overrides as rules (default: only propose)")
    op.add_argument("--safe-only", action="store_true",
                    help="only overrides whose evidence says quality holds (optimize.safe_min_samples and more)")
    _with_config(op)
    op.set_defaults(func=cmd_optimize)

    dl = sub.add_parser("detect-local", help="find local model servers and the tm.yaml lines to use them",
                        formatter_class=fmt, description="Probes Ollama (11434), LM Studio (1234), vLLM (8000),"
                        " llama.cpp's server and mlx_lm.server (8080) on each host, and every configured"
                        " OpenAI-compatible provider; tells them apart by what they answer and lists their"
                        " models.\n\nexample: tm detect-local --hosts 127.0.0.1,gpu-box.lan --write")
    dl.add_argument("--hosts", action="append", metavar="HOST[,HOST]", help="hosts to probe (default 127.0.0.1)")
    dl.add_argument("--ports", metavar="N[,N]", help="ports to probe on each host (default 11434,1234,8000,8080)")
    dl.add_argument("--timeout", type=float, default=1.0, help="seconds per probe (default 1)")
    dl.add_argument("--write", action="store_true", help="add the lines to the config file (comments kept)")
    _with_config(dl)
    dl.set_defaults(func=cmd_detect_local)

    mc = sub.add_parser("mcp", help="an MCP server: analyze, optimize, rules and providers as tools for chat"
                        " clients", formatter_class=fmt, description="Serves the operator's tools over MCP, on"
                        " stdio (default) or streamable HTTP. The caller's Token Machine key ($TM_API_KEY on"
                        " stdio; Authorization: Bearer over HTTP) decides: tools that change rules need an admin"
                        " key (tm keys create --admin); the others any key in force.\n\n"
                        "example (Claude Code): claude mcp add tm -e TM_API_KEY=tm-... -- tm mcp")
    mc.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    mc.add_argument("--http", action="store_true", help="serve streamable HTTP on --host:--port /mcp")
    mc.add_argument("--host", default="127.0.0.1")
    mc.add_argument("--port", type=int, default=8788)
    mc.set_defaults(func=cmd_mcp)
