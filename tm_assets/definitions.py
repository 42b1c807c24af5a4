"""The Dagster Definitions for Token Machine's loop (workspace.yaml loads this module)."""

from __future__ import annotations

import os

import dagster as dg

from tm_assets.assets import LOOP, loop_assets, requests_source
from tm_assets.checks import loop_checks
from tm_assets.model_versions import (
    fine_tuned_model_beats_base,
    finetune_data_valid,
    model_versions,
    rollback_model_version_job,
)
from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig, model_resources


def _from_env(name: str) -> dg.EnvVar | None:
    # Bound by the variable's name, so the Dagster UI shows the name and never the value (a database
    # URL holds its password); unset means the default (the embedded database, no PostHog, ./tm.yaml).
    return dg.EnvVar(name) if os.environ.get(name) else None


def resources() -> dict[str, dg.ConfigurableResource]:
    # Bound from the environment here and nowhere else.
    return {
        "postgres": PostgresResource(url=_from_env("TM_DATABASE_URL")),
        "tm_config": TokenMachineConfig(path=_from_env("TM_CONFIG")),
        "posthog": PostHogResource(api_key=_from_env("POSTHOG_API_KEY"), host=_from_env("POSTHOG_HOST")),
        **model_resources(),
    }


# The hourly loop runs with nobody clicking: this sensor starts RUNNING on a fresh instance.
loop_automation = dg.AutomationConditionSensorDefinition(
    "tm_loop_automation",
    target=dg.AssetSelection.groups(LOOP),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
)

defs = dg.Definitions(
    # model_versions is human-gated: no automation condition, and not in the sensor's target.
    assets=[requests_source, *loop_assets, model_versions],
    asset_checks=[*loop_checks, finetune_data_valid, fine_tuned_model_beats_base],
    jobs=[rollback_model_version_job],
    sensors=[loop_automation],
    resources=resources(),
    # A step costs ~5 s in a subprocess here and ~0 in process (measured on a 2-core machine): the graph is small.
    executor=dg.in_process_executor,
)
