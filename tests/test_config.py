"""Configuration: the example runs as shipped, and a bad file says which key is wrong and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tm_gateway.cli import main
from tm_resources.config import EXAMPLE_CONFIG, ConfigError, load_config, parse_config


def example() -> dict:
    return yaml.safe_load(EXAMPLE_CONFIG.read_text())


def test_the_shipped_example_is_valid():
    config = load_config(EXAMPLE_CONFIG)
    assert config.defaults.model in config.models
    assert config.models["claude-sonnet-5-5"].price.cost(1_000_000, 1_000_000) == pytest.approx(18.0)
    # The three presets a request may name, none starting with a premium model (open to every user).
    assert sorted(config.presets) == ["tm:balanced", "tm:basic", "tm:complex"]
    assert all(config.models[chain[0]].tier.value != "premium" for chain in config.presets.values())


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["gateway"].update(prot=1), "gateway.prot: unknown key"),
    (lambda d: d["gateway"].update(port="eighty"), "gateway.port: Input should be a valid integer"),
    (lambda d: d["models"]["llama3.2"].update(provider="olama"), "models.llama3.2.provider: 'olama' is not one"),
    (lambda d: d["models"]["llama3.2"].update(tier="gold"), "models.llama3.2.tier: Input should be 'local'"),
    (lambda d: d["models"]["claude-haiku-5-5"]["price"].update(input=-1),
     "models.claude-haiku-5-5.price.input: Input should be greater than or equal to 0"),
    (lambda d: d["providers"]["ollama"].update(kind="grpc"), "providers.ollama.kind: Input should be 'anthropic'"),
    (lambda d: d["defaults"].update(model="nope"), "defaults.model: 'nope' is not one of the models"),
    (lambda d: d.pop("models"), "models: Field required"),
])
def test_a_bad_config_names_the_key_and_the_reason(mutate, expected):
    data = example()
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data, "tm.yaml")
    assert expected in str(e.value)


def test_secrets_come_only_from_the_environment(monkeypatch):
    data = example()
    data["providers"]["anthropic"]["api_key"] = "sk-ant-inline"
    with pytest.raises(ConfigError, match="providers.anthropic.api_key: unknown key"):
        parse_config(data)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    assert parse_config(example()).providers["anthropic"].api_keys() == ["sk-ant-from-env"]


def test_the_command_line_refuses_a_bad_config_with_the_reason(tmp_path: Path, capsys, monkeypatch):
    bad = tmp_path / "tm.yaml"
    bad.write_text("gateway: {port: 99999}\nproviders: {}\nmodels: {}\ndefaults: {model: x}\n")
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    assert main(["gateway", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gateway.port: Input should be less than or equal to 65535" in err
    bad.write_text("gateway: [1, 2\n")
    assert main(["gateway", "--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_aliases_map_names_clients_send_to_what_is_served_here():
    config = load_config(EXAMPLE_CONFIG)
    # Claude Code's own defaults land on presets; a configured name is never aliased.
    assert config.resolve_alias("claude-opus-4-8") == ("tm:complex", "claude-opus-*")
    assert config.resolve_alias("claude-haiku-4-5-20251001") == ("tm:basic", "claude-haiku-*")
    assert config.resolve_alias("claude-fable-5-2") == ("tm:balanced", "claude-*")
    assert config.resolve_alias("claude-sonnet-5-5") == ("claude-sonnet-5-5", None)
    assert config.resolve_alias("gpt-4o") == ("gpt-4o", None)
    data = example()
    data["aliases"] = {"claude-*": "claude-nope"}
    with pytest.raises(ConfigError, match="aliases.claude-\\*: 'claude-nope' is not one of the models or presets"):
        parse_config(data)


def test_the_example_ships_no_model_past_its_end_of_life():
    from anthropic._data import DEPRECATED_MODELS

    config = load_config(EXAMPLE_CONFIG)
    claude = [config.upstream_name(m) for m, c in config.models.items() if c.provider == "anthropic"]
    assert claude and not [m for m in claude if m in DEPRECATED_MODELS]
