"""Agent dispatch (tm_gateway/dispatch.py) with the real MiniLM embedder and the shipped example's
agents: prompts go to the right agent, off-topic ones are unsure, configuration mistakes name their
key, and a request as an agent sends it is still a valid request of its format."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from tests.support import check_anthropic_request, check_openai_request
from tm_gateway.dispatch import DispatchDecision, Dispatcher, apply_agent, resolve_agent
from tm_resources.config import EXAMPLE_CONFIG, AgentConfig, Config, ConfigError, load_config, parse_config
from tm_resources.embedder import Embedder, get_embedder

# Three sets of requests, none of them an intent of tm.yaml, 100 in all, with how they were used:
# TUNED was written with the example's intents and keywords and used to choose the dispatcher's
# settings; HELD_OUT was written before tuning and first scored 14/20, then the example's keywords
# were extended after seeing its misses; FRESH was written after that and scored once, untouched.
TUNED = {
    "it-admin": [
        "my laptop can't connect to the VPN",
        "I can't log into Slack, it says my account is disabled",
        "Excel freezes every time I open a big spreadsheet",
        "can you give me admin rights so I can install Python",
        "the projector in meeting room B doesn't show my screen",
        "how do I reset my MFA device, I got a new phone",
        "my mailbox is full and I can't receive emails",
        "Zoom audio isn't working with my headset",
        "I need a new keyboard, mine has broken keys",
        "our team needs read access to the production database logs",
    ],
    "marketing": [
        "draft a LinkedIn post announcing our launch",
        "write three subject lines for the product announcement email",
        "what hashtags should we use for our Instagram giveaway",
        "create a content calendar for our blog in Q3",
        "write copy for a banner ad targeting small business owners",
        "summarize the engagement metrics from last month's Facebook posts",
        "give me ideas for a customer testimonial video",
        "rewrite our homepage headline to be punchier",
        "plan a webinar to promote the new feature to existing users",
        "write a short case study about how Acme uses our product",
    ],
    "secretary": [
        "schedule a meeting with Anna next Tuesday",
        "move my dentist appointment to next week",
        "book a table for four at an Italian restaurant on Friday evening",
        "take notes during the board meeting and send them around",
        "remind me to submit my expense report on Monday",
        "find a free slot in my calendar for a one-hour call with Mark",
        "book a train to Paris for Wednesday morning",
        "send everyone the agenda for tomorrow's standup",
        "write a thank-you note to the caterers from yesterday's event",
        "cancel all my meetings on Thursday, I'm out sick",
    ],
    "sales": [
        "prepare a quote for 50 seats for Acme",
        "the client wants a 20% discount, how should I respond",
        "write a follow-up to the lead who downloaded our whitepaper",
        "which deals in the pipeline are likely to close this month",
        "draft a proposal for a three-year enterprise agreement with Globex",
        "how can I convince a prospect who is comparing us with a competitor",
        "log my call with the buyer at Initech in Salesforce",
        "write an upsell email to customers on the basic plan",
        "what's my progress against quota this quarter",
        "prepare for a negotiation with procurement on the renewal price",
    ],
}
HELD_OUT = {
    "it-admin": [
        "my computer is really slow since the last Windows update",
        "I can't open the HR portal, it gives me a certificate error",
        "please create a distribution list for the design team",
        "Teams won't let me share my screen",
        "how do I connect to the office network from home",
    ],
    "marketing": [
        "write a product description for our new running shoes for the website",
        "we need a catchy slogan for the trade show booth",
        "what should our brand voice guidelines say",
        "draft a tweet thread about our sustainability report",
        "propose a referral campaign to grow signups",
    ],
    "secretary": [
        "set up a recurring one-on-one with Priya every other Monday",
        "what time is my flight to Madrid on Thursday",
        "order flowers for Sarah's birthday and put it in my calendar",
        "reply to Tom that I can't make it to the offsite",
        "block two hours tomorrow morning for focus time",
    ],
    "sales": [
        "how much should we charge a hospital chain for 300 licences",
        "summarize where we stand with the Umbrella Corp opportunity",
        "write a LinkedIn message to reconnect with a former customer who might buy again",
        "the buyer says the competitor is 30% cheaper, what do I say",
        "draft terms for a pilot that converts to an annual subscription",
    ],
}
FRESH = {
    "it-admin": [
        "the Wi-Fi password for guests isn't working",
        "my phone stopped syncing my work email",
        "can you unlock my account, I typed the wrong password too many times",
        "I need Photoshop on my work machine",
        "the coffee machine app asks me to sign in with SSO and fails",
        "my external hard drive isn't showing up on my Mac",
        "we got a suspicious email asking for bank details, is it a scam",
        "please remove Jake's access, he left the company yesterday",
        "the shared printer is jammed and shows error 53",
        "my headphones don't work in Google Meet",
    ],
    "marketing": [
        "write a short Instagram caption for our new coffee blend",
        "give me five blog post ideas about remote work",
        "how can we increase traffic to our website",
        "draft an announcement of our Series A for our followers",
        "write an email to our subscribers about the Black Friday sale",
        "create a persona for our target customer in healthcare",
        "make this product description more exciting",
        "outline a YouTube video script introducing our app",
        "which of these two ad headlines is better and why",
        "plan the launch event for our new mobile app",
    ],
    "secretary": [
        "put a reminder in my calendar for Mom's birthday",
        "set up a call with the London office for Thursday afternoon their time",
        "draft an out-of-office reply for my vacation next week",
        "what meetings do I have on Monday",
        "book me a hotel near the venue for the Lisbon summit",
        "send a note to the team that the all-hands is moved to 4pm",
        "please prepare my travel expense summary for the Munich trip",
        "arrange a dinner reservation for six people on Saturday",
        "write a short thank-you email to the speaker after today's session",
        "push my 1:1 with Omar to next week",
    ],
    "sales": [
        "give me a price for 200 user licenses with volume discount",
        "write a follow-up for the customer who hasn't replied to our proposal",
        "what are our top five deals by value this quarter",
        "help me prepare for a discovery call with a fintech startup",
        "the customer wants to cancel their contract, how do I save the account",
        "create a one-pager comparing our plans for a prospect",
        "write a cold email to a CTO at a logistics company",
        "what should I ask to qualify this lead",
        "how do I respond to a request for proposal from a government agency",
        "draft a renewal offer for a client whose contract ends next month",
    ],
}
OFF_TOPIC = [
    "what is the capital of Australia",
    "explain quantum entanglement in simple terms",
    "solve 3x + 5 = 20",
    "what's a good recipe for banana bread",
    "who won the football world cup in 2010",
    "write a python function that reverses a linked list",
    "tell me a joke about penguins",
]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    # The folder test_embedder.py and test_tasks.py use too: the model is exported once per session.
    return get_embedder(cache_dir=tmp_path_factory.getbasetemp() / "tm-models")


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(EXAMPLE_CONFIG)


@pytest.fixture(scope="module")
def dispatcher(config: Config, embedder: Embedder) -> Dispatcher:
    return Dispatcher.from_config(config, embedder.embed)


def example() -> dict:
    return yaml.safe_load(EXAMPLE_CONFIG.read_text())


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("prompt,agent", [
    ("my laptop can't connect to the VPN", "it-admin"),
    ("draft a LinkedIn post announcing our launch", "marketing"),
    ("schedule a meeting with Anna next Tuesday", "secretary"),
    ("prepare a quote for 50 seats for Acme", "sales"),
])
def test_realistic_requests_go_to_their_agent(dispatcher: Dispatcher, prompt: str, agent: str):
    decision = dispatcher.classify(prompt)
    assert decision.agent == agent and decision.confident
    assert decision.confidence >= dispatcher.min_confidence
    assert decision.reason.startswith(f"{agent}: ")
    assert set(decision.scores) == {"it-admin", "marketing", "secretary", "sales"}
    assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-3)
    assert max(decision.scores, key=decision.scores.get) == agent


def test_accuracy_on_requests_that_are_not_intents(dispatcher: Dispatcher, embedder: Embedder):
    results = {}
    for name, prompts in (("tuned", TUNED), ("held-out", HELD_OUT), ("fresh", FRESH)):
        texts = [p for ps in prompts.values() for p in ps]
        truth = [a for a, ps in prompts.items() for _ in ps]
        got = [dispatcher.classify(p, v).agent for p, v in zip(texts, embedder.embed(texts), strict=True)]
        right = sum(g == t for g, t in zip(got, truth, strict=True))
        wrong = sum(g not in (t, None) for g, t in zip(got, truth, strict=True))
        results[name] = (right, wrong, len(texts))
        print(f"{name}: {right}/{len(texts)} right, {wrong} wrong, {len(texts) - right - wrong} unsure")
    # Measured: tuned 40/40, held-out 17/20 (2 wrong), fresh 38/40 (1 wrong, 1 unsure).
    assert results["tuned"][0] >= 38
    assert results["held-out"][0] >= 16
    assert results["fresh"][0] >= 36
    assert sum(r for r, _, _ in results.values()) >= 90
    assert sum(w for _, w, _ in results.values()) <= 5


def test_off_topic_requests_are_unsure(config: Config, dispatcher: Dispatcher, embedder: Embedder):
    vectors = embedder.embed(OFF_TOPIC)
    for prompt, vec in zip(OFF_TOPIC, vectors, strict=True):
        decision = dispatcher.classify(prompt, vec)
        assert decision.agent is None and not decision.confident, (prompt, decision)
        assert decision.confidence < config.dispatch.min_confidence
        assert decision.reason.startswith("unsure (best guess ") and decision.reason.endswith(": no agent")
    # With a fallback agent the unsure requests go there, still marked as unsure.
    with_fallback = Dispatcher.from_config(
        config.model_copy(update={"dispatch": config.dispatch.model_copy(update={"fallback_agent": "secretary"})}),
        embedder.embed)
    decision = with_fallback.classify(OFF_TOPIC[0], vectors[0])
    assert decision.agent == "secretary" and not decision.confident
    assert decision.reason.endswith(": the fallback agent secretary")
    assert with_fallback.classify("schedule a demo with the prospect's buyer").agent == "sales"


def test_confidence_orders_clear_vague_mixed_and_off_topic(dispatcher: Dispatcher):
    clear = dispatcher.classify("my laptop can't connect to the VPN and the wifi keeps dropping")
    plain = dispatcher.classify("I need a new keyboard, mine has broken keys")
    mixed = dispatcher.classify("schedule a call with the prospect to discuss pricing")
    off = dispatcher.classify("what is the capital of Australia")
    assert clear.agent == plain.agent == "it-admin" and mixed.agent == "sales"
    assert clear.confidence > plain.confidence > off.confidence
    assert clear.confidence > mixed.confidence > off.confidence
    # In a mixed request the other agent keeps a real share of the vote.
    assert mixed.scores["secretary"] > 0.1


def test_keywords_add_evidence(dispatcher: Dispatcher):
    found = dispatcher.keywords_in("Log in fails on my LAPTOPS; IT support? leading leads, two-factor, wi-fi")
    assert found == {"it-admin": ["it support", "laptop", "log in", "two-factor", "wi-fi"], "sales": ["lead"]}
    assert dispatcher.keywords_in("misleading clientele") == {}
    # A keyword lifts its agent: the same vague request with a neutral word, one keyword, two.
    without = dispatcher.classify("can you look at the document for Globex")
    one = dispatcher.classify("can you look at the quote for Globex")
    two = dispatcher.classify("can you look at the quote and the discount for Globex")
    assert without.agent is None and without.scores["sales"] < 0.1
    assert max(one.scores, key=one.scores.get) == "sales" and one.scores["sales"] > without.scores["sales"] + 0.3
    assert two.agent == "sales" and two.confidence > one.confidence > without.confidence


def test_a_given_vector_saves_the_embedding(config: Config, embedder: Embedder):
    calls = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return embedder.embed(texts)

    d = Dispatcher.from_config(config, embed)
    assert calls == [sum(len(a.intents) for a in config.agents.values())]  # the intents, once
    prompt = "book a train to Paris for Wednesday morning"
    by_vector = d.classify(prompt, embedder.embed([prompt])[0])
    assert calls == [calls[0]]
    assert d.classify(prompt) == by_vector and calls[1:] == [1]


def test_without_intents_nothing_is_embedded_and_keywords_decide():
    def no_embedding(texts: list[str]) -> np.ndarray:
        raise AssertionError("embedded without intents")

    agents = {"sales": AgentConfig(keywords=["quote", "discount"]), "unknown": AgentConfig(keywords=["printer"]),
              "plain": AgentConfig()}
    d = Dispatcher(agents, no_embedding, fallback_agent="plain")
    decision = d.classify("a quote with a discount, please")
    assert decision.agent == "sales" and decision.confidence == pytest.approx(0.75)
    assert d.classify("the printer is jammed").agent == "unknown"  # any name, even the loop's "unknown"
    unsure = d.classify("hello there")
    assert unsure.agent == "plain" and not unsure.confident and "no intent or keyword" in unsure.reason
    assert Dispatcher({}, no_embedding).classify("anything").agent is None
    assert d.classify("   ").agent == "plain"


def test_ties_and_agent_order_do_not_change_decisions(config: Config, embedder: Embedder):
    reordered = dict(reversed(list(config.agents.items())))
    a = Dispatcher.from_config(config, embedder.embed)
    b = Dispatcher(reordered, embedder.embed, min_confidence=config.dispatch.min_confidence)
    for prompt in ("a meeting about the campaign budget", "install the CRM on my laptop"):
        assert a.classify(prompt) == b.classify(prompt)


def test_a_long_prompt_is_classified_by_its_ends(dispatcher: Dispatcher):
    # Timing is measured in bench/dispatch.py, not here.
    long = "Please review this contract before the renewal call with the customer.\n" + "lorem ipsum dolor " * 2000
    assert dispatcher.classify(long).agent == "sales"


# ---------------------------------------------------------------- the header


def test_resolve_agent(config: Config):
    assert resolve_agent(None, config) == (None, False)
    assert resolve_agent("  ", config) == (None, False)
    assert resolve_agent("dispatcher", config) == (None, True)
    assert resolve_agent(" Dispatcher ", config) == (None, True)
    assert resolve_agent("sales", config) == ("sales", False)
    # Not a configured agent: still the agent of the request (logged), without settings.
    assert resolve_agent("my-bot", config) == ("my-bot", False)
    renamed = parse_config({**example(), "dispatch": {"name": "router"}})
    assert resolve_agent("router", renamed) == (None, True)
    assert resolve_agent("dispatcher", renamed) == ("dispatcher", False)


# ---------------------------------------------------------------- configuration


def test_the_example_configures_four_agents_and_the_dispatcher(config: Config):
    assert set(config.agents) == {"it-admin", "marketing", "secretary", "sales"}
    for name, agent in config.agents.items():
        assert agent.description and len(agent.intents) >= 5 and agent.keywords and agent.system, name
    assert config.dispatch.name == "dispatcher" and config.dispatch.fallback_agent is None
    assert config.dispatch.min_confidence == 0.35
    bare = parse_config({k: v for k, v in example().items() if k not in ("agents", "dispatch")})
    assert bare.agents == {} and bare.dispatch.name == "dispatcher"


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["agents"].update(dispatcher={"model": "llama3.2"}),
     "agents.dispatcher: 'dispatcher' is the dispatcher's name (dispatch.name)"),
    (lambda d: d["agents"].update(Dispatcher={}), "agents.Dispatcher: 'Dispatcher' is the dispatcher's name"),
    (lambda d: d["dispatch"].update(name="sales"), "agents.sales: 'sales' is the dispatcher's name"),
    (lambda d: d["dispatch"].update(fallback_agent="hr"),
     "dispatch.fallback_agent: 'hr' is not one of the agents (it-admin, marketing, sales, secretary)"),
    (lambda d: d["dispatch"].update(min_confidence=1.5),
     "dispatch.min_confidence: Input should be less than or equal to 1"),
    (lambda d: d["dispatch"].update(name=""), "dispatch.name: String should have at least 1 character"),
    (lambda d: d["dispatch"].update(threshold=0.5), "dispatch.threshold: unknown key"),
    (lambda d: d["agents"]["sales"].update(intent=["x"]), "agents.sales.intent: unknown key"),
    (lambda d: d["agents"]["sales"]["intents"].append("  "), "agents.sales.intents.10: must not be empty"),
    (lambda d: d["agents"]["sales"].update(keywords="quote"), "agents.sales.keywords: Input should be a valid list"),
    (lambda d: d["agents"]["sales"].update(model="gpt-9"), "agents.sales.model: 'gpt-9' is not one of the models"),
    (lambda d: d["agents"]["sales"]["params"].update(tempreature=0.3),
     "agents.sales.params.tempreature: not a parameter an agent may set (one of: temperature, top_p"),
    (lambda d: d["agents"]["sales"]["params"].update(temperature="warm"),
     "agents.sales.params.temperature: must be a number from 0 to 2, not 'warm'"),
    (lambda d: d["agents"]["sales"]["params"].update(max_tokens=0),
     "agents.sales.params.max_tokens: must be a positive integer, not 0"),
    (lambda d: d["agents"].update({"big bot ": {}}), "agents.big bot : 'big bot ' is what requests send in x-tm-agent"),
])
def test_a_bad_agent_or_dispatch_setting_names_its_key(mutate, expected):
    data = example()
    data.setdefault("dispatch", {})
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data, "tm.yaml")
    assert expected in str(e.value)


def test_the_fallback_agent_must_be_known_to_the_dispatcher_too(config: Config):
    with pytest.raises(ValueError, match="fallback_agent 'hr' is not one of the agents"):
        Dispatcher(config.agents, lambda texts: np.zeros((len(texts), 384)), fallback_agent="hr")


# ---------------------------------------------------------------- answering as the agent

AGENT = AgentConfig(system="You are the sales assistant.",
                    params={"temperature": 0.5, "max_tokens": 800, "stop": "END", "top_k": 40, "seed": 7})


def test_apply_agent_openai_puts_the_agent_system_first_and_fills_params():
    body = {"model": "auto", "messages": [{"role": "user", "content": "quote 50 seats"}]}
    before = copy.deepcopy(body)
    out = apply_agent(body, "openai", AGENT)
    assert body == before  # the client's body is left as it was
    assert out["messages"] == [{"role": "system", "content": "You are the sales assistant."},
                               {"role": "user", "content": "quote 50 seats"}]
    assert out["temperature"] == 0.5 and out["max_tokens"] == 800 and out["stop"] == "END" and out["seed"] == 7
    assert "top_k" not in out  # not an OpenAI parameter
    check_openai_request(out)

    # The client's own system message follows the agent's, in the same (first) message.
    body = {"model": "auto", "temperature": 0.0, "max_completion_tokens": 50, "stop": None,
            "messages": [{"role": "system", "content": "Answer in French."},
                         {"role": "user", "content": "quote 50 seats"}]}
    out = apply_agent(body, "openai", AGENT)
    assert out["messages"][0] == {"role": "system", "content": "You are the sales assistant.\n\nAnswer in French."}
    assert len(out["messages"]) == 2
    # The client's settings win: its temperature (even 0), its max_completion_tokens; None is unset.
    assert out["temperature"] == 0.0 and "max_tokens" not in out and out["stop"] == "END"
    check_openai_request(out)

    parts = {"model": "auto", "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    out = apply_agent(parts, "openai", AGENT)
    assert out["messages"][0]["content"] == [{"type": "text", "text": "You are the sales assistant."},
                                             {"type": "text", "text": "Be brief."}]
    check_openai_request(out)

    developer = {"model": "auto", "messages": [{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": "hi"}]}
    out = apply_agent(developer, "openai", AGENT)
    assert [m["role"] for m in out["messages"]] == ["system", "developer", "user"]
    check_openai_request(out)


def test_apply_agent_anthropic_uses_the_system_field():
    body = {"model": "auto", "max_tokens": 100, "messages": [{"role": "user", "content": "quote 50 seats"}]}
    before = copy.deepcopy(body)
    out = apply_agent(body, "anthropic", AGENT)
    assert body == before
    assert out["system"] == "You are the sales assistant."
    assert out["max_tokens"] == 100  # the client's
    assert out["temperature"] == 0.5 and out["top_k"] == 40 and out["stop_sequences"] == ["END"]
    assert "seed" not in out and "stop" not in out  # not Anthropic parameters
    check_anthropic_request(out)

    out = apply_agent({**body, "system": "Answer in French."}, "anthropic", AGENT)
    assert out["system"] == "You are the sales assistant.\n\nAnswer in French."
    check_anthropic_request(out)

    blocks = [{"type": "text", "text": "Long shared context.", "cache_control": {"type": "ephemeral"}}]
    out = apply_agent({**body, "system": blocks, "top_p": 0.9, "stop_sequences": ["STOP"]}, "anthropic", AGENT)
    assert out["system"] == [{"type": "text", "text": "You are the sales assistant."}, *blocks]
    # The client chose top_p: recent Claude models refuse temperature with it, so none is added.
    assert "temperature" not in out and out["top_p"] == 0.9 and out["stop_sequences"] == ["STOP"]
    check_anthropic_request(out)

    thinking = {**body, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2000}}
    out = apply_agent(thinking, "anthropic", AGENT)
    assert "temperature" not in out and "top_k" not in out and out["stop_sequences"] == ["END"]
    check_anthropic_request(out)

    # Of the agent's own temperature and top_p only the first is sent to Anthropic.
    both = AgentConfig(params={"top_p": 0.8, "temperature": 0.2})
    out = apply_agent(body, "anthropic", both)
    assert out["top_p"] == 0.8 and "temperature" not in out
    assert apply_agent(body, "openai", both) == {**body, "top_p": 0.8, "temperature": 0.2}


def test_apply_agent_without_settings_changes_nothing_and_knows_its_formats():
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    assert apply_agent(body, "openai", AgentConfig(model="llama3.2")) == body
    assert apply_agent(body, "openai", AgentConfig()) is not body
    with pytest.raises(ValueError, match="unknown request format 'gemini'"):
        apply_agent(body, "gemini", AGENT)


def test_a_decision_is_a_plain_value():
    d = DispatchDecision("sales", 0.9, "sales: keywords: quote", {"sales": 0.9, "secretary": 0.1}, True)
    assert d == DispatchDecision("sales", 0.9, "sales: keywords: quote", {"sales": 0.9, "secretary": 0.1}, True)
    with pytest.raises(AttributeError):
        d.agent = "marketing"  # type: ignore[misc]


# ---------------------------------------------------------------- through the gateway


def test_the_gateway_dispatches_and_answers_as_the_agent(db_url, upstreams, tmp_path):
    """A request addressed to the dispatcher is classified to an agent, logged with it, and answered
    with that agent's model, system prompt and parameters; a request naming an agent goes straight to it."""
    import openai
    import psycopg

    from tests.conftest import make_config, query, start_gateway
    from tm_gateway import keys

    anth, local = upstreams
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    agents = example()["agents"]
    data["agents"] = {
        "it-admin": {**agents["it-admin"], "model": "local-test"},
        "sales": {**agents["sales"], "model": "claude-test", "params": {"temperature": 0.3}},
    }
    config = parse_config(data)
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)

        def ask(prompt: str, agent: str):
            return client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}], extra_headers={"x-tm-agent": agent})

        raw = ask("my laptop can't connect to the VPN", "dispatcher")
        assert raw.headers["x-tm-agent"] == "it-admin" and raw.headers["x-tm-dispatch"].startswith("it-admin;")
        assert raw.headers["x-tm-model"] == "local-test"
        sent = local.requests[-1].body
        assert sent["messages"][0] == {"role": "system", "content": agents["it-admin"]["system"]}

        raw = ask("prepare a quote for 50 seats for Acme", "dispatcher")
        assert raw.headers["x-tm-agent"] == "sales" and raw.headers["x-tm-model"] == "claude-test"
        assert anth.requests[-1].body["temperature"] == 0.3
        assert anth.requests[-1].body["system"].startswith(agents["sales"]["system"][:40])

        raw = ask("what is the capital of Mongolia?", "dispatcher")  # no agent's business
        assert raw.headers["x-tm-dispatch"].startswith("none;") and "x-tm-agent" not in raw.headers
        assert raw.headers["x-tm-model"] == "local-test"  # the default

        raw = ask("what is the capital of Mongolia?", "sales")  # named: straight to it
        assert raw.headers["x-tm-agent"] == "sales" and "x-tm-dispatch" not in raw.headers
        assert raw.headers["x-tm-model"] == "claude-test"

        assert app.state.proxy.request_log.flush()
        rows = query(db_url, "SELECT agent, model, route, route_reason FROM requests ORDER BY ts, id")
        assert [(r["agent"], r["model"]) for r in rows] == [
            ("it-admin", "local-test"), ("sales", "claude-test"), ("dispatcher", "local-test"),
            ("sales", "claude-test")]
        assert rows[0]["route"] == "agent:it-admin" and rows[0]["route_reason"].startswith("dispatched to it-admin")
    finally:
        served.stop()
