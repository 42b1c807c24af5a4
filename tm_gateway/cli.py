"""The `tm` command line: start Token Machine, run the gateway, manage keys and the schema, benchmark
the router. The read-only views of the log and the loop are in cli_views."""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import sys
import warnings
from pathlib import Path

import psycopg
import psycopg.rows

from tm_gateway import cli_budgets, cli_ops, cli_quota, cli_savings, keys, loopctl
from tm_gateway.cli_views import _database, cmd_grades, cmd_models, cmd_requests, cmd_rules
from tm_resources import db
from tm_resources.config import EXAMPLE_CONFIG, Config, ConfigError, config_path, load_config, tm_home
from tm_resources.loop_start import first_hour
from tm_resources.quotas import loop_mode

log = logging.getLogger("tm")


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Library chatter (pgserver's start-up narration, platformdirs) is not the operator's business.
_NOISY = ("pgserver", "pgserver.postgres_server", "httpx", "asyncio")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=_LOG_FORMAT, stream=sys.stderr)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _uvicorn_log_config() -> dict:
    """The same logging for uvicorn to apply in each process it runs the app in: worker processes
    (--workers N) start with nothing configured and would drop the gateway's INFO lines (spool
    replays, key and rule reloads)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"tm": {"format": _LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "tm", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": "WARNING"} for name in (*_NOISY, "uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _port_taken(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be served, or None: checked before anything is printed or created."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return f"cannot resolve host {host}: {err.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as err:
            return f"port {port} on {host} is in use (stop what holds it, or pass --port)" \
                if err.errno == errno.EADDRINUSE else f"cannot listen on {host}:{port}: {err.strerror}"
    return None


def _ports_free(*ports: tuple[str, int, str]) -> bool:
    for host, port, what in ports:
        problem = _port_taken(host, port)
        if problem:
            print(f"tm: {what}: {problem}", file=sys.stderr)
            return False
    return True


# -- provider reachability --------------------------------------------------------------------


def provider_report(config: Config, timeout: float = 0.75) -> tuple[list[str], bool]:
    """One line per provider saying whether the gateway can reach it; and whether any can."""
    import httpx

    lines, any_ok = [], False
    for name, p in config.providers.items():
        models = ", ".join(m for m, mc in config.models.items() if mc.provider == name) or "no models"
        if p.kind == "anthropic":
            present = [env for env in p.api_key_env if os.environ.get(env)]
            if present:
                any_ok = True
                lines.append(f"  ok    {name:<10} key in {', '.join(present)}  ({models})")
            else:
                wanted = " or ".join(p.api_key_env) or "api_key_env in the config"
                lines.append(f"  --    {name:<10} no API key: export {wanted}  ({models})")
            continue
        base = p.base_url.rstrip("/")
        reached = False
        for url in (base + "/models", base.removesuffix("/v1") + "/health"):
            try:
                httpx.get(url, timeout=timeout)
                reached = True
                break
            except httpx.HTTPError:
                continue
        if reached:
            any_ok = True
            lines.append(f"  ok    {name:<10} {base} answers  ({models})")
        else:
            lines.append(f"  --    {name:<10} nothing at {base}  ({models})")
    return lines, any_ok


NO_PROVIDER_HINT = """\
No provider is reachable yet. Requests will get a 502 until one is:
  - frontier: export ANTHROPIC_API_KEY=... and restart, or
  - local: start Ollama (`ollama serve`, then `ollama pull llama3.2`), LM Studio's server,
    vLLM, or `mlx_lm.server --port 8080`, at the address tm.yaml gives for it."""


# -- commands ----------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    config = _load(args)
    host = args.host or config.gateway.host
    port = args.port or config.gateway.port
    # Before the banner and the first key: a key shown once must not scroll past a failed start.
    if not _ports_free((host, port, "gateway"), *([] if args.no_loop else [(host, args.ui_port, "loop UI")])):
        return 1
    home = tm_home()
    url = _database(home)
    with psycopg.connect(url) as conn:
        first_key = None
        if not keys.list_keys(conn):
            # Whoever starts the first install runs it: their key opens the dashboard's team pages.
            first_key, info = keys.create_key(conn, os.environ.get("TM_USER") or getpass.getuser() or "admin",
                                              admin=True)
    cfg_path = config_path(getattr(args, "config", None))
    print(f"Token Machine is starting (home {home}, config {cfg_path})")
    print(f"  database  {db.redact_url(url)}")
    print(f"  gateway   http://{host}:{port}  (OpenAI: /v1/chat/completions, Anthropic: /v1/messages)")
    print(f"  Claude Code: ANTHROPIC_BASE_URL=http://{host}:{port} ANTHROPIC_AUTH_TOKEN=<key> claude --model auto"
          "  (README: Claude Code)")
    print(f"  dashboard http://{host}:{port}/dashboard  (sign in with a key; the team pages need an admin key)")
    loop: list = []
    if not args.no_loop:
        loop = loopctl.start_loop(loopctl.dagster_env(home, url, cfg_path), host, args.ui_port, home / "dagster.log")
        print(f"  loop UI   http://{host}:{args.ui_port}  (Dagster: the hourly loop, its runs and backfills;"
              f" log in {home / 'dagster.log'})")
    if first_key:
        print(f"  first API key, an admin key for user '{info.user_id}' (shown once; `tm keys create --user NAME`"
              " for the team's):")
        print(f"    {first_key}")
    lines, any_ok = provider_report(config)
    print("Providers:")
    print("\n".join(lines))
    if not any_ok:
        print(NO_PROVIDER_HINT)
    sys.stdout.flush()
    try:
        return _serve(config, url, home, host, port)
    finally:
        for proc in loop:
            loopctl.stop(proc)


def _serve(config: Config, url: str, home: Path, host: str, port: int, workers: int = 1,
           config_file: Path | None = None) -> int:
    import uvicorn

    from tm_gateway.multiproc import prepare_multiprocess_dir

    # Before prometheus_client is first imported (with the app): its mode is chosen then.
    prepare_multiprocess_dir(home)
    from tm_gateway.app import GatewaySettings, create_app

    if workers > 1:
        # Each worker process builds its own app from the environment; they share nothing but Postgres.
        os.environ.update({"TM_DATABASE_URL": url, "TM_HOME": str(home)})
        if config_file is not None:
            os.environ["TM_CONFIG"] = str(config_file.resolve())
        uvicorn.run("tm_gateway.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False, lifespan="on", log_config=_uvicorn_log_config())
        return 0
    app = create_app(GatewaySettings(config=config, database_url=url, home=home))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    config = _load(args)
    host = args.host or config.gateway.host
    port = args.port or config.gateway.port
    if not _ports_free((host, port, "gateway")):
        return 1
    home = tm_home()
    url = _database(home)
    print(f"Token Machine gateway on http://{host}:{port} ({args.workers} worker process(es))", flush=True)
    return _serve(config, url, home, host, port, args.workers, config_path(args.config))


def cmd_keys(args: argparse.Namespace) -> int:
    url = _database(tm_home())
    with psycopg.connect(url) as conn:
        if args.keys_cmd == "create":
            key, info = keys.create_key(conn, args.user, admin=args.admin, team=args.team)
            kind = "admin key" if info.admin else "API key"
            team = f" of team '{info.team}'" if info.team else ""
            print(f"{kind} for user '{info.user_id}'{team} (id {info.id}); it is shown only this once:")
            print(key)
        elif args.keys_cmd == "list":
            rows = keys.list_keys(conn, include_revoked=args.all)
            if not rows:
                print("no keys yet: tm keys create --user NAME")
            for k in rows:
                state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                state += ", admin" if k.admin else ""
                state += f", team {k.team}" if k.team else ""
                print(f"{k.id}  {k.user_id:<20} {k.prefix}…  created {k.created_at:%Y-%m-%d %H:%M}  {state}")
        elif args.keys_cmd == "revoke":
            gone = keys.revoke(conn, args.target)
            if not gone:
                print(f"no active key with id or user '{args.target}'", file=sys.stderr)
                return 1
            print(f"revoked {', '.join(gone)}")
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    config = _load(args)
    home = tm_home()
    url = _database(home)
    try:
        hour = loopctl.parse_hour(args.hour, first=first_hour(config, url))
    except ValueError as err:
        print(f"tm: {err}", file=sys.stderr)
        return 2
    key = loopctl.partition_key(hour)
    with psycopg.connect(url) as conn:
        n = loopctl.requests_in_hour(conn, hour)
        if n == 0:
            latest = loopctl.latest_hour_with_requests(conn)
            hint = (f"; the latest hour with requests is {loopctl.partition_key(latest)}"
                    f" (tm loop run --hour {loopctl.partition_key(latest)})" if latest and latest != hour else "")
            print(f"0 requests in hour {key} UTC: nothing to score{hint}")
            return 0
        rules_before = loopctl.rules_in_force(conn)
        mode, _ = loop_mode(conn, config)
    cfg_path = config_path(getattr(args, "config", None))
    print(f"scoring {n} requests of hour {key} UTC (mode {mode})"
          + (", the hour in progress: it is scored again whole at five past the next hour"
             if hour == loopctl.current_hour() else ""), flush=True)
    env = loopctl.dagster_env(home, url, cfg_path)
    code, output = loopctl.materialize(env, hour) if args.verbose else loopctl.materialize_with_progress(env, hour)
    if code != 0:
        if output:
            # The run's own account of what failed is at its end; the whole of it is in the Dagster UI.
            print("\n".join(output.rstrip().splitlines()[-40:]), file=sys.stderr)
        print(f"tm: the loop run failed (exit {code}); see above, or the run in the Dagster UI", file=sys.stderr)
        return code
    with psycopg.connect(url) as conn:
        print("\n".join(loopctl.run_summary(conn, hour, rules_before)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from tm_gateway.routerbench import RouterBenchError, run_router_bench

    if args.output and not Path(args.output).resolve().parent.is_dir():
        print(f"tm: cannot write {args.output}: no folder {Path(args.output).resolve().parent}", file=sys.stderr)
        return 2
    try:
        # Only the figures go to stdout (`tm bench router ... > figures.json`); chatter goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            out = run_router_bench(args.data, args.test, train_share=args.train_share, seed=args.seed,
                                   repeats=args.repeats, k=args.k, temperature=args.temperature,
                                   prior_weight=args.prior_weight, cost_weight=args.cost_weight,
                                   min_quality=args.min_quality, cascades=not args.no_cascades,
                                   cache_dir=args.cache_dir, text=args.text)
    except (OSError, RouterBenchError) as err:
        print(f"tm: {err}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as err:
            print(f"tm: cannot write {args.output}: {err.strerror or err}", file=sys.stderr)
            print(text)
            return 2
    print(text)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    url = db.database_url(tm_home())
    applied = db.migrate(url)
    print(f"applied {', '.join(applied)}" if applied else "the schema is up to date")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from tm_gateway.requestlog import RequestLog

    config = _load(args)
    home = tm_home()
    spool = Path(config.log.spool_dir) if config.log.spool_dir else home / "spool"
    rl = RequestLog(_database(home), spool_dir=spool, redact_secrets=config.log.redact.secrets,
                    redact_pii=config.log.redact.pii)
    landed, kept = rl.replay_rejected()
    print(f"{landed} rejected row(s) stored; {kept} still refused" + (f", kept in {rl.rejected_dir}" if kept else ""))
    return 1 if kept else 0


def cmd_init(args: argparse.Namespace) -> int:
    target = Path("tm.yaml")
    if target.exists() and not args.force:
        print(f"tm: {target.resolve()} exists; --force replaces it", file=sys.stderr)
        return 1
    target.write_text(EXAMPLE_CONFIG.read_text())
    print(f"wrote {target.resolve()}: edit its providers and models, then `tm up`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tm", description="Token Machine: an LLM gateway with a learning loop.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    ini = sub.add_parser("init", help="write a starter tm.yaml into the current folder")
    ini.add_argument("--force", action="store_true", help="replace an existing tm.yaml")
    ini.set_defaults(func=cmd_init)

    up = sub.add_parser("up", help="start everything on the embedded default and say where it is")
    up.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--ui-port", type=int, default=3000, help="the Dagster UI's port (default 3000)")
    up.add_argument("--no-loop", action="store_true", help="the gateway only, without the Dagster loop")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the gateway alone")
    gw.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument("--workers", type=int, default=1, help="worker processes (replicas sharing the port)")
    gw.set_defaults(func=cmd_gateway)

    k = sub.add_parser("keys", help="API keys: create, list, revoke")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key for a user and print it once")
    kc.add_argument("--user", required=True)
    kc.add_argument("--admin", action="store_true",
                    help="an admin key: the dashboard's team-wide pages and the MCP tools that change things")
    kc.add_argument("--team", help="the team its requests count to (budgets, pools), over users.<id>.team")
    kl = ksub.add_parser("list", help="list keys (never the keys themselves)")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kr = ksub.add_parser("revoke", help="revoke a key by id, or every key of a user")
    kr.add_argument("target", help="key id (k_...) or user name")
    k.set_defaults(func=cmd_keys)
    cli_budgets.register(sub)

    lp = sub.add_parser("loop", help="the learning loop")
    lsub = lp.add_subparsers(dest="loop_cmd", required=True)
    lr = lsub.add_parser("run", help="materialize the whole graph for one hour, without the UI")
    lr.add_argument("--hour", default="now", help=f"the UTC hour: {loopctl.HOUR_HELP} (default: now; the"
                    " hourly automation scores each hour whole at five past the next)")
    lr.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    lr.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="show Dagster's own output of the run")
    lp.set_defaults(func=cmd_loop)

    ru = sub.add_parser("rules", help="the routing rules in force (or proposed, in dry-run)",
                        description="The loop's routing rules and the operator's (tm optimize --apply)."
                        " Example: tm rules --evidence; tm rules revert op-3")
    ru.add_argument("--all", action="store_true", help="also the inactive rules of manual mode, and reverted"
                    " operator rules")
    ru.add_argument("--evidence", action="store_true", help="show each rule's evidence")
    ru.add_argument("--json", action="store_true", help="the rules as JSON, for scripts")
    ru.add_argument("verb", nargs="?", metavar="revert", help="revert ID: take an operator rule out of force")
    ru.add_argument("rule_id", nargs="?", metavar="ID", help="an operator rule's id (op-3)")
    ru.set_defaults(func=cmd_rules)

    rq = sub.add_parser("requests", help="the request log's recent rows")
    rq.add_argument("--user", help="only this user's requests")
    rq.add_argument("--model", help="only requests that asked for or were answered by this model")
    rq.add_argument("--status", help="a code (404), a class (4xx), 'ok' or 'error'")
    rq.add_argument("-n", "--limit", type=int, default=20, help="how many of the newest rows (default 20)")
    rq.add_argument("-f", "--follow", action="store_true", help="keep printing new rows as they are logged")
    rq.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    rq.add_argument("--json", action="store_true", help="one JSON object per row (the whole prompt), for scripts")
    rq.set_defaults(func=cmd_requests)

    gr = sub.add_parser("grades", help="the team's leaderboard")
    gr.set_defaults(func=cmd_grades)

    mo = sub.add_parser("models", help="fine-tuned model versions")
    msub = mo.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="the versions, newest first, with their evaluation")
    mr = msub.add_parser("rollback", help="roll a version's routing swap back")
    mr.add_argument("version")
    mo.set_defaults(func=cmd_models)

    from tm_gateway import routerbench as rb

    be = sub.add_parser("bench", help="benchmarks that run without the gateway")
    bsub = be.add_subparsers(dest="bench_cmd", required=True)
    br = bsub.add_parser("router", help="the learned router on RouterBench-format data: accuracy and cost per"
                         " query against every single model, a random and the perfect router (JSON)")
    br.add_argument("--data", required=True, metavar="DIR",
                    help="folder of RouterBench CSV files: the log to learn from")
    br.add_argument("--test", metavar="DIR",
                    help="folder of RouterBench CSV files to route (default: a held-out share of --data)")
    br.add_argument("--train-share", type=float, default=0.7, metavar="SHARE",
                    help="without --test: the share of --data learnt from (default 0.7)")
    br.add_argument("--seed", type=int, default=0, metavar="N", help="without --test: the split's seed (default 0)")
    br.add_argument("--repeats", type=int, default=1, metavar="N",
                    help="without --test: splits, seeds --seed, --seed+1, ...; more than 1 reports each and"
                         " their mean (default 1)")
    br.add_argument("--k", type=int, default=rb.DEFAULT_K, metavar="N",
                    help=f"neighbours read per prompt (default {rb.DEFAULT_K})")
    br.add_argument("--temperature", type=float, default=rb.DEFAULT_TEMPERATURE, metavar="T",
                    help=f"similarity temperature (default {rb.DEFAULT_TEMPERATURE:g})")
    br.add_argument("--prior-weight", type=float, default=rb.DEFAULT_PRIOR_WEIGHT, metavar="W",
                    help=f"pull towards each model's log-wide mean (default {rb.DEFAULT_PRIOR_WEIGHT:g})")
    br.add_argument("--cost-weight", type=float, default=rb.DEFAULT_COST_WEIGHT, metavar="W",
                    help=f"quality (0-1) worth the cost of one call of the best model"
                         f" (default {rb.DEFAULT_COST_WEIGHT:g})")
    br.add_argument("--min-quality", type=float, metavar="Q",
                    help="instead: the cheapest model predicted to reach this quality (0-1)")
    br.add_argument("--no-cascades", action="store_true", help="single models only, no cheap-first cascades")
    br.add_argument("--cache-dir", metavar="DIR",
                    help="where prompt vectors are cached (default $TM_HOME/bench-cache)")
    br.add_argument("--text", choices=sorted(rb.TEXTS), default="last-paragraphs",
                    help="what is embedded of each prompt: its last paragraphs (default) or the whole prompt,"
                         " whose first 128 tokens the embedder keeps, as the gateway's learned router sees it")
    br.add_argument("--output", metavar="FILE", help="also write the JSON to this file")
    be.set_defaults(func=cmd_bench)

    lg = sub.add_parser("log", help="the request log's local files")
    lgsub = lg.add_subparsers(dest="log_cmd", required=True)
    lrr = lgsub.add_parser("replay-rejected", help="store the rows Postgres refused (spool/rejected) again")
    lrr.add_argument("--config", help="configuration file (default: $TM_CONFIG, ./tm.yaml)")
    lg.set_defaults(func=cmd_log)

    cli_quota.register(sub)
    cli_ops.register(sub)

    d = sub.add_parser("db", help="the database schema")
    dsub = d.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("migrate", help="apply the schema's migrations")
    d.set_defaults(func=cmd_db)
    cli_savings.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # platformdirs warns on every headless machine (no XDG_RUNTIME_DIR) and then falls back correctly.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"tm: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
