"""Driving the Dagster loop from the `tm` command: its instance under $TM_HOME, the UI, one-off runs.
The gateway side never imports the loop's code: it starts Dagster's own commands on the module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

from tm_resources import db
from tm_resources.tables import COMPLETION_ENDPOINTS

DEFINITIONS_MODULE = "tm_assets.definitions"
# The loop's assets, by the group the definitions give them (the names live with the assets only).
LOOP_SELECTION = "group:loop"


def dagster_env(home: Path, url: str, config_path: Path | None = None) -> dict[str, str]:
    """The environment a Dagster process needs: its home under $TM_HOME with the packaged dagster.yaml,
    its storage in a `dagster` database on the same Postgres, and the project's own database URL."""
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(resources.files("tm_resources").joinpath("dagster.yaml").read_text())
    storage = db.ensure_database(url, "dagster")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "TM_DAGSTER_PG_URL": db.psycopg2_url(storage),
        "TM_DATABASE_URL": url,
        "TM_HOME": str(home),
        # platformdirs warns on every headless machine (no XDG_RUNTIME_DIR), then falls back correctly.
        "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                 "ignore:XDG_RUNTIME_DIR is not set"])),
    }
    if config_path is not None:
        env["TM_CONFIG"] = str(config_path.resolve())
    return env


HOUR_HELP = ("'now' (the hour in progress), 'last' (the last complete hour), a partition key such as"
             " 2026-11-22-13:00, or an ISO time such as 2026-11-22T13:30+01:00")


def current_hour(now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)


def last_complete_hour(now: datetime | None = None) -> datetime:
    return current_hour(now) - timedelta(hours=1)


def parse_hour(text: str, now: datetime | None = None, first: datetime | None = None) -> datetime:
    """The UTC hour `text` names (see HOUR_HELP); ValueError with a message an operator can act on.
    `first`: the loop's first hour (tm_resources.loop_start.first_hour), when known."""
    word = text.strip().lower()
    if word in ("now", "current"):
        return current_hour(now)
    if word in ("last", "previous"):
        return last_complete_hour(now)
    hour = None
    for fmt in ("%Y-%m-%d-%H:%M", "%Y-%m-%dT%H", "%Y-%m-%d %H"):
        try:
            hour = datetime.strptime(text.strip(), fmt).replace(tzinfo=UTC)
            break
        except ValueError:
            continue
    if hour is None:
        try:
            t = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"--hour {text!r} is not an hour: give {HOUR_HELP}") from None
        t = t if t.tzinfo else t.replace(tzinfo=UTC)
        hour = t.astimezone(UTC)
    hour = hour.replace(minute=0, second=0, microsecond=0)
    if hour > current_hour(now):
        raise ValueError(f"--hour {partition_key(hour)} has not begun yet (it is {current_hour(now):%H}:xx UTC now)")
    if first is not None and hour < first:
        raise ValueError(f"--hour {partition_key(hour)} is before the loop's first hour, {partition_key(first)}"
                         " (loop.start, else the first logged request's hour)")
    return hour


def partition_key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:%M")


def _default_signals() -> None:
    # Background processes here may start with SIGINT/SIGTERM ignored; children must stop when told.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def materialize(env: dict[str, str], hour: datetime, selection: str = LOOP_SELECTION,
                quiet: bool = False) -> tuple[int, str]:
    """Materialize the graph for one hour through `dagster asset materialize`, logged in the instance
    (so the run shows in the UI like any other); returns its exit code and, when `quiet`, its output
    (otherwise it went to the terminal)."""
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", DEFINITIONS_MODULE,
           "--select", selection, "--partition", partition_key(hour)]
    if not quiet:
        return subprocess.call(cmd, env=env, cwd=env["DAGSTER_HOME"], preexec_fn=_default_signals), ""
    done = subprocess.run(cmd, env=env, cwd=env["DAGSTER_HOME"], preexec_fn=_default_signals, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    return done.returncode, done.stdout


_STEP_DONE = re.compile(r'STEP_(SUCCESS|FAILURE) - .*step "([^"]+)"')


def materialize_with_progress(env: dict[str, str], hour: datetime, selection: str = LOOP_SELECTION) -> tuple[int, str]:
    """`materialize`, quiet, with a progress bar on the terminal: one tick per step (asset or check) the run
    ends (Dagster does not say how many it will run until it has, so the bar counts up). Returns its exit code
    and output."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", DEFINITIONS_MODULE,
           "--select", selection, "--partition", partition_key(hour)]
    lines: list[str] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} steps"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"hour {partition_key(hour)}: loading the loop", total=None)
        with subprocess.Popen(cmd, env=env, cwd=env["DAGSTER_HOME"], preexec_fn=_default_signals,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            assert proc.stdout is not None  # stdout=PIPE
            for line in proc.stdout:
                lines.append(line)
                if m := _STEP_DONE.search(line):
                    bar.update(task, advance=1, description=f"hour {partition_key(hour)}: {m[2]} "
                                                            f"{'done' if m[1] == 'SUCCESS' else 'FAILED'}")
            code = proc.wait()
    return code, "".join(lines)


def _bin(name: str) -> str:
    # The console script installed beside this interpreter (the venv's), whatever PATH says.
    return str(Path(sys.executable).with_name(name))


def start_loop(env: dict[str, str], host: str, port: int, log_path: Path) -> list[subprocess.Popen]:
    """Dagster as it is run for real: `dagster-webserver` (the UI, with its code server) and
    `dagster-daemon` (the automation sensor, backfills and the run queue), both on the loop's module.
    `env --default-signal` gives them default SIGINT/SIGTERM handlers even when this process was started
    with those ignored, so they stop when told (and pass it on to their own children)."""
    log_file = log_path.open("ab")
    restore = ["env", "--default-signal=INT,TERM"]
    commands = [
        [_bin("dagster-webserver"), "-m", DEFINITIONS_MODULE, "-h", host, "-p", str(port)],
        [_bin("dagster-daemon"), "run", "-m", DEFINITIONS_MODULE],
    ]
    return [subprocess.Popen(restore + cmd, env=env, cwd=env["DAGSTER_HOME"], stdout=log_file, stderr=subprocess.STDOUT)
            for cmd in commands]


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- what a run did, read back from the tables it wrote ---------------------------------------


def requests_in_hour(conn, hour: datetime) -> int:
    """Model calls logged in `hour` (what scored_requests will score)."""
    return conn.execute("SELECT count(*) FROM requests WHERE ts >= %s AND ts < %s AND endpoint = ANY(%s)",
                        (hour, hour + timedelta(hours=1), list(COMPLETION_ENDPOINTS))).fetchone()[0]


def latest_hour_with_requests(conn) -> datetime | None:
    ts = conn.execute("SELECT max(ts) FROM requests WHERE endpoint = ANY(%s)",
                      (list(COMPLETION_ENDPOINTS),)).fetchone()[0]
    return current_hour(ts) if ts is not None else None


def rules_in_force(conn) -> dict[str, str]:
    """rule_id -> status of the rules the gateway obeys now: the newest hour's, active or proposed."""
    rows = conn.execute("SELECT rule_id, status FROM routing_rules WHERE hour = (SELECT max(hour) FROM routing_rules)"
                        " AND status IN ('active', 'proposed')").fetchall()
    return {rule_id: status for rule_id, status in rows}


def run_summary(conn, hour: datetime, rules_before: dict[str, str]) -> list[str]:
    """A few lines on what the run wrote: rows scored, task types, and how the rules in force moved."""
    scored, with_quality, avg = conn.execute(
        "SELECT count(*), count(quality), avg(quality) FROM scored_requests WHERE hour = %s", (hour,)).fetchone()
    lines = [f"scored {scored} requests of {partition_key(hour)}: {with_quality} answered and given a quality"
             + (f" (average {avg:.2f})" if avg is not None else "")
             + (f", {scored - with_quality} not answered (rejected, failed or cut)" if scored > with_quality else "")]
    types = conn.execute("SELECT task_type, count(*) FROM task_types WHERE hour = %s GROUP BY 1 ORDER BY 2 DESC, 1",
                         (hour,)).fetchall()
    lines.append("task types: " + (", ".join(f"{t} {n}" for t, n in types) if types else "none"))
    after = rules_in_force(conn)
    added = sorted(set(after) - set(rules_before))
    dropped = sorted(set(rules_before) - set(after))
    changed = sorted(r for r in set(after) & set(rules_before) if after[r] != rules_before[r])
    if not (added or dropped or changed):
        lines.append(f"rules: {len(after)} in force, unchanged")
    else:
        moves = [f"+{r} [{after[r]}]" for r in added] + [f"-{r}" for r in dropped] + \
                [f"{r} {rules_before[r]} -> {after[r]}" for r in changed]
        lines.append(f"rules: {len(after)} in force; changed: " + ", ".join(moves))
    return lines
