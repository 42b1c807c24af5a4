"""The quota commands as an operator runs them: `tm status`, `tm predict`, `tm set-usage`, `tm reset`, `tm mode`,
each as a table for people and as JSON for scripts, with clear errors for unknown providers and bad values."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.conftest import make_config, query
from tests.test_quotas import log_steady
from tm_gateway.cli import main


@pytest.fixture
def tm(db_url, tmp_path, monkeypatch, capsys):
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json")
    data["providers"]["anthropic"]["quota"] = {"type": "tokens", "limit": 1_000_000, "timezone": "Europe/Paris",
                                               "reset": {"every": "weekly", "day": "wednesday", "hour": 7}}
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_CONFIG", str(path))
    log_steady(db_url, "anthropic", datetime.now(UTC), 24, 2000)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_status_as_a_table_and_as_json(tm):
    code, out, _ = tm("status")
    assert code == 0 and "provider" in out and "anthropic" in out and "local" in out
    assert "anthropic: " in out and "% used" in out
    code, out, _ = tm("status", "anthropic", "--json")
    [s] = json.loads(out)
    assert code == 0 and s["provider"] == "anthropic" and s["limit"] == 1_000_000 and s["state"] == "ok"
    assert s["rate_per_h"] == pytest.approx(2000) and s["timezone"] == "Europe/Paris"
    reset = datetime.fromisoformat(s["reset_at"])
    assert reset.astimezone(ZoneInfo("Europe/Paris")).strftime("%A %H:%M") == "Wednesday 07:00"


def test_predict_json_projects_the_next_hours(tm):
    code, out, _ = tm("predict", "--hours", "12", "--json")
    got = {p["provider"]: p for p in json.loads(out)}
    a = got["anthropic"]
    assert code == 0 and a["hours"] == 12 and a["expected_usage"] == pytest.approx(24000, rel=0.01)
    assert a["projected_fraction"]["low"] <= a["projected_fraction"]["expected"] <= a["projected_fraction"]["high"]
    assert got["local"]["projected_fraction"] is None
    code, out, _ = tm("predict")
    assert code == 0 and "in 24 h" in out


def test_set_usage_reset_and_their_errors(tm, db_url):
    code, out, _ = tm("set-usage", "anthropic", "96%", "--json")
    done = json.loads(out)
    assert code == 0 and done["value"] == 0.96 and done["unit"] == "fraction"
    assert done["status"]["state"] == "critical"
    code, out, _ = tm("set-usage", "anthropic", "500k")
    assert code == 0 and "usage set to 500.0k tokens" in out
    code, out, _ = tm("reset", "anthropic", "--json")
    assert code == 0 and json.loads(out)["status"]["used"] == 0
    assert [r["kind"] for r in query(db_url, "SELECT kind FROM quota_adjustments ORDER BY id")] == \
        ["usage", "usage", "reset"]
    code, _, err = tm("set-usage", "antropic", "50%")
    assert code == 2 and "'antropic' is not one of the providers (anthropic, local)" in err
    code, _, err = tm("set-usage", "anthropic", "half")
    assert code == 2 and "'half' is not a usage" in err
    code, _, err = tm("reset", "nobody")
    assert code == 2 and "'nobody' is not one of the providers" in err
    code, _, err = tm("predict", "--hours", "0")
    assert code == 2 and "hours must be from 1" in err


def test_mode_is_stored_and_read_back(tm, db_url):
    code, out, _ = tm("mode", "--json")
    assert code == 0 and json.loads(out) == {"mode": "auto", "source": "tm.yaml loop.mode", "changed": False}
    code, out, _ = tm("mode", "dry-run")
    assert code == 0 and "loop mode: dry-run" in out and "next loop run" in out
    code, out, _ = tm("mode", "--json")
    assert json.loads(out) == {"mode": "dry-run", "source": "tm mode", "changed": False}
    assert query(db_url, "SELECT value FROM tm_settings WHERE name = 'loop.mode'") == [{"value": "dry-run"}]
    with pytest.raises(SystemExit):
        main(["mode", "yolo"])


def test_help_gives_an_example(capsys):
    for command, example in (("status", "tm status anthropic"), ("predict", "tm predict --hours 48"),
                             ("set-usage", "tm set-usage anthropic 79%"), ("reset", "tm reset anthropic"),
                             ("mode", "tm mode dry-run")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"example: {example}\n" in capsys.readouterr().out
