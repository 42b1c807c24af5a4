"""Token Machine installed from its wheel, away from the source checkout: `tm`, the example config, the schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tm_gateway.cli import main
from tm_resources.config import EXAMPLE_CONFIG

REPO = Path(__file__).resolve().parent.parent


def test_init_writes_the_example_and_keeps_an_edited_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    written = tmp_path / "tm.yaml"
    assert written.read_text() == EXAMPLE_CONFIG.read_text()

    written.write_text("# mine\n")
    assert main(["init"]) == 1
    assert "--force" in capsys.readouterr().err
    assert written.read_text() == "# mine\n"

    assert main(["init", "--force"]) == 0
    assert yaml.safe_load(written.read_text()) == yaml.safe_load(EXAMPLE_CONFIG.read_text())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout stays clean) and installed into a bare folder."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", ".tm", "build", "*.egg-info",
                                                            "__pycache__", "dist"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (work / "dist").glob("token_machine-*.whl")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    shutil.rmtree(src)  # nothing may read the sources once installed
    return target


def _run(installed: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    # The wheel's folder first; the venv's site-packages only for the dependencies (its editable finder
    # comes after path entries, and the repo itself is never on the path).
    env = {k: v for k, v in os.environ.items() if k not in ("TM_CONFIG", "PYTHONPATH", "TM_HOME")}
    env["PYTHONPATH"] = str(installed)
    env["TM_HOME"] = str(cwd / ".tm")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_works_from_any_folder(installed, tmp_path):
    tm = installed / "bin" / "tm"
    shown = _run(installed, tmp_path, str(tm), "--help")
    assert shown.returncode == 0, shown.stderr
    assert "init" in shown.stdout and "up" in shown.stdout

    probe = _run(installed, tmp_path, sys.executable, "-P", "-c", """
import tm_resources, tm_gateway, tm_assets
from importlib import resources
from tm_resources import db
from tm_resources.config import config_path, load_config
config = load_config()
print(tm_resources.__file__)
print(config_path())
print(len(config.models))
print(len(db._migrations()))
print(len(resources.files("tm_resources").joinpath("dagster.yaml").read_text()))
""")
    assert probe.returncode == 0, probe.stderr
    module, config_file, models, migrations, dagster_yaml = probe.stdout.split()
    assert Path(module).is_relative_to(installed)
    assert Path(config_file).is_relative_to(installed)  # no ./tm.yaml here: the packaged example
    assert int(models) > 0
    assert int(migrations) == len(list((REPO / "tm_resources" / "migrations").glob("*.sql")))
    assert int(dagster_yaml) > 0

    made = _run(installed, tmp_path, str(tm), "init")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "tm.yaml").read_text() == EXAMPLE_CONFIG.read_text()
    again = _run(installed, tmp_path, str(tm), "init")
    assert again.returncode == 1 and (tmp_path / "tm.yaml").read_text() == EXAMPLE_CONFIG.read_text()


def test_the_wheel_ships_the_dashboard_pages_and_chart_library(installed):
    dashboard = installed / "tm_gateway" / "dashboard"
    for page in ("base.html", "login.html", "overview.html", "quality.html", "decisions.html", "customer.html"):
        assert (dashboard / "templates" / page).is_file(), page
    for asset in ("echarts.min.js", "dashboard.js", "dashboard.css", "echarts-LICENSE.txt"):
        assert (dashboard / "static" / asset).is_file(), asset
