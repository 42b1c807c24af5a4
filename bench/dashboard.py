"""How long each dashboard page takes with a million rows in `requests`: seeds the log with COPY, runs the
loop's usage_hourly roll-up over every hour (the asset's own function), seeds grades, patterns and rules for
those hours, serves the real gateway and times each page over HTTP; with --screenshots, saves each page as
drawn by headless Chromium (docs/dashboard-*.png).

    .venv/bin/python -m bench.dashboard [--rows 1000000] [--days 30] [--screenshots docs] [--home DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from tests.conftest import ServedApp, make_config
from tests.dashboard_data import loop_tables, request_rows
from tm_assets.rollups import replace_team_usage_hour, replace_usage_hour
from tm_gateway import keys
from tm_gateway.app import GatewaySettings, create_app
from tm_gateway.logrows import COLUMNS
from tm_resources import db

PAGES = ("overview", "quality", "decisions", "me")


def team(users: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """`users` people in teams of eight, each using one to three of the team's agents."""
    out = {}
    for i in range(users):
        t = i // 8
        agents = tuple(f"agent-{t}-{k}" for k in range(1 + i % 3))
        out[f"user{i:03d}"] = (f"team{t}", agents)
    return out


def seed(url: str, rows: int, days: int, users: dict) -> tuple[datetime, int]:
    hours = days * 24
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=hours - 1)
    per_hour = max(1, rows // hours)
    names = [c for c in COLUMNS if c in next(request_rows(start, 1, 1, users=users))]
    t = time.perf_counter()
    n = 0
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY requests ({', '.join(names)}) FROM STDIN") as copy:
            for r in request_rows(start, hours, per_hour, users=users):
                copy.write_row([r[c] for c in names])
                n += 1
        conn.commit()
    print(f"seeded {n:,} requests over {hours} hours in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return start, hours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=15, help="timed loads of each page")
    ap.add_argument("--screenshots", type=Path, help="save docs/dashboard-<page>.png here (needs chromium)")
    ap.add_argument("--home", type=Path, help="the folder of a database an earlier run seeded: time it again")
    args = ap.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="tm-bench-dashboard-"))
    url = db.ensure_database(db.start_embedded(home), "bench_dashboard")
    db.migrate(url)
    users = team(args.users)
    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1",
                         users={u: {"team": t} for u, (t, _) in users.items()})
    with psycopg.connect(url, autocommit=True) as conn:
        seeded = conn.execute("SELECT EXISTS (SELECT FROM usage_hourly)").fetchone()[0]
    if not seeded:
        start, hours = seed(url, args.rows, args.days, users)
        t = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            rolled = sum(replace_usage_hour(conn, start + timedelta(hours=h), config) for h in range(hours))
            roll_s = time.perf_counter() - t
            t = time.perf_counter()
            team_rows = sum(replace_team_usage_hour(conn, start + timedelta(hours=h)) for h in range(hours))
            print(f"usage_hourly: {rolled:,} rows, {hours} hours rolled up in {roll_s:.1f} s "
                  f"({1000 * roll_s / hours:.0f} ms an hour); team_usage_hourly: {team_rows:,} rows in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
            loop_tables(conn, start, hours, users=users)
            conn.execute("ANALYZE")
    print(f"database in {home} (--home {home} times the pages again without seeding)", file=sys.stderr)
    with psycopg.connect(url, autocommit=True) as conn:
        total, rolled, team_rows = conn.execute(
            "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM usage_hourly),"
            " (SELECT count(*) FROM team_usage_hourly)").fetchone()
        admin, _ = keys.create_key(conn, "root", admin=True)
        customer, _ = keys.create_key(conn, next(iter(users)))

    served = ServedApp(create_app(GatewaySettings(config=config, database_url=url, home=home))).start()
    results = []
    try:
        for who, key in (("admin", admin), ("customer", customer)):
            with httpx.Client(base_url=served.url, timeout=60) as c:
                assert c.post("/dashboard/login", data={"key": key}).status_code == 303
                for page in PAGES if who == "admin" else ("me",):
                    for days in (1, 7, 30):
                        path = f"/dashboard/{page}?days={days}"
                        assert c.get(path).status_code == 200  # warm: the pool's first connection
                        times = []
                        for _ in range(args.repeat):
                            t = time.perf_counter()
                            r = c.get(path)
                            times.append(1000 * (time.perf_counter() - t))
                            assert r.status_code == 200
                        times.sort()
                        results.append((who, page, days, statistics.median(times), times[int(0.95 * (len(times) - 1))],
                                        len(r.content)))
        if args.screenshots:
            screenshots(served.url, admin, customer, args.screenshots)
    finally:
        served.stop()

    print(f"\n{total:,} rows in requests; usage_hourly {rolled:,} rows, team_usage_hourly {team_rows:,}; "
          f"{args.repeat} loads each; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| viewer | page | range | median ms | p95 ms | HTML bytes |")
    print("|---|---|---|---:|---:|---:|")
    for who, page, days, med, p95, size in results:
        print(f"| {who} | {page} | {days} d | {med:.0f} | {p95:.0f} | {size:,} |")
    return 0


def screenshots(base_url: str, admin: str, customer: str, folder: Path) -> None:
    from tests import browser

    if not browser.available():
        print(browser.MISSING, file=sys.stderr)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for key, pages in ((admin, ("overview", "quality", "decisions")), (customer, ("me",))):
        with browser.chromium(width=1440, height=1000) as driver:
            browser.sign_in(driver, base_url, key)
            for page in pages:
                driver.get(f"{base_url}/dashboard/{page}?days=7")
                browser.charts(driver)
                time.sleep(1.5)  # ECharts' entry animation
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1440, min(height + 40, 4000))
                time.sleep(0.5)
                path = folder / f"dashboard-{'customer' if page == 'me' else page}.png"
                driver.save_screenshot(str(path))
                driver.set_window_size(1440, 1000)
                print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
