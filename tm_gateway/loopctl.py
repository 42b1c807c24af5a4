"""Driving the Dagster loop from the `tm` command: its instance under $TM_HOME, the UI, one-off runs.
The gateway side never imports the loop's code: it starts Dagster's own commands on the module."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tm_resources import db

DEFINITIONS_MODULE = "tm_assets.definitions"
LOOP_ASSETS = ("scored_requests", "task_types", "patterns", "grades", "routing_rules", "finetune_jobs",
               "cache_entries")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def dagster_env(home: Path, url: str, config_path: Path | None = None) -> dict[str, str]:
    """The environment a Dagster process needs: its home under $TM_HOME with the project's dagster.yaml,
    its storage in a `dagster` database on the same Postgres, and the project's own database URL."""
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    storage = db.ensure_database(url, "dagster")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "TM_DAGSTER_PG_URL": db.psycopg2_url(storage),
        "TM_DATABASE_URL": url,
        "TM_HOME": str(home),
    }
    if config_path is not None:
        env["TM_CONFIG"] = str(config_path.resolve())
    return env


def last_complete_hour(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)


def parse_hour(text: str) -> datetime:
    """'2026-11-22-13:00' (Dagster's partition key), '2026-11-22T13', or any ISO time: its UTC hour."""
    for fmt in ("%Y-%m-%d-%H:%M", "%Y-%m-%dT%H", "%Y-%m-%d %H"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    t = datetime.fromisoformat(text)
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def partition_key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:%M")


def _default_signals() -> None:
    # Background processes here may start with SIGINT/SIGTERM ignored; children must stop when told.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def materialize(env: dict[str, str], hour: datetime, assets: tuple[str, ...] = LOOP_ASSETS) -> int:
    """Materialize the graph for one hour through `dagster asset materialize`, logged in the instance
    (so the run shows in the UI like any other); returns its exit code."""
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", DEFINITIONS_MODULE,
           "--select", ",".join(assets), "--partition", partition_key(hour)]
    return subprocess.call(cmd, env=env, cwd=PROJECT_ROOT, preexec_fn=_default_signals)


def start_ui(env: dict[str, str], host: str, port: int, log_path: Path) -> subprocess.Popen:
    """`dagster dev`: the webserver, the daemon (so the hourly automation runs) and the code server."""
    log_file = log_path.open("ab")
    cmd = [sys.executable, "-m", "dagster", "dev", "-m", DEFINITIONS_MODULE, "-h", host, "-p", str(port)]
    return subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                            preexec_fn=_default_signals)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
