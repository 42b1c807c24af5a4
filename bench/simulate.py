"""A simulated agency on real recorded answers: a team's traffic, hour by hour, through the real gateway
and the real loop, reported against sending everything to the frontier model.

    .venv/bin/python bench/simulate.py --data ../shared/data/routerbench [--hours 6] [--users 12]
        [--requests-per-hour 150] [--judge-noise 0.1] [--json] [--plot docs/simulation.png]

Input: a folder in RouterBench's format (tm_gateway/routerbench.py reads it): each prompt with, per
model, its real answer, its 0/1 correctness and its real cost. What runs:

- fake providers on 127.0.0.1 (one aiohttp server speaking OpenAI's chat completions and Anthropic's
  messages): each configured model answers a prompt with that model's recorded answer, and reports
  usage whose price under the configured prices is the recorded cost (local models: price 0);
- a fake judge (`loop.judge_model`) whose verdict is the recorded correctness of the answer it is
  shown, flipped with probability --judge-noise;
- the gateway, `tm gateway` in its own process on a free port, with the embedded Postgres under a
  temporary TM_HOME; every request is `model: "auto"`, sent by the official OpenAI or Anthropic SDK;
- a team of U users: task mixes drawn from the data, Poisson arrivals over each hour, a correction
  ("That's wrong ...") after a wrong answer with probability --followup, one poor prompter, one
  user whose traffic spikes in one hour, one who repeats earlier questions;
- after each simulated hour, `tm loop run --hour H`: the real Dagster graph for that hour.

The clock: the gateway stamps rows with the real time. After an hour's traffic the harness waits for
every row, then re-stamps each (by the request id the gateway returned) to its simulated arrival
time inside that simulated hour; a cascade's refused first attempt gets its answer's time less 1 ms.
Simulated hours are the last H complete hours before the run starts, so each is a real partition of
the loop. No production code path knows about the simulation.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tm_gateway.routerbench import RouterBenchData, load_routerbench  # noqa: E402
from tm_resources.quality import _clip_middle  # noqa: E402  (the judge sees texts clipped this way)

# The open models of RouterBench are the team's local models (price 0); gpt-4 is the frontier.
DEFAULT_LOCAL = ("mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat", "meta/llama-2-70b-chat",
                 "meta/code-llama-instruct-34b-chat", "mistralai/mistral-7b-chat")
DEFAULT_FRONTIER = "gpt-4-1106-preview"
# gpt-4-1106-preview's list price, USD per million tokens.
FRONTIER_PRICE = {"input": 10.0, "output": 30.0}
FRONTIER_KEY_ENV = "TM_SIM_FRONTIER_KEY"
JUDGE = "sim-judge"
CORRECTIONS = ("That's wrong. Look at it again:\n\n", "No, that is not right. Try again:\n\n",
               "Incorrect, please redo this:\n\n")


def model_name(upstream: str) -> str:
    """A configuration name for a RouterBench model ('mistralai/mixtral-8x7b-chat' -> 'mixtral-8x7b-chat')."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", upstream.split("/")[-1]).lower()


def _key(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8", "surrogatepass")).hexdigest()


class RecordedAnswers:
    """Which data row a prompt is, and what each model answered there; shared by providers and judge."""

    def __init__(self, data: RouterBenchData) -> None:
        self.data = data
        self.rows: dict[str, int] = {}
        for i, p in enumerate(data.prompts):
            self.register(p, i)

    def register(self, text: str, row: int) -> None:
        # Also as the judge sees it: long texts clipped in the middle.
        self.rows[_key(text)] = row
        self.rows[_key(_clip_middle(text))] = row

    def row_of(self, text: str) -> int | None:
        return self.rows.get(_key(text))

    def answer(self, row: int, upstream: str) -> str:
        return self.data.answers[row].get(upstream) or ""

    def correct(self, row: int, answer: str) -> bool:
        """Whether `answer` is a recorded answer to this row that was right (an unknown answer is wrong)."""
        given = answer.strip()
        for j, m in enumerate(self.data.models):
            text = self.data.answers[row].get(m, "").strip()
            if text and (text == given or _clip_middle(text).strip() == given):
                if self.data.quality[row, j] > 0:
                    return True
        return False

    def cost(self, row: int, upstream: str) -> float:
        return float(self.data.cost[row, self.data.models.index(upstream)])


def usage_for(cost: float, answer: str, price: dict[str, float]) -> tuple[int, int]:
    """(input, output) tokens whose price is `cost`: output from the answer's length, input the rest."""
    out = max(1, len(answer) // 4)
    if price["input"] <= 0 and price["output"] <= 0:
        return max(1, int(cost * 1e6)), out  # a free model: any count costs nothing
    out = min(out, int(cost * 1e6 / price["output"])) if price["output"] > 0 else out
    rest = cost - out * price["output"] / 1e6
    return max(0, round(rest * 1e6 / price["input"])) if price["input"] > 0 else 0, out


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict))


class FakeProviders:
    """OpenAI-compatible and Anthropic endpoints on 127.0.0.1 serving recorded answers, and the judge."""

    def __init__(self, recorded: RecordedAnswers, prices: dict[str, dict[str, float]], judge_noise: float,
                 seed: int, api_key: str) -> None:
        self.recorded, self.prices, self.api_key = recorded, prices, api_key
        self.judge_noise = judge_noise
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.judged: Counter = Counter()   # verdicts given: right / wrong / flipped / unknown
        self.port = 0
        self._loop = None
        self._runner = None
        self._thread: threading.Thread | None = None

    # -- what a model says ----------------------------------------------------------------------
    def _reply(self, upstream: str, messages: list[dict]) -> tuple[str, int, int]:
        if upstream == JUDGE:
            return self._verdict(_text(messages[-1].get("content"))), 50, 1
        prompt = _text(next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), ""))
        row = self.recorded.row_of(prompt)
        if row is None:
            return "I cannot help with that.", max(1, len(prompt) // 4), 6
        answer = self.recorded.answer(row, upstream)
        tokens = usage_for(self.recorded.cost(row, upstream), answer,
                           self.prices.get(upstream, {"input": 0, "output": 0}))
        return answer, tokens[0], tokens[1]

    def _verdict(self, shown: str) -> str:
        m = re.search(r"<request>\n(.*)\n</request>\n\n<answer>\n(.*)\n</answer>", shown, re.S)
        row = self.recorded.row_of(m.group(1)) if m else None
        if row is None:
            with self.lock:
                self.judged["unknown"] += 1
            return "5"
        right = self.recorded.correct(row, m.group(2))
        with self.lock:
            flip = self.rng.random() < self.judge_noise
            self.judged["flipped" if flip else ("right" if right else "wrong")] += 1
        return "10" if right != flip else "0"

    # -- the wire protocols -----------------------------------------------------------------------
    async def _openai(self, request: web.Request) -> web.Response:
        body = await request.json()
        text, n_in, n_out = self._reply(body.get("model", ""), body.get("messages") or [])
        return web.json_response({
            "id": f"chatcmpl-{os.urandom(8).hex()}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    async def _anthropic(self, request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != self.api_key:
            return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}}, status=401)
        body = await request.json()
        text, n_in, n_out = self._reply(body.get("model", ""), body.get("messages") or [])
        return web.json_response({
            "id": f"msg_{os.urandom(8).hex()}", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out}})

    def start(self) -> FakeProviders:
        import asyncio
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._openai)
            app.router.add_post("/v1/messages", self._anthropic)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# What `auto` means before the loop has written any rule. "tiers": the shape tm.yaml ships (simple and
# medium prompts local, medium ones cascading to the frontier; complex and reasoning prompts on the
# frontier). "local": every prompt to the default local model.
STARTS = ("tiers", "local")


def sim_config(providers_url: str, local: list[str], frontier: str, default_local: str,
               thresholds: dict | None = None, start: str = "tiers", learned: bool = False,
               routing_overrides: dict | None = None) -> dict:
    models = {model_name(m): {"provider": "local", "upstream": m, "tier": "local", "context_window": 32768}
              for m in local}
    models[model_name(frontier)] = {"provider": "frontier", "upstream": frontier, "tier": "included",
                                    "context_window": 128000, "price": FRONTIER_PRICE}
    models[JUDGE] = {"provider": "local", "upstream": JUDGE, "tier": "local", "context_window": 32768}
    first, top = model_name(default_local), model_name(frontier)
    routing = {"tiers": {"chains": {"SIMPLE": [first], "MEDIUM": [first, top], "COMPLEX": [top], "REASONING": [top]}},
               "cascade": {"tiers": ["MEDIUM"]}} if start == "tiers" else {}
    if learned:
        routing["learned"] = {"enabled": True}
    for section, value in (routing_overrides or {}).items():
        routing[section] = {**routing.get(section, {}), **value}
    return {
        "routing": routing,
        "gateway": {"refresh_interval_s": 0.2},
        "log": {"flush_interval_ms": 20},
        "providers": {"frontier": {"kind": "anthropic", "base_url": providers_url, "api_key_env": [FRONTIER_KEY_ENV]},
                      "local": {"kind": "openai", "base_url": providers_url + "/v1"}},
        "models": models,
        "defaults": {"model": model_name(default_local), "frontier_model": model_name(frontier)},
        # One simulated day: a poor prompter is coached after one day under the bar instead of three.
        "loop": {"judge_model": JUDGE, "thresholds": {"coaching_days": 1, **(thresholds or {})}},
    }


# -- the team ---------------------------------------------------------------------------------------

@dataclass
class User:
    name: str
    key: str = ""
    sdk: str = "openai"
    mix: dict[str, float] = field(default_factory=dict)
    rate: float = 1.0          # share of the hour's traffic, before the role's own factor
    role: str = "member"       # member | poor | spiker | repeater
    asked: list[int] = field(default_factory=list)


def poor_prompt(prompt: str) -> str:
    """What a hurried user types for the same task: the last paragraph, no instructions, lower case."""
    para = [p for p in prompt.strip().split("\n\n") if p.strip()][-1]
    lines = [ln for ln in para.splitlines() if not re.match(r"\s*(print only|answer\s*:|your code should)", ln, re.I)]
    text = " ".join(lines).lower()
    text = re.sub(r"^\s*write a (python )?", "", text)
    text = re.sub(r"[.?!:]+", "", text)
    return " ".join(text.split()[-14:])


def make_team(n: int, evals: list[str], rng: random.Random) -> list[User]:
    names = [f"u{i + 1:02d}" for i in range(n)]
    roles = {0: "poor", 1: "spiker", 2: "repeater"}
    team = []
    for i, name in enumerate(names):
        activity = rng.gammavariate(1.0, 1.0)  # some people send far more than others
        mix = dict(zip(evals, np.random.default_rng(rng.randrange(2**31)).dirichlet([1.0] * len(evals)), strict=True))
        team.append(User(name, sdk="openai" if i % 2 == 0 else "anthropic", mix=mix, rate=0.5 + activity,
                         role=roles.get(i, "member") if n >= 4 else "member"))
    return team


@dataclass
class Event:
    t: float                   # seconds into the simulated hour
    user: User
    row: int
    text: str
    kind: str                  # first | followup | repeat

    def __lt__(self, other: Event) -> bool:
        return self.t < other.t


class Traffic:
    """Draws each hour's requests: prompts without replacement per task, wrapping when one runs out."""

    def __init__(self, data: RouterBenchData, rng: random.Random) -> None:
        self.rng = rng
        self.by_eval: dict[str, list[int]] = {}
        for i, e in enumerate(data.eval_names):
            self.by_eval.setdefault(e, []).append(i)
        self.pools = {e: [] for e in self.by_eval}
        self.data = data

    def draw(self, evals: str) -> int:
        pool = self.pools[evals]
        if not pool:
            pool.extend(self.rng.sample(self.by_eval[evals], len(self.by_eval[evals])))
        return pool.pop()

    def hour(self, team: list[User], per_hour: int, spiking: bool, recorded: RecordedAnswers) -> list[Event]:
        total = sum(u.rate for u in team)
        events = []
        for u in team:
            lam = per_hour * u.rate / total * (5.0 if spiking and u.role == "spiker" else 1.0)
            n = int(np.random.default_rng(self.rng.randrange(2**31)).poisson(lam))
            for _ in range(n):
                t = self.rng.uniform(0, 3540)
                if u.role == "repeater" and u.asked and self.rng.random() < 0.4:
                    row = self.rng.choice(u.asked)
                    events.append(Event(t, u, row, self.data.prompts[row], "repeat"))
                    continue
                evals = self.rng.choices(list(u.mix), weights=list(u.mix.values()))[0]
                row = self.draw(evals)
                text = self.data.prompts[row]
                if u.role == "poor":
                    text = poor_prompt(text)
                    recorded.register(text, row)
                u.asked.append(row)
                events.append(Event(t, u, row, text, "first"))
        return sorted(events)


# -- the gateway and the loop ---------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    event: Event
    request_id: str
    model: str
    route: str
    cache: str
    correct: bool


class Harness:
    """The embedded Postgres, the fake providers, `tm gateway` in its own process, `tm loop run`."""

    def __init__(self, home: Path, recorded: RecordedAnswers, local: list[str], frontier: str, default_local: str,
                 judge_noise: float, seed: int, thresholds: dict | None = None, start: str = "tiers",
                 database_url: str | None = None, learned: bool = False, routing: dict | None = None) -> None:
        from tm_resources import db

        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.own_pg = database_url is None
        self.url = database_url or db.ensure_database(db.start_embedded(home / "pg"), "tm")
        db.migrate(self.url)
        self.frontier_key = "sk-sim-" + os.urandom(12).hex()
        self.providers = FakeProviders(recorded, {frontier: FRONTIER_PRICE}, judge_noise, seed,
                                       self.frontier_key).start()
        self.config_path = home / "tm.yaml"
        self.config_path.write_text(yaml.safe_dump(sim_config(self.providers.url, local, frontier, default_local,
                                                              thresholds, start, learned, routing)))
        self.port = _free_port()
        self.gw: subprocess.Popen | None = None
        self.loop_seconds: list[float] = []

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "TM_HOME": str(self.home), "TM_DATABASE_URL": self.url,
                "TM_CONFIG": str(self.config_path), FRONTIER_KEY_ENV: self.frontier_key}

    def tm(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "tm_gateway.cli", *argv]

    def start_gateway(self) -> None:
        import httpx

        log = (self.home / "gateway.log").open("ab")
        self.gw = subprocess.Popen(self.tm("gateway", "--config", str(self.config_path), "--host", "127.0.0.1",
                                           "--port", str(self.port)), env=self.env(), cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.gw.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.gw.returncode}); see {self.home / 'gateway.log'}")
            try:
                if httpx.get(self.gateway_url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the gateway did not start within 180 s")

    def create_keys(self, team: list[User]) -> None:
        import psycopg

        from tm_gateway import keys

        with psycopg.connect(self.url) as conn:
            for u in team:
                u.key, _ = keys.create_key(conn, u.name)

    def loop_run(self, hour: datetime) -> None:
        t0 = time.perf_counter()
        with (self.home / "loop.log").open("ab") as log:
            code = subprocess.call(self.tm("loop", "run", "--hour", hour.strftime("%Y-%m-%d-%H:%M")), env=self.env(),
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.loop_seconds.append(time.perf_counter() - t0)
        if code != 0:
            raise RuntimeError(f"tm loop run failed for {hour:%Y-%m-%d %H:00} (exit {code}); "
                               f"see {self.home / 'loop.log'}")

    def stop(self) -> None:
        if self.gw is not None and self.gw.poll() is None:
            self.gw.terminate()
            try:
                self.gw.wait(30)
            except subprocess.TimeoutExpired:
                self.gw.kill()
        self.providers.stop()
        if self.own_pg:
            import pgserver

            # Stopped now, not at exit: the run's folder is removed next.
            pgserver.get_server((self.home / "pg" / "pgdata").resolve()).cleanup()

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        import psycopg

        with psycopg.connect(self.url, row_factory=psycopg.rows.dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    def restamp(self, served: list[Served], hour: datetime) -> None:
        """Wait for every row, then move each to its simulated arrival time (see the module's docstring)."""
        import psycopg

        ids = [s.request_id for s in served]
        deadline = time.monotonic() + 60
        while True:
            n = self.query("SELECT count(*) AS n FROM requests WHERE id = ANY(%s::uuid[])", (ids,))[0]["n"]
            if n == len(ids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {len(ids)} rows reached the log")
            time.sleep(0.2)
        stamps = [hour + timedelta(seconds=s.event.t) for s in served]
        with psycopg.connect(self.url) as conn:
            conn.execute("""
                CREATE TEMP TABLE sim_ts ON COMMIT DROP AS
                SELECT unnest(%s::uuid[]) AS id, unnest(%s::timestamptz[]) AS ts""", (ids, stamps))
            # A cascade's attempts form a chain by parent_id up from the answer: each 1 ms before the next.
            conn.execute("""WITH RECURSIVE up(id, ts) AS (
                                SELECT c.parent_id, s.ts - interval '1 millisecond'
                                FROM requests c JOIN sim_ts s ON s.id = c.id WHERE c.parent_id IS NOT NULL
                                UNION ALL
                                SELECT p.parent_id, up.ts - interval '1 millisecond'
                                FROM requests p JOIN up ON p.id = up.id WHERE p.parent_id IS NOT NULL)
                            UPDATE requests r SET ts = up.ts FROM up WHERE r.id = up.id""")
            conn.execute("UPDATE requests r SET ts = s.ts FROM sim_ts s WHERE r.id = s.id")
            conn.commit()


class Clients:
    """The official SDKs, one client per user, as the team would send requests."""

    def __init__(self, url: str, team: list[User]) -> None:
        import anthropic
        import openai

        self.by_user = {u.name: (openai.OpenAI(base_url=url + "/v1", api_key=u.key, max_retries=0, timeout=120)
                                 if u.sdk == "openai" else
                                 anthropic.Anthropic(base_url=url, api_key=u.key, max_retries=0, timeout=120))
                        for u in team}

    def ask(self, user: User, text: str) -> tuple[dict, str]:
        client = self.by_user[user.name]
        messages = [{"role": "user", "content": text}]
        if user.sdk == "openai":
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)
            return dict(raw.headers), raw.parse().choices[0].message.content or ""
        raw = client.messages.with_raw_response.create(model="auto", max_tokens=1024, messages=messages)
        return dict(raw.headers), "".join(b.text for b in raw.parse().content if b.type == "text")


# -- the run ----------------------------------------------------------------------------------------

def _rel(x: float, ref: float) -> float | None:
    return round(x / ref, 4) if ref else None


def simulate(data_dir: str | os.PathLike, *, hours: int = 6, users: int = 12, requests_per_hour: int = 150,
             judge_noise: float = 0.1, followup: float = 0.5, seed: int = 0, local: list[str] | None = None,
             frontier: str = DEFAULT_FRONTIER, default_local: str | None = None, spike_hour: int | None = 2,
             thresholds: dict | None = None, start: str = "tiers", router_reference: bool = True,
             learned: bool = False, routing: dict | None = None, final_loop: bool = True, home: Path | None = None,
             keep: bool = False,
             database_url: str | None = None, progress=print) -> dict:
    """Run the simulation and return its figures (JSON-able); see the module's docstring."""
    t_start = time.perf_counter()
    data = load_routerbench(data_dir)
    local = list(local or [m for m in DEFAULT_LOCAL if m in data.models])
    missing = [m for m in (*local, frontier) if m not in data.models]
    if missing or not local:
        raise ValueError(f"{data_dir}: no model {missing[0] if missing else '(local list empty)'} in the data "
                         f"(models: {', '.join(data.models)})")
    default_local = default_local or local[0]
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, not {start!r}")
    rng = random.Random(seed)
    recorded = RecordedAnswers(data)
    f = data.models.index(frontier)
    evals = sorted(set(data.eval_names))
    team = make_team(users, evals, rng)
    traffic = Traffic(data, rng)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    first_hour = now - timedelta(hours=hours)
    home = Path(home or tempfile.mkdtemp(prefix="tm-sim-"))
    harness = Harness(home, recorded, local, frontier, default_local, judge_noise, seed, thresholds, start,
                      database_url, learned, routing)
    report: dict = {"data": str(data_dir), "rows": len(data), "settings": {
        "hours": hours, "users": users, "requests_per_hour": requests_per_hour, "judge_noise": judge_noise,
        "followup": followup, "seed": seed, "local": local, "frontier": frontier, "default_local": default_local,
        "spike_hour": spike_hour, "thresholds": thresholds or {}, "start": start,
        "learned": learned, "routing": routing}, "hours": []}
    all_served: list[Served] = []
    try:
        harness.create_keys(team)  # before the gateway starts: it reads them at start-up
        harness.start_gateway()
        clients = Clients(harness.gateway_url, team)
        for h in range(hours):
            hour = first_hour + timedelta(hours=h)
            in_force = harness.query("""SELECT action, rule_id FROM routing_rules WHERE status = 'active'
                                        AND hour = (SELECT max(hour) FROM routing_rules WHERE hour < %s)""", (hour,))
            queue = traffic.hour(team, requests_per_hour, spike_hour is not None and h + 1 == spike_hour, recorded)
            heapq.heapify(queue)
            served: list[Served] = []
            t0 = time.perf_counter()
            while queue:
                ev = heapq.heappop(queue)
                headers, answer = clients.ask(ev.user, ev.text)
                ok = recorded.correct(ev.row, answer)
                served.append(Served(ev, headers["x-tm-request-id"], headers.get("x-tm-model", ""),
                                     headers.get("x-tm-route", ""), headers.get("x-tm-cache", ""), ok))
                if not ok and ev.kind != "followup" and rng.random() < followup:
                    t = ev.t + rng.uniform(20, 180)
                    if t < 3599:
                        text = rng.choice(CORRECTIONS) + ev.text
                        recorded.register(text, ev.row)
                        heapq.heappush(queue, Event(t, ev.user, ev.row, text, "followup"))
            traffic_s = time.perf_counter() - t0
            harness.restamp(served, hour)
            all_served += served
            stats = harness.query("""
                SELECT count(*) FILTER (WHERE served) AS requests, coalesce(sum(cost_usd), 0) AS cost,
                       count(*) FILTER (WHERE route LIKE 'rule:escalate:%%') AS escalated_by_rule,
                       count(*) FILTER (WHERE served AND route_reason LIKE '%%escalated:%%') AS escalated_by_cascade,
                       count(*) FILTER (WHERE cache_hit IS NOT NULL) AS cache_hits
                FROM requests WHERE ts >= %s AND ts < %s""", (hour, hour + timedelta(hours=1)))[0]
            types = harness.query("""SELECT task_type, count(*) AS n FROM requests WHERE ts >= %s AND ts < %s
                                     AND served GROUP BY 1 ORDER BY 2 DESC""", (hour, hour + timedelta(hours=1)))
            rows = [s.event.row for s in served]
            looped = final_loop or h + 1 < hours  # final_loop False: no rules for hours nobody will see
            if looped:
                harness.loop_run(hour)
            written = harness.query("SELECT action, rule_id, reason FROM routing_rules WHERE status = 'active' "
                                    "AND hour = %s ORDER BY rule_id", (hour,))
            signals = _signals_by_correctness(harness, served)
            acc = float(np.mean([s.correct for s in served])) if served else 0.0
            fr_acc = float(data.quality[rows, f].mean()) if rows else 0.0
            fr_cost = float(data.cost[rows, f].sum())
            entry = {
                "hour": h + 1, "at": hour.isoformat(), "requests": len(served),
                "sent": dict(Counter(s.event.kind for s in served)), "cost_usd": round(float(stats["cost"]), 6),
                "all_frontier_cost_usd": round(fr_cost, 6), "cost_vs_frontier": _rel(float(stats["cost"]), fr_cost),
                "accuracy": round(acc, 4), "all_frontier_accuracy": round(fr_acc, 4),
                "accuracy_vs_frontier": _rel(acc, fr_acc),
                "rules_in_force": dict(Counter(r["action"] for r in in_force)),
                "escalations": int(stats["escalated_by_rule"]) + int(stats["escalated_by_cascade"]),
                "escalated_by_rule": int(stats["escalated_by_rule"]),
                "escalated_by_cascade": int(stats["escalated_by_cascade"]),
                "cache_hits": int(stats["cache_hits"]),
                "routes": dict(Counter(s.route.rsplit(":", 1)[0] if s.route.startswith("rule:") else s.route
                                       for s in served).most_common()),
                "models": dict(Counter(s.model for s in served).most_common()),
                "task_types": {r["task_type"] or "none": int(r["n"]) for r in types},
                "rules_written": {r["rule_id"]: r["reason"] for r in written},
                "loop_scores": signals,
                "traffic_s": round(traffic_s, 1), "loop_s": round(harness.loop_seconds[-1], 1) if looped else None,
            }
            report["hours"].append(entry)
            progress(f"hour {h + 1}: {entry['requests']} requests, cost {entry['cost_vs_frontier']} of all-frontier, "
                     f"accuracy {entry['accuracy']:.3f} vs {fr_acc:.3f}; rules in force {entry['rules_in_force']}; "
                     f"loop {entry['loop_s']} s")
        report["every_request_has_its_row"] = _rows_check(harness, all_served)
        report["escalation"] = _escalation_timing(harness, report["hours"], first_hour)
        report["judge"] = dict(harness.providers.judged)
    finally:
        harness.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    report["references"] = _references(data, all_served, local, f, data_dir, router_reference)
    report["totals"] = _totals(report["hours"])
    report["target"] = _target(report)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if keep:
        report["home"] = str(home)
    return report


def _signals_by_correctness(harness: Harness, served: list[Served]) -> dict:
    """What the loop saw: its mean scores for the answers that were right and for those that were wrong."""
    import pandas as pd

    scored = pd.DataFrame(harness.query(
        "SELECT request_id::text AS id, quality, completion, coherence, brevity, reprompt, cost_efficiency "
        "FROM scored_requests WHERE request_id = ANY(%s::uuid[])", ([s.request_id for s in served],)))
    if scored.empty:
        return {}
    right = {s.request_id: s.correct for s in served}
    scored["answer"] = ["right" if right.get(i) else "wrong" for i in scored["id"]]
    means = scored.drop(columns="id").groupby("answer").mean(numeric_only=True).round(3)
    return {k: {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for k, row in means.iterrows()}


def _rows_check(harness: Harness, served: list[Served]) -> dict:
    ids = [s.request_id for s in served]
    found = harness.query("SELECT count(*) AS n FROM requests WHERE id = ANY(%s::uuid[])", (ids,))[0]["n"]
    total = harness.query("SELECT count(*) FILTER (WHERE served) AS n FROM requests")[0]["n"]
    return {"sent": len(ids), "rows_found": int(found), "served_rows_total": int(total),
            "ok": int(found) == len(ids) == int(total)}


def _escalation_timing(harness: Harness, hours: list[dict], first_hour: datetime) -> dict:
    """Per escalated task type: the simulated hour of its first traffic and of the loop run that escalated it."""
    first_seen: dict[str, int] = {}
    for e in hours:
        for t in e["task_types"]:
            first_seen.setdefault(t, e["hour"])
    out = {}
    for r in harness.query("SELECT task_type, min(hour) AS hour FROM routing_rules WHERE action = 'escalate' "
                           "AND status = 'active' GROUP BY 1"):
        run = int((r["hour"] - first_hour).total_seconds() // 3600) + 1
        seen = first_seen.get(r["task_type"], 1)
        out[r["task_type"]] = {"first_traffic_hour": seen, "escalated_by_loop_run_of_hour": run,
                               "loop_runs_needed": run - seen + 1}
    return out


def _references(data: RouterBenchData, served: list[Served], local: list[str], f: int, data_dir, router: bool) -> dict:
    rows = [s.event.row for s in served]
    fr_acc = float(data.quality[rows, f].mean())
    fr_cost = float(data.cost[rows, f].mean())
    singles = {m: float(data.quality[rows, data.models.index(m)].mean()) for m in local}
    best = max(singles, key=singles.get)
    out = {"all_frontier": {"accuracy": round(fr_acc, 4), "cost_per_request": round(fr_cost, 6)},
           "best_local": {"model": best, "accuracy": round(singles[best], 4),
                          "accuracy_vs_frontier": _rel(singles[best], fr_acc), "cost_vs_frontier": 0.0},
           "local_models": {m: round(a, 4) for m, a in singles.items()}}
    if router:
        from tm_gateway.routerbench import run_router_bench

        # `tm bench router` with its defaults: one 70/30 split of the same data (seed 0).
        rb = run_router_bench(data_dir, cache_dir=ROOT / ".tm" / "bench-cache")
        for name in ("router", "router_cascade"):
            if name in rb:
                out[f"learned_{name}"] = {"accuracy_vs_frontier": rb[name]["accuracy_vs_reference"],
                                          "cost_vs_frontier": rb[name]["cost_vs_reference"],
                                          "reference_model": rb["reference_model"]}
    return out


def _totals(hours: list[dict]) -> dict:
    def tot(key: str) -> float:
        return float(sum(e[key] for e in hours))

    n = tot("requests")
    acc = sum(e["accuracy"] * e["requests"] for e in hours) / n if n else 0.0
    fr = sum(e["all_frontier_accuracy"] * e["requests"] for e in hours) / n if n else 0.0
    return {"requests": int(n), "cost_usd": round(tot("cost_usd"), 6),
            "all_frontier_cost_usd": round(tot("all_frontier_cost_usd"), 6),
            "cost_vs_frontier": _rel(tot("cost_usd"), tot("all_frontier_cost_usd")),
            "accuracy": round(acc, 4), "all_frontier_accuracy": round(fr, 4), "accuracy_vs_frontier": _rel(acc, fr),
            "cache_hits": int(tot("cache_hits")), "escalations": int(tot("escalations"))}


def _target(report: dict) -> dict:
    """By hour 6 (or the last hour): spend <= 50% of all-frontier at >= 97% of its accuracy."""
    hours = report["hours"]
    at = next((e for e in hours if e["hour"] == 6), hours[-1]) if hours else None
    if at is None:
        return {}
    runs = [v["loop_runs_needed"] for v in report.get("escalation", {}).values()]
    return {"hour": at["hour"], "cost_vs_frontier": at["cost_vs_frontier"],
            "accuracy_vs_frontier": at["accuracy_vs_frontier"],
            "spend_met": at["cost_vs_frontier"] is not None and at["cost_vs_frontier"] <= 0.5,
            "accuracy_met": at["accuracy_vs_frontier"] is not None and at["accuracy_vs_frontier"] >= 0.97,
            "escalated_within_two_runs": bool(runs) and min(runs) <= 2}


def table(report: dict) -> str:
    from tabulate import tabulate

    head = ["hour", "requests", "cost $", "all-frontier $", "cost vs frontier", "accuracy", "frontier accuracy",
            "accuracy vs frontier", "rules in force", "escalations", "cache hits"]
    rows = [[e["hour"], e["requests"], f"{e['cost_usd']:.4f}", f"{e['all_frontier_cost_usd']:.4f}",
             f"{100 * (e['cost_vs_frontier'] or 0):.1f} %", f"{100 * e['accuracy']:.1f} %",
             f"{100 * e['all_frontier_accuracy']:.1f} %", f"{100 * (e['accuracy_vs_frontier'] or 0):.1f} %",
             ", ".join(f"{k} {v}" for k, v in sorted(e["rules_in_force"].items())) or "-", e["escalations"],
             e["cache_hits"]] for e in report["hours"]]
    return tabulate(rows, headers=head, tablefmt="github")


def plot(report: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [e["hour"] for e in report["hours"]]
    cost = [100 * (e["cost_vs_frontier"] or 0) for e in report["hours"]]
    acc = [100 * (e["accuracy_vs_frontier"] or 0) for e in report["hours"]]
    refs = report["references"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(hours, cost, "o-", color="tab:blue", label="Token Machine (gateway + loop)")
    ax2.plot(hours, acc, "o-", color="tab:blue", label="Token Machine (gateway + loop)")
    for ax, key in ((ax1, "cost_vs_frontier"), (ax2, "accuracy_vs_frontier")):
        ax.axhline(100, color="black", lw=1, label=f"all-frontier ({report['settings']['frontier']})")
        best = refs["best_local"]
        ax.axhline(100 * best[key], color="tab:green", ls=":", label=f"best single local ({model_name(best['model'])})")
        for name, style in (("learned_router", "--"), ("learned_router_cascade", "-.")):
            if name in refs and refs[name][key] is not None:
                ax.axhline(100 * refs[name][key], color="tab:orange", ls=style,
                           label="offline learned router" + (" + cascades" if "cascade" in name else ""))
        ax.set_xlabel("simulated hour")
        ax.set_xticks(hours)
        ax.grid(alpha=0.3)
    ax1.axhline(50, color="tab:red", lw=0.8, alpha=0.5, label="target")
    ax2.axhline(97, color="tab:red", lw=0.8, alpha=0.5, label="target")
    ax1.set_ylabel("cost, % of all-frontier")
    ax2.set_ylabel("accuracy, % of all-frontier")
    ax1.set_ylim(bottom=0)
    fig.legend(*ax2.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    s = report["settings"]
    fig.suptitle(f"Simulated agency on RouterBench answers: {s['users']} users, ~{s['requests_per_hour']} requests/h, "
                 f"judge noise {s['judge_noise']:g}, start '{s['start']}'", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of RouterBench-format CSV files")
    ap.add_argument("--hours", type=int, default=6)
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--requests-per-hour", type=int, default=150)
    ap.add_argument("--judge-noise", type=float, default=0.1, help="share of the judge's verdicts flipped")
    ap.add_argument("--followup", type=float, default=0.5, help="chance a wrong answer draws a correction")
    ap.add_argument("--spike-hour", type=int, default=2, help="the hour the cost spiker sends five times more")
    ap.add_argument("--local", default=",".join(DEFAULT_LOCAL), help="RouterBench models served locally (price 0)")
    ap.add_argument("--frontier", default=DEFAULT_FRONTIER)
    ap.add_argument("--default-local", default=None, help="what `auto` means before any rule (default: first local)")
    ap.add_argument("--thresholds", default=None,
                    help="JSON of loop.thresholds to override, e.g. '{\"escalate_below\": 0.6}'")
    ap.add_argument("--start", choices=STARTS, default="tiers", help="what `auto` means before the first rule")
    ap.add_argument("--learned", action="store_true", help="turn the gateway's learned router on (routing.learned)")
    ap.add_argument("--routing", default=None,
                    help="JSON merged into tm.yaml's routing sections, "
                         "e.g. '{\"cascade\": {\"consensus\": [\"yi-34b-chat\"]}}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run's TM_HOME (database, logs) and print where")
    ap.add_argument("--no-router-reference", action="store_true", help="skip the offline learned router's line")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--output", help="also write the JSON figures to this file")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args(argv)
    if not 0 <= args.judge_noise <= 1 or not 0 <= args.followup <= 1:
        ap.error("--judge-noise and --followup are probabilities between 0 and 1")
    if args.hours < 1 or args.users < 1 or args.requests_per_hour < 1:
        ap.error("--hours, --users and --requests-per-hour must be at least 1")
    # A stopped run still stops its gateway and its database (the `finally` in simulate).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    try:
        report = simulate(args.data, hours=args.hours, users=args.users, requests_per_hour=args.requests_per_hour,
                          judge_noise=args.judge_noise, followup=args.followup, seed=args.seed,
                          local=[m for m in args.local.split(",") if m], frontier=args.frontier,
                          default_local=args.default_local, spike_hour=args.spike_hour,
                          thresholds=json.loads(args.thresholds) if args.thresholds else None, start=args.start,
                          learned=args.learned, routing=json.loads(args.routing) if args.routing else None,
                          keep=args.keep,
                          router_reference=not args.no_router_reference, progress=say)
    except (FileNotFoundError, ValueError) as err:
        print(f"simulate: {err}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(table(report))
        print(json.dumps({k: report[k] for k in ("totals", "references", "escalation", "target", "seconds")},
                         indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
