"""The response cache, through the real gateway with the official SDKs: exact hits from the request
log, semantic hits from the loop's cache_entries (HNSW in the real embedded Postgres + pgvector),
scoping, opting out, streamed cached answers, and a cache that is down never failing a request."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anthropic
import openai
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tm_gateway import keys
from tm_resources import cache
from tm_resources.config import Config, parse_config

pytestmark = pytest.mark.slow  # the file takes over 20 s: out of the fast tier


def _config(anth_url: str, local_url: str, **cache_settings) -> Config:
    data = make_config(anth_url, local_url).model_dump(mode="json")
    data["cache"] = {"enabled": True, "semantic": {"threshold": 0.9}, **cache_settings}
    data["users"] = {"alice": {"team": "eng"}, "bob": {"team": "eng"}, "carol": {"team": "sales"}}
    return parse_config(data)


class Cached:
    def __init__(self, db_url, upstreams, tmp_path: Path, **cache_settings):
        self.anth, self.local = upstreams
        self.db_url = db_url
        with psycopg.connect(db_url) as conn:
            self.keys = {u: keys.create_key(conn, u)[0] for u in ("alice", "bob", "carol")}
        self.config = _config(self.anth.url, self.local.openai_url, **cache_settings)
        self.app, self.served = start_gateway(self.config, db_url, tmp_path)

    def openai(self, user: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.served.url + "/v1", api_key=self.keys[user], max_retries=0)

    def anthropic(self, user: str = "alice") -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.served.url, api_key=self.keys[user], max_retries=0)

    def rows(self) -> list[dict]:
        assert self.app.state.proxy.request_log.flush()
        return query(self.db_url, "SELECT * FROM requests ORDER BY ts, id")

    def calls(self) -> int:
        return len(self.anth.requests) + len(self.local.requests)

    def score(self, request_id, quality: float, prompt: str | None = None) -> None:
        """What the loop's scored_requests asset would write for this request (with the prompt's
        vector when given: the loop embeds the prompts the gateway did not)."""
        from pgvector.psycopg import register_vector

        from tm_resources.embedder import get_embedder

        vec = get_embedder().embed_one(prompt) if prompt is not None else None
        with psycopg.connect(self.db_url) as conn:
            register_vector(conn)
            conn.execute(
                "INSERT INTO scored_requests (hour, request_id, ts, user_id, model, quality, prompt_embedding)"
                " SELECT date_trunc('hour', ts), id, ts, user_id, model, %s, %s FROM requests WHERE id = %s",
                (quality, vec, request_id))

    def fill_entries(self) -> int:
        """Run the loop's cache_entries step for the current hour, and wait until the gateway has
        re-read which contexts have entries (as every replica does when the loop writes them)."""
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        with psycopg.connect(self.db_url) as conn:
            n = sum(cache.replace_entries(conn, h, self.config) for h in (hour - timedelta(hours=1), hour))
            conn.commit()
            version = conn.execute("SELECT version FROM tm_state_versions WHERE name = 'cache_entries'").fetchone()[0]
        shared = self.app.state.proxy.shared
        deadline = time.monotonic() + 10
        while (shared._versions.get("cache_entries") or 0) < version:
            assert time.monotonic() < deadline, "the gateway did not re-read the cache contexts"
            time.sleep(0.02)
        return n

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture
def cached(db_url, upstreams, tmp_path):
    c = Cached(db_url, upstreams, tmp_path)
    yield c
    c.stop()


def ask(client: openai.OpenAI, text: str, model: str = "local-test", **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kw)


def test_the_same_request_again_is_answered_from_the_exact_cache(cached):
    first = ask(cached.openai(), "What is the capital of France?")
    assert first.headers["x-tm-cache"] == "miss"
    cached.rows()  # logged: the next identical request can find it
    calls = cached.calls()

    again = ask(cached.openai(), "What is the capital of France?")
    answer = again.parse()
    assert cached.calls() == calls, "the provider was not asked again"
    assert again.headers["x-tm-cache"] == "exact"
    assert answer.choices[0].message.content == "echo: What is the capital of France?"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == 0 and answer.usage.completion_tokens == 0
    assert float(again.headers["x-tm-cost-usd"]) == 0

    source, hit = cached.rows()
    assert again.headers["x-tm-cache-source"] == str(source["id"])
    assert hit["cache_hit"] == "exact" and hit["cache_source_id"] == source["id"]
    assert hit["provider"] == "cache" and hit["model"] == "local-test" and hit["route"] == "cache:exact"
    assert hit["status"] == 200 and hit["cost_usd"] == 0 and hit["input_tokens"] == hit["output_tokens"] == 0
    # What the frontier would have charged for the answer: the savings are real figures.
    assert hit["baseline_cost_usd"] == pytest.approx(source["baseline_cost_usd"]) and hit["baseline_cost_usd"] > 0
    assert hit["response_text"] == source["response_text"]

    # A different question, or other sampling settings, is not the same request.
    assert ask(cached.openai(), "What is the capital of Spain?").headers["x-tm-cache"] == "miss"
    assert ask(cached.openai(), "What is the capital of France?", temperature=0.2).headers["x-tm-cache"] == "miss"


def test_another_replicas_answer_is_an_exact_hit_once_its_poll_has_read_it(cached, tmp_path):
    # Each replica holds the hashes of recent requests, so that a request nobody has sent costs no
    # query; another replica's requests reach it through the state poll.
    other_app, other = start_gateway(cached.config, cached.db_url, tmp_path / "replica-b")
    try:
        hashes = other_app.state.proxy.shared.hashes
        held = len(hashes)
        first = ask(cached.openai(), "Name three prime numbers.")
        assert first.headers["x-tm-cache"] == "miss"
        cached.rows()  # replica A has logged it
        deadline = time.monotonic() + 10
        while len(hashes) == held:
            assert time.monotonic() < deadline, "replica B never read the new request's hash"
            time.sleep(0.05)
        client_b = openai.OpenAI(base_url=other.url + "/v1", api_key=cached.keys["alice"], max_retries=0)
        calls = cached.calls()
        again = ask(client_b, "Name three prime numbers.")
        assert again.headers["x-tm-cache"] == "exact"
        assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
        assert cached.calls() == calls
    finally:
        other.stop()


def test_a_streaming_client_gets_the_cached_answer_as_a_stream(cached):
    text = "Name three prime numbers"
    ask(cached.openai(), text)
    cached.rows()
    calls = cached.calls()
    raw = cached.openai().chat.completions.with_raw_response.create(
        model="local-test", messages=[{"role": "user", "content": text}], stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-tm-cache"] == "exact"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: " + text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 0
    assert cached.calls() == calls
    assert cached.rows()[-1]["cache_hit"] == "exact" and cached.rows()[-1]["stream"] is True


def test_anthropic_clients_get_cached_messages_whole_and_streamed(cached):
    client = cached.anthropic()
    kw = dict(model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "Say hello to the team"}])
    first = client.messages.create(**kw)
    cached.rows()
    calls = cached.calls()
    raw = client.messages.with_raw_response.create(**kw)
    again = raw.parse()
    assert raw.headers["x-tm-cache"] == "exact"
    assert again.content[0].text == first.content[0].text and again.stop_reason == "end_turn"
    assert again.usage.input_tokens == 0 and again.usage.output_tokens == 0
    with client.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == first.content[0].text
    assert cached.calls() == calls
    assert [r["cache_hit"] for r in cached.rows()] == [None, "exact", "exact"]


def test_opting_out_and_answers_the_loop_scored_badly(cached):
    ask(cached.openai(), "Summarise the meeting notes")
    source = cached.rows()[0]
    calls = cached.calls()
    off = ask(cached.openai(), "Summarise the meeting notes", extra_headers={"x-tm-cache": "off"})
    assert off.headers["x-tm-cache"] == "off" and cached.calls() == calls + 1
    # An answer the loop scored under loop.thresholds.cache_min_quality is not served again.
    cached.score(source["id"], 0.3)
    # An opted-out request's answer is never a source for others either.
    assert cached.rows()[1]["request_hash"] is None
    assert ask(cached.openai(), "Summarise the meeting notes").headers["x-tm-cache"] == "miss"
    assert cached.calls() == calls + 2
    # The HTTP way to ask for a fresh answer (a client's "regenerate") opts out too.
    ask(cached.openai(), "Summarise the agenda")
    cached.rows()
    for directive in ("no-cache", "no-store", "max-age=0, no-cache"):
        fresh = ask(cached.openai(), "Summarise the agenda", extra_headers={"cache-control": directive})
        assert fresh.headers["x-tm-cache"] == "off"
    assert cached.calls() == calls + 6
    assert ask(cached.openai(), "Summarise the agenda").headers["x-tm-cache"] == "exact"


def test_answers_are_shared_within_the_configured_scope(db_url, upstreams, tmp_path):
    # scope "user" (the default): nobody is served another user's answer.
    c = Cached(db_url, upstreams, tmp_path / "user-scope")
    try:
        ask(c.openai("alice"), "Draft the release notes")
        c.rows()
        assert ask(c.openai("bob"), "Draft the release notes").headers["x-tm-cache"] == "miss"
        assert ask(c.openai("alice"), "Draft the release notes").headers["x-tm-cache"] == "exact"
    finally:
        c.stop()
    # scope "team": alice and bob share, carol (another team) does not.
    c = Cached(db_url, upstreams, tmp_path / "team-scope", scope="team")
    try:
        assert ask(c.openai("bob"), "Draft the release notes").headers["x-tm-cache"] == "exact"
        assert ask(c.openai("carol"), "Draft the release notes").headers["x-tm-cache"] == "miss"
    finally:
        c.stop()


def test_a_similar_prompt_is_answered_from_an_answer_that_scored_well(cached):
    client = cached.openai()
    first = ask(client, "How do I reverse a list in Python?", model="auto")
    source = cached.rows()[0]
    assert source["prompt_embedding"] is not None and source["context_hash"]
    # Not scored yet: the semantic cache serves only answers the loop scored well.
    assert ask(client, "How can I reverse a list in Python?", model="auto").headers["x-tm-cache"] == "miss"
    cached.score(source["id"], 0.92)
    contexts = cached.app.state.proxy.shared.contexts
    assert not contexts.may_have(source["context_hash"], "auto", "alice")  # no entries: no semantic query
    assert cached.fill_entries() == 1
    assert contexts.may_have(source["context_hash"], "auto", "alice") and len(contexts) == 1
    assert not contexts.may_have(source["context_hash"], "auto", "bob")  # another user's entry: no query
    calls = cached.calls()

    similar = ask(client, "how can i reverse a python list?", model="auto")
    assert similar.headers["x-tm-cache"] == "semantic", similar.headers
    assert similar.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert cached.calls() == calls
    hit = cached.rows()[-1]
    assert hit["cache_hit"] == "semantic" and hit["cache_source_id"] == source["id"]
    assert 0.9 <= hit["cache_similarity"] < 1 and hit["route"] == "cache:semantic"
    assert hit["cost_usd"] == 0 and hit["output_tokens"] == 0

    # Another question, or the same one under another system prompt, is not served that answer.
    assert ask(client, "How do I sort a dictionary by value?", model="auto").headers["x-tm-cache"] == "miss"
    other_context = client.chat.completions.with_raw_response.create(model="auto", messages=[
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "how can i reverse a python list?"}])
    assert other_context.headers["x-tm-cache"] == "miss"
    # A request naming its model is not embedded by default (cache.semantic.named_models).
    assert ask(client, "how can i reverse a python list?").headers["x-tm-cache"] == "miss"


LONG_OPENING = ("You are reviewing a pull request for our billing service. The service is written in Python "
                "with FastAPI, talks to Postgres through SQLAlchemy, and publishes invoices to a queue. "
                "Our conventions: type hints everywhere, no bare excepts, money as integer cents, UTC "
                "timestamps, and every public function documented with its errors. ") * 2


def test_long_prompts_that_open_alike_are_not_taken_for_one_another(cached):
    # Both prompts are longer than the embedder's 128-token window: their vectors are the same, their
    # questions are not. Such answers are kept out of the semantic cache, and such prompts skip it.
    client = cached.openai()
    ask(client, LONG_OPENING + "Question: is the retry logic in charge_card() idempotent?", model="auto")
    [source] = cached.rows()
    cached.score(source["id"], 0.95)
    assert cached.fill_entries() == 0
    other = ask(client, LONG_OPENING + "Question: write the migration that adds a currency column.", model="auto")
    assert other.headers["x-tm-cache"] == "miss"
    assert other.parse().choices[0].message.content.endswith("adds a currency column.")
    # The same long request again is still an exact hit.
    again = ask(client, LONG_OPENING + "Question: is the retry logic in charge_card() idempotent?", model="auto")
    assert again.headers["x-tm-cache"] == "exact"


def test_fits_window():
    from tm_resources.embedder import fits_window

    assert fits_window(["How do I reverse a list in Python?", LONG_OPENING, "", "word " * 125, "word " * 126]) == [
        True, False, False, True, False]


def test_named_model_requests_use_the_semantic_cache_when_configured(db_url, upstreams, tmp_path):
    c = Cached(db_url, upstreams, tmp_path, semantic={"threshold": 0.9, "named_models": True})
    try:
        client = c.openai()
        first = ask(client, "How do I reverse a list in Python?")  # names local-test
        [source] = c.rows()
        # No entries in this context yet: nothing to look up, so nothing embedded at the gateway;
        # the loop embeds the prompt when it scores it.
        assert source["prompt_embedding"] is None
        c.score(source["id"], 0.92, prompt="How do I reverse a list in Python?")
        assert c.fill_entries() == 1
        similar = ask(client, "how can i reverse a python list?")
        assert similar.headers["x-tm-cache"] == "semantic"
        assert similar.parse().choices[0].message.content == first.parse().choices[0].message.content
        # Entries are per model asked for: the same prompt to another model is not served this answer.
        assert ask(client, "how can i reverse a python list?", model="claude-test").headers["x-tm-cache"] == "miss"
    finally:
        c.stop()


def test_entries_outside_the_window_or_below_the_bar_are_not_served(cached):
    client = cached.openai()
    ask(client, "What does HTTP 418 mean?", model="auto")
    ask(client, "Explain the CAP theorem briefly", model="auto")
    old, weak = cached.rows()
    cached.score(old["id"], 0.95)
    cached.score(weak["id"], 0.6)
    assert cached.fill_entries() == 1  # only the answer that cleared cache_min_quality (0.8)
    with psycopg.connect(cached.db_url) as conn:
        conn.execute("UPDATE cache_entries SET ts = ts - interval '25 hours'")
    assert ask(client, "what does http status 418 mean?", model="auto").headers["x-tm-cache"] == "miss"
    assert ask(client, "Explain the CAP theorem in brief", model="auto").headers["x-tm-cache"] == "miss"


def test_a_cache_that_cannot_answer_in_time_never_fails_the_request(db_url, upstreams, tmp_path):
    c = Cached(db_url, upstreams, tmp_path, lookup_timeout_s=1e-6)
    try:
        ask(c.openai(), "Is the cache fast enough?")
        c.rows()
        raw = ask(c.openai(), "Is the cache fast enough?")
        assert raw.headers["x-tm-cache"] == "error"
        assert raw.parse().choices[0].message.content == "echo: Is the cache fast enough?"
        assert [r["status"] for r in c.rows()] == [200, 200]
    finally:
        c.stop()


def test_cache_keys():
    base = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    k = cache.keys(base)
    assert k == cache.keys({**base, "stream": True, "stream_options": {"include_usage": True}})
    assert k.request_hash != cache.keys({**base, "temperature": 0.5}).request_hash
    assert k.context_hash == cache.keys({**base, "temperature": 0.5}).context_hash
    assert k.context_hash == cache.keys({**base, "messages": [{"role": "user", "content": "hello"}]}).context_hash
    assert k.context_hash != cache.keys({**base, "system": "be brief"}).context_hash
    assert k.context_hash != cache.keys(base, agent="sales").context_hash
    image = {**base, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert cache.keys(image).context_hash is None  # a picture's question is not matched by its words
    assert cache.keys({**base, "messages": [*base["messages"], {"role": "assistant", "content": "hey"}]}
                      ).context_hash is None


def test_where_the_hnsw_index_is_built(monkeypatch):
    from tm_resources import db

    monkeypatch.delenv("TM_VECTOR_INDEX", raising=False)
    assert db.hnsw_supported("postgresql://u:p@db.example.supabase.co:5432/postgres")  # remote: a normal build
    monkeypatch.setattr(db, "_local_cpu_has_avx512", lambda: False)
    assert not db.hnsw_supported("postgresql://postgres:@/postgres?host=/tmp/pg")
    assert not db.hnsw_supported("postgresql://postgres@127.0.0.1:5432/postgres")
    monkeypatch.setattr(db, "_local_cpu_has_avx512", lambda: True)
    assert db.hnsw_supported("postgresql://postgres:@/postgres?host=/tmp/pg")
    monkeypatch.setenv("TM_VECTOR_INDEX", "none")
    assert not db.hnsw_supported("postgresql://u:p@db.example.supabase.co:5432/postgres")


def test_lookups_that_time_out_under_load_give_their_connections_back(db_url, upstreams, tmp_path):
    # Lookups held up past cache.lookup_timeout_s (here by a lock the loop could hold on
    # scored_requests) by many requests at once: each must give its pooled connection back, so
    # that once the database answers again, repeats are hits again and the pool is idle again.
    from concurrent.futures import ThreadPoolExecutor

    c = Cached(db_url, upstreams, tmp_path, lookup_timeout_s=0.2)
    try:
        ask(c.openai(), "Which lookups come back?")
        c.rows()
        assert ask(c.openai(), "Which lookups come back?").headers["x-tm-cache"] == "exact"
        pool = c.app.state.proxy.cache_pool
        for burst in range(3):
            with psycopg.connect(db_url) as blocker, ThreadPoolExecutor(30) as threads:
                blocker.execute("LOCK TABLE scored_requests IN ACCESS EXCLUSIVE MODE")
                client = c.openai().with_options(timeout=20)
                got = list(threads.map(lambda _, client=client: ask(client, "Which lookups come back?"), range(30)))
                blocker.rollback()
            assert {g.headers["x-tm-cache"] for g in got} == {"error"}, f"burst {burst}"
            assert all(g.parse().choices[0].message.content == "echo: Which lookups come back?" for g in got)
        deadline = time.monotonic() + 10
        while (stats := pool.get_stats()).get("requests_waiting", 0) or stats.get("pool_available", 0) < 1:
            assert time.monotonic() < deadline, f"the pool did not recover: {stats}"
            time.sleep(0.05)
        hits = [ask(c.openai(), "Which lookups come back?").headers["x-tm-cache"] for _ in range(5)]
        assert hits == ["exact"] * 5
        assert len(c.rows()) == 2 + 3 * 30 + 5
    finally:
        c.stop()


@pytest.mark.parametrize("scope, same_scope, other_scope", [("user", "alice", "bob"), ("team", "bob", "carol")])
def test_whether_postgres_is_asked_depends_only_on_what_the_askers_scope_has_sent(
        db_url, upstreams, tmp_path, scope, same_scope, other_scope):
    # A lookup is what a user could time. With the lookups held up (a lock on scored_requests), a
    # request that makes one shows x-tm-cache: error; one that makes none shows miss. Alice's body
    # sent again by her scope is looked up; by a user outside it, never (he learns nothing).
    c = Cached(db_url, upstreams, tmp_path, lookup_timeout_s=0.2, scope=scope)
    try:
        ask(c.openai("alice"), "My private question about the merger")
        c.rows()
        with psycopg.connect(db_url) as blocker:
            blocker.execute("LOCK TABLE scored_requests IN ACCESS EXCLUSIVE MODE")
            outside = ask(c.openai(other_scope), "My private question about the merger")
            inside = ask(c.openai(same_scope), "My private question about the merger")
            blocker.rollback()
        assert outside.headers["x-tm-cache"] == "miss"
        assert inside.headers["x-tm-cache"] == "error"
    finally:
        c.stop()
