"""What the Dagster UI shows of the loop's resources: the names of the variables that hold secrets,
never their values. Asked through Dagster's own GraphQL, against the real Definitions loaded in a code
server as the webserver loads them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

DEFINITIONS = str(Path(__file__).resolve().parent.parent / "tm_assets" / "definitions.py")
PASSWORD = "pw-7f3a9c41e2"
POSTHOG_KEY = "phc_secret0123456789abcdef"

REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
RESOURCE = """
query ($selector: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $selector) {
    __typename
    ... on ResourceDetails { name configuredValues { key value type } }
    ... on PythonError { message }
  }
}"""


def test_the_ui_shows_where_secrets_come_from_never_the_secrets(monkeypatch):
    monkeypatch.setenv("TM_DATABASE_URL", f"postgresql://tm:{PASSWORD}@db.example.internal:5432/tm")
    monkeypatch.setenv("POSTHOG_API_KEY", POSTHOG_KEY)
    monkeypatch.setenv("POSTHOG_HOST", "http://127.0.0.1:9")
    with dg.instance_for_test() as instance, \
            define_out_of_process_context(DEFINITIONS, None, instance) as context:
        [repo] = execute_dagster_graphql(context, REPOSITORIES).data["repositoriesOrError"]["nodes"]
        shown = {}
        for name in ("postgres", "posthog", "tm_config"):
            selector = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"],
                        "resourceName": name}
            got = execute_dagster_graphql(context, RESOURCE, {"selector": selector}).data
            details = got["topLevelResourceDetailsOrError"]
            assert details["__typename"] == "ResourceDetails", details
            shown[name] = {v["key"]: (v["type"], v["value"]) for v in details["configuredValues"]}
    assert shown["postgres"]["url"] == ("ENV_VAR", "TM_DATABASE_URL")
    assert shown["posthog"]["api_key"] == ("ENV_VAR", "POSTHOG_API_KEY")
    everything = repr(shown)
    assert PASSWORD not in everything and POSTHOG_KEY not in everything


def test_candidate_new_types_in_the_ui_show_no_secret_from_a_prompt():
    from tm_assets.compute import candidates_markdown

    key = "sk-ant-api03-" + "Zx8Qw2Lp0Rt5Yu7Io9Pa1Sd3Fg4"
    shown = candidates_markdown([{"size": 4, "top_words": ["deploy", "key"], "examples": [
        f"deploy with {key} please", "mail the report to dana.smith@example.com"]}])
    assert key not in shown and "sk-ant" not in shown and "dana.smith@example.com" not in shown
    assert "deploy with" in shown  # the prompt stays readable around what was taken out
