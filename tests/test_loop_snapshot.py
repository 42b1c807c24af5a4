"""The loop's shape as the Dagster UI shows it (asset keys, deps, partitions, groups, backfill policy,
automation conditions, checks with their severity and blocking), compared with a committed snapshot so a
change to any of them is seen in review. After a deliberate change, regenerate it:

    TM_UPDATE_SNAPSHOT=1 .venv/bin/pytest tests/test_loop_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from tm_assets.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "loop_definitions.json"


def condition_tree(condition: dg.AutomationCondition | None) -> list[str] | None:
    """One line per node, indented by depth: the label where it has one, else Dagster's own name."""
    if condition is None:
        return None
    lines: list[str] = []

    def walk(node: dg.AutomationCondition, depth: int) -> None:
        label = node.get_label()
        lines.append("  " * depth + (f"{node.name} [{label}]" if label else node.name))
        for child in node.children:
            walk(child, depth + 1)

    walk(condition, 0)
    return lines


def partitions(p: dg.PartitionsDefinition | None) -> dict | None:
    if p is None:
        return None
    assert isinstance(p, dg.TimeWindowPartitionsDefinition)
    # Not the start: it is where each installation's own data starts (tm_resources/loop_start.py).
    return {"cron": p.cron_schedule, "timezone": p.timezone, "end_offset": p.end_offset, "format": p.fmt}


def describe(definitions: dg.Definitions) -> dict:
    graph = definitions.get_repository_def().asset_graph
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": partitions(node.partitions_def),
            "backfill_policy": str(node.backfill_policy) if node.backfill_policy else None,
            "automation_condition": condition_tree(node.automation_condition),
            "materializable": node.is_materializable,
        }
    checks = {}
    for spec in sorted((graph.get_check_spec(k) for k in graph.asset_check_keys),
                       key=lambda s: (s.asset_key.to_user_string(), s.name)):
        checks[f"{spec.asset_key.to_user_string()}:{spec.name}"] = {
            "blocking": spec.blocking,
            "severity": spec.metadata.get("severity"),
            "partitioned": spec.partitions_def is not None,
        }
    sensors = {s.name: {"default_status": s.default_status.value,
                        "target": sorted(k.to_user_string() for k in s.asset_selection.resolve(graph))}
               for s in (definitions.resolve_sensor_def(name) for name in ["tm_loop_automation"])}
    return {"assets": assets, "checks": checks, "sensors": sensors}


def test_the_loop_definitions_match_the_snapshot():
    got = json.dumps(describe(defs), indent=2, sort_keys=True) + "\n"
    if os.environ.get("TM_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(got)
    assert SNAPSHOT.exists(), "no snapshot yet: run with TM_UPDATE_SNAPSHOT=1"
    assert got == SNAPSHOT.read_text(), "the loop's definitions changed: review the diff, then regenerate " \
                                        "with TM_UPDATE_SNAPSHOT=1 (see this module's docstring)"
