"""tm detect-local against fake Ollama, LM Studio, vLLM, llama.cpp and mlx_lm.server servers on loopback: each
told apart by what it answers, its models listed, the tm.yaml lines printed and written."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from tests.fakes import free_port
from tests.fakes.local_servers import fake_llamacpp, fake_lmstudio, fake_mlx, fake_ollama, fake_vllm
from tm_gateway.cli import main
from tm_resources.config import load_config

CONFIG = """\
# our team's gateway
providers:
  anthropic:
    kind: anthropic
    base_url: https://api.anthropic.com
    api_key_env: [ANTHROPIC_API_KEY]   # the frontier
models:
  claude-sonnet-5-5:
    provider: anthropic
    tier: included
defaults:
  model: claude-sonnet-5-5
"""


@pytest.fixture
def servers():
    with ExitStack() as stack:
        yield {kind: stack.enter_context(make()) for kind, make in
               [("ollama", fake_ollama), ("lmstudio", fake_lmstudio), ("vllm", fake_vllm),
                ("llamacpp", fake_llamacpp), ("mlx", fake_mlx)]}


def detect(capsys, config, ports, *extra) -> dict:
    assert main(["detect-local", "--config", str(config), "--hosts", "127.0.0.1",
                 "--ports", ",".join(str(p) for p in ports), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_server_is_told_apart_and_its_models_listed(servers, tmp_path, capsys):
    config = tmp_path / "tm.yaml"
    config.write_text(CONFIG)
    nothing = free_port()
    report = detect(capsys, config, [s.port for s in servers.values()] + [nothing])
    by_port = {s["port"]: s for s in report["servers"]}
    assert nothing not in by_port
    assert {kind: by_port[s.port]["kind"] for kind, s in servers.items()} == {k: k for k in servers}

    ollama = by_port[servers["ollama"].port]
    assert ollama["version"] == "0.5.7"
    assert [(m["upstream"], m["context_window"], m["quantization"]) for m in ollama["models"]] == [
        ("llama3.2:latest", 131072, "Q4_K_M"), ("qwen2.5-coder:7b-instruct-q5_K_M", 131072, "Q5_K_M")]
    # LM Studio's embedding model is not a chat model
    assert [m["upstream"] for m in by_port[servers["lmstudio"].port]["models"]] == ["qwen2.5-7b-instruct"]
    assert by_port[servers["vllm"].port]["models"] == [
        {"upstream": "meta-llama/Llama-3.1-8B-Instruct", "context_window": 16384, "quantization": None}]
    assert by_port[servers["llamacpp"].port]["models"][0]["context_window"] == 8192
    assert by_port[servers["mlx"].port]["models"][0]["upstream"] == "mlx-community/Llama-3.2-3B-Instruct-4bit"

    added = report["add"]
    assert added["providers"]["ollama"] == {"kind": "openai", "base_url": f"http://127.0.0.1:{servers['ollama'].port}/v1"}
    assert added["models"]["llama3.2"] == {"provider": "ollama", "upstream": "llama3.2:latest", "tier": "local",
                                           "context_window": 131072, "capabilities": {"quantization": "Q4_K_M"}}
    # the name already says q5_K_M: nothing to record
    assert "capabilities" not in added["models"]["qwen2.5-coder:7b-instruct-q5_K_M"]
    assert added["models"]["Mistral-7B-Instruct-v0.3-Q6_K"]["upstream"] == "/models/Mistral-7B-Instruct-v0.3-Q6_K.gguf"
    assert "providers:\n  ollama:" in report["yaml"] and report["written"] is None
    assert config.read_text() == CONFIG  # printed, not written

    assert main(["detect-local", "--config", str(config), "--hosts", "127.0.0.1", "--ports",
                 str(servers["llamacpp"].port)]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp server" in out and "add to tm.yaml" in out


def test_write_adds_the_lines_and_keeps_the_file(servers, tmp_path, capsys):
    config = tmp_path / "tm.yaml"
    config.write_text(CONFIG)
    ports = [servers["ollama"].port, servers["mlx"].port]
    report = detect(capsys, config, ports, "--write")
    assert report["written"] == str(config)
    text = config.read_text()
    assert text.startswith(CONFIG.split("models:")[0])  # the comments and the layout are kept
    assert "api_key_env: [ANTHROPIC_API_KEY]   # the frontier" in text
    loaded = load_config(config)
    assert loaded.models["llama3.2"].provider == "ollama" and loaded.models["llama3.2"].context_window == 131072
    assert loaded.models["llama3.2"].capabilities.quantization == "Q4_K_M"
    assert loaded.models["Llama-3.2-3B-Instruct-4bit"].provider == "mlx"
    assert loaded.providers["mlx"].base_url == f"http://127.0.0.1:{servers['mlx'].port}/v1"

    # once written, a second run finds nothing to add
    again = detect(capsys, config, ports)
    assert again["add"] == {"providers": {}, "models": {}} and again["yaml"] == ""
    assert main(["detect-local", "--config", str(config), "--hosts", "127.0.0.1", "--ports",
                 ",".join(map(str, ports))]) == 0
    assert "tm.yaml already serves all of them" in capsys.readouterr().out


def test_mlx_without_a_model_cache_is_still_found(tmp_path, capsys):
    config = tmp_path / "tm.yaml"
    config.write_text(CONFIG)
    with fake_mlx(with_cache=False) as mlx:
        report = detect(capsys, config, [mlx.port])
    [server] = report["servers"]
    assert server["kind"] == "mlx" and [m["upstream"] for m in server["models"]] == ["default_model"]


def test_nothing_found_and_bad_ports(tmp_path, capsys):
    config = tmp_path / "tm.yaml"
    config.write_text(CONFIG)
    assert main(["detect-local", "--config", str(config), "--ports", str(free_port())]) == 0
    assert "no local model server answers" in capsys.readouterr().out
    assert main(["detect-local", "--config", str(config), "--ports", "11434,abc"]) == 2
    assert "--ports '11434,abc'" in capsys.readouterr().err


def test_write_needs_a_config_file_of_ones_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TM_CONFIG", raising=False)
    with fake_ollama() as ollama:
        # without a tm.yaml the shipped example answers; it is package data, never written to
        assert main(["detect-local", "--ports", str(ollama.port), "--write"]) == 2
    assert "tm init" in capsys.readouterr().err
    assert not (tmp_path / "tm.yaml").exists()
