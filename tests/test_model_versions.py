"""The human-gated fine-tune, the whole path for real: logged requests -> finetune_jobs -> a manual
model_versions run (export, mlx-lm LoRA on a tiny model built here, evaluation against the base,
registration, an mlx_lm.server deployment) -> the gateway serves the version -> decision rule 6 swaps
routing to it only when it won -> a rollback takes it back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import openai
import psycopg
import pytest
import yaml

from tests import tiny_model as tiny
from tests.conftest import make_config, query, start_gateway
from tests.fakes import FakeUpstream
from tests.support import log_traffic, materialize
from tests.traffic import an_hour_of_traffic, coding_prompt, good_answer, past_hour
from tm_assets.assets import routing_rules
from tm_assets.model_versions import fine_tuned_model_beats_base, finetune_data_valid, model_versions
from tm_assets.resources import EmbedderResource, PostgresResource, PostHogResource, TokenMachineConfig
from tm_gateway import keys
from tm_resources.registry import rollback_version

pytestmark = pytest.mark.slow  # MLX: trains, evaluates and serves a fine-tuned model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run_model_versions(db_url: str, config_path: Path, **run) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [model_versions, finetune_data_valid, fine_tuned_model_beats_base],
        resources={"postgres": PostgresResource(url=db_url), "tm_config": TokenMachineConfig(path=str(config_path)),
                   "embedder": EmbedderResource()},
        run_config={"ops": {"model_versions": {"config": run}}},
        raise_on_error=False,
    )


def test_fine_tune_register_deploy_swap_and_roll_back(db_url, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    hour = past_hour(2)
    log_traffic(db_url, tmp_path, an_hour_of_traffic(hour, coding=60, math=10))
    with FakeUpstream(responder=lambda f, b: good_answer(b["messages"][-1]["content"])) as local:
        config = make_config("http://127.0.0.1:9", local.openai_url, loop={"thresholds": {"swap_min_margin": 0.001}})
        config_path = tmp_path / "tm.yaml"
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        assert materialize(db_url, config_path, hour).success
        [job] = query(db_url, "SELECT * FROM finetune_jobs")
        assert job["job_id"] == "ft:coding:local-test" and job["samples"] >= 50

        # The default is a dry run: data exported and checked, nothing trained, so no weights needed.
        dry = run_model_versions(db_url, config_path, approver="ops")
        assert dry.success
        [v] = query(db_url, "SELECT * FROM model_versions")
        assert v["status"] == "dry_run" and v["adapter_path"] is None and v["approver"] == "ops"
        assert v["base_path"] is None
        assert v["train_examples"] > 0 and v["test_examples"] > 0
        assert {e.check_name: e.passed for e in dry.get_asset_check_evaluations()}["finetune_data_valid"]
        assert run_model_versions(db_url, config_path, approver="  ").success is False
        # Training does need them, and says where to set them.
        no_weights = run_model_versions(db_url, config_path, approver="ops", dry_run=False)
        assert no_weights.success is False
        [failure] = [e for e in no_weights.all_events if e.is_step_failure]
        assert "no local weights to fine-tune" in str(failure.step_failure_data.error)

        # A run that cannot learn anything loses: kept, marked lost, routing untouched.
        lost = run_model_versions(db_url, config_path, approver="ops", dry_run=False, deploy=False,
                                  base_model_path=str(tiny_model), iters=1, learning_rate=1e-9, rank=4,
                                  num_layers=-1)
        assert lost.success
        checks = {e.check_name: e for e in lost.get_asset_check_evaluations()}
        assert checks["fine_tuned_model_beats_base"].passed is False
        assert checks["fine_tuned_model_beats_base"].severity == dg.AssetCheckSeverity.WARN
        [loser] = query(db_url, "SELECT * FROM model_versions WHERE status = 'lost'")
        dg.materialize([routing_rules], resources={
            "postgres": PostgresResource(url=db_url), "tm_config": TokenMachineConfig(path=str(config_path)),
            "posthog": PostHogResource()},
            partition_key=hour.strftime("%Y-%m-%d-%H:%M"))
        assert query(db_url, "SELECT * FROM routing_rules WHERE action = 'swap_model'") == []

        # A real run wins, is deployed with mlx_lm.server and registered under its version's name.
        won = run_model_versions(db_url, config_path, approver="ops", dry_run=False,
                                 base_model_path=str(tiny_model), iters=30, learning_rate=1e-3, rank=4,
                                 num_layers=-1)
        assert won.success
        [winner] = query(db_url, "SELECT * FROM model_versions WHERE status = 'won'")
        try:
            assert winner["adapter_loss"] < winner["base_loss"]
            assert winner["eval_score"] > winner["base_eval_score"]
            assert {e.check_name: e.passed for e in won.get_asset_check_evaluations()}["fine_tuned_model_beats_base"]
            name = winner["version"]

            with psycopg.connect(db_url) as conn:
                key, _ = keys.create_key(conn, "ann")
            app, served = start_gateway(config, db_url, tmp_path)
            try:
                client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
                direct = client.chat.completions.with_raw_response.create(
                    model=name, max_tokens=8, messages=[{"role": "user", "content": coding_prompt(3)}])
                assert direct.headers["x-tm-model"] == name and direct.headers["x-tm-provider"] == f"registry:{name}"
                assert direct.parse().usage.completion_tokens > 0

                # Decision rule 6: the next routing_rules run swaps coding traffic to the winner.
                dg.materialize([routing_rules], resources={
                    "postgres": PostgresResource(url=db_url), "tm_config": TokenMachineConfig(path=str(config_path)),
                    "posthog": PostHogResource()},
                    partition_key=hour.strftime("%Y-%m-%d-%H:%M"))
                [swap] = query(db_url, "SELECT * FROM routing_rules WHERE action = 'swap_model'")
                assert swap["target_model"] == name and swap["model"] == "local-test"
                assert loser["version"] not in str(swap)
                deadline = time.monotonic() + 10
                while "coding" not in str(app.state.proxy.shared.rules.swaps) and time.monotonic() < deadline:
                    time.sleep(0.05)
                routed = client.chat.completions.with_raw_response.create(
                    model="auto", max_tokens=8, messages=[{"role": "user", "content": coding_prompt(5)}])
                assert routed.headers["x-tm-model"] == name
                assert routed.headers["x-tm-route"] == f"rule:{swap['rule_id']}"

                # Rolled back: the gateway stops serving it at once; auto traffic goes back to the base.
                with psycopg.connect(db_url) as conn:
                    assert rollback_version(conn, name)
                    conn.commit()
                deadline = time.monotonic() + 10
                while app.state.proxy.shared.registry and time.monotonic() < deadline:
                    time.sleep(0.05)
                back = client.chat.completions.with_raw_response.create(
                    model="auto", max_tokens=8, messages=[{"role": "user", "content": coding_prompt(6)}])
                assert back.headers["x-tm-model"] == "local-test"
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
            finally:
                served.stop()
        finally:
            for pid in {r["server_pid"] for r in query(db_url, "SELECT server_pid FROM model_versions")} - {None}:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
