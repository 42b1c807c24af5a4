"""Capability scores: seeded from tm.yaml, scaled by a local model's quantization, learned from the loop's
patterns and the request log's speeds, and shown by `tm providers`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.conftest import make_config
from tests.ops_support import write_ops_config
from tm_gateway.cli import main
from tm_resources.capabilities import Evidence, context_score, model_scores, quantization_of
from tm_resources.config import ConfigError, parse_config

FACTORS = {"Q8_0": 0.99, "Q6_K": 0.97, "Q5_K_M": 0.95, "Q4_K_M": 0.92, "Q3_K_M": 0.85, "Q4_K": 0.9}


@pytest.mark.parametrize("name, tag", [
    ("qwen2.5-coder:7b-instruct-q4_K_M", "Q4_K_M"),        # not Q4_K: the longer tag wins
    ("llama3.1:8b-instruct-q4_K", "Q4_K"),
    ("/models/Mistral-7B-Instruct-v0.3-Q6_K.gguf", "Q6_K"),
    ("llama3.2:3b-q8_0", "Q8_0"),
    ("llama3.2:latest", None),
    ("claude-q3_k_max", None),                             # a tag must stand alone in the name
])
def test_quantization_is_read_from_the_tag(name, tag):
    found, factor = quantization_of(name, FACTORS)
    assert found == tag and factor == (FACTORS[tag] if tag else 1.0)


def _config(**models):
    base = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1")
    data = base.model_dump(mode="json", exclude_none=True)
    data["models"].update(models)
    return parse_config(data)


def test_seeds_are_scaled_by_quantization_and_evidence_takes_over():
    config = _config(**{
        "coder-q4": {"provider": "local", "upstream": "qwen2.5-coder:7b-instruct-q4_K_M", "tier": "local",
                     "capabilities": {"coding": 0.8, "reasoning": 0.5}},
        "llama-latest": {"provider": "local", "upstream": "llama3.2:latest", "tier": "local",
                         "capabilities": {"coding": 0.6, "quantization": "Q3_K_M"}},
        "frontier": {"provider": "anthropic", "tier": "included", "context_window": 200000,
                     "capabilities": {"coding": 0.9, "speed": 0.4}},
    })
    evidence = Evidence(quality={("coder-q4", "coding"): (30, 0.7), ("local-test", "math"): (4, 0.5),
                                 ("local-test", "reasoning"): (6, 0.75)},
                        speed={"local-test": (50, 40.0), "frontier": (10, 120.0)})
    scores = {s.model: s for s in model_scores(config, evidence)}

    q4 = scores["coder-q4"]
    assert (q4.quantization, q4.quantization_factor) == ("Q4_K_M", 0.92)
    # 30 answers of evidence against a seed worth 10: (30 * 0.7 + 10 * 0.8 * 0.92) / 40
    assert q4.scores["coding"].value == pytest.approx((30 * 0.7 + 10 * 0.8 * 0.92) / 40)
    assert q4.scores["coding"].source == "learned+seeded" and q4.scores["coding"].samples == 30
    assert q4.scores["reasoning"].value == pytest.approx(0.5 * 0.92) and q4.scores["reasoning"].source == "seeded"
    assert q4.scores["creative"].value is None and q4.scores["creative"].source == "none"

    # the name says nothing; the config's tag does
    assert scores["llama-latest"].value("coding") == pytest.approx(0.6 * 0.85)
    # a frontier model is not quantized; its context comes from its window, its speed from the log and the seed
    frontier = scores["frontier"]
    assert frontier.quantization is None and frontier.value("coding") == 0.9
    assert frontier.value("context") == pytest.approx(context_score(200000)) and frontier.value("context") > 0.6
    assert frontier.value("speed") == pytest.approx((10 * 120 / 160 + 10 * 0.4) / 20)
    # no seed: the evidence alone, math and reasoning pooled by their samples
    local = scores["local-test"]
    assert local.value("reasoning") == pytest.approx((4 * 0.5 + 6 * 0.75) / 10) and local.scores["reasoning"].samples == 10
    assert local.value("speed") == pytest.approx(0.5)  # 40 tokens/s is optimize.capabilities.speed_half_tps


def test_bad_capability_config_is_refused():
    with pytest.raises(ConfigError, match="models.x.capabilities.coding"):
        _config(x={"provider": "local", "capabilities": {"coding": 1.5}})
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json", exclude_none=True)
    data["optimize"] = {"capabilities": {"quantization": {"Q4_K_M": 1.3}}}
    with pytest.raises(ConfigError, match="quantization factor"):
        parse_config(data)


def test_tm_providers_shows_learned_and_seeded_scores(db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1",
                         models={"claude-test": {"provider": "anthropic", "tier": "included",
                                                 "capabilities": {"coding": 0.9, "creative": 0.85}}})
    path = write_ops_config(tmp_path / "tm.yaml", config)
    now = datetime.now(UTC)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO patterns (hour, scope, task_type, model, tier, requests, samples, avg_quality,"
                     " total_cost_usd, input_tokens, output_tokens, escalations, escalated_away) VALUES"
                     " (%s, 'type_model', 'coding', 'local-test', 'local', 12, 12, 0.66, 0, 0, 0, 0, 0)",
                     (now.replace(minute=0, second=0, microsecond=0),))
        for i in range(3):
            conn.execute("INSERT INTO requests (id, ts, user_id, api_format, endpoint, model, output_tokens,"
                         " latency_ms, status) VALUES (gen_random_uuid(), %s, 'u', 'openai', '/v1/chat/completions',"
                         " 'local-test', 200, 2500, 200)", (now - timedelta(minutes=i),))
    assert main(["providers", "--config", path, "--json"]) == 0
    report = {p["provider"]: p for p in json.loads(capsys.readouterr().out)}
    assert set(report) == {"anthropic", "local"}
    [local] = report["local"]["models"]
    assert local["scores"]["coding"] == {"value": 0.66, "source": "learned", "samples": 12}
    assert local["scores"]["speed"] == {"value": round(80 / 120, 3), "source": "learned", "samples": 3}  # 80 tok/s
    assert local["price"] == {"input": 0.1, "output": 0.2} and local["tier"] == "local"
    [claude] = report["anthropic"]["models"]
    assert claude["scores"]["coding"] == {"value": 0.9, "source": "seeded", "samples": 0}

    assert main(["providers", "--config", path]) == 0
    table = capsys.readouterr().out
    assert "0.66*" in table and "0.90" in table and "learned from the loop" in table
