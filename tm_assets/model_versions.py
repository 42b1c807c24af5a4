"""model_versions: the human-gated fine-tune. No automation and in no sensor's selection: an operator
launches it from the Launchpad (or `dagster asset materialize`), names themself as approver, and
turns dry_run off. Export -> train (mlx-lm LoRA) -> evaluate against the base -> register -> deploy
(mlx_lm.server) -> decision rule 6 swaps routing at the next routing_rules run only if it won."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from tm_assets import finetune
from tm_assets.assets import finetune_jobs
from tm_assets.resources import EmbedderResource, PostgresResource, TokenMachineConfig
from tm_resources import quality
from tm_resources.config import ScoringWeights, tm_home
from tm_resources.embedder import Embedder
from tm_resources.registry import RegisteredModel, register, rollback_version


class FineTuneRun(dg.Config):
    approver: str = Field(description="Who approves this run (required; recorded with the version).")
    job_ids: list[str] = Field(default_factory=list, description=(
        "Jobs from finetune_jobs to run, e.g. 'ft:coding:llama3.2'. Empty: every job of the newest hour."))
    dry_run: bool = Field(True, description="Export and validate the training data only: no training, "
                                            "no deployment. Turn off to train.")
    base_model_path: str | None = Field(None, description=(
        "Local Hugging Face-format weights to fine-tune. Default: the base model's `mlx_path` in tm.yaml."))
    iters: int = Field(100, description="LoRA training iterations.")
    rank: int = Field(8, description="LoRA rank.")
    num_layers: int = Field(16, description="How many of the model's last layers get LoRA adapters.")
    learning_rate: float = Field(1e-4, description="Adam learning rate.")
    batch_size: int = Field(4, description="Examples per training step.")
    deploy: bool = Field(True, description="Serve base + adapter with mlx_lm.server and register it with "
                                           "the gateway under the version's name.")


def _version_name(job_id: str, now: datetime, run_id: str) -> str:
    # The run id keeps two runs in the same second apart.
    slug = re.sub(r"[^a-z0-9]+", "-", job_id.lower().removeprefix("ft:")).strip("-")
    return f"ft-{slug}-{now:%Y%m%d-%H%M}-{run_id[:6]}"


def _examples(conn, job: dict) -> list[dict]:
    rows = conn.execute(
        "SELECT id, user_id, session_id, prompt, response_text FROM requests WHERE id = ANY(%s)"
        " AND response_text IS NOT NULL ORDER BY ts, id", (list(job["example_ids"]),)).fetchall()
    return [{"request_id": str(i), "user_id": u, "session_id": s, "prompt": p or "", "answer": a}
            for i, u, s, p, a in rows]


def _answer_quality(test: list[tuple[list[dict], str]], answers: list[str], embedder: Embedder) -> float | None:
    """The loop's own quality score (without judge or cost) on answers generated for the test prompts."""
    if not answers:
        return None
    prompts = [conv[-1]["content"] if conv else "" for conv, _ in test]
    df = pd.DataFrame({"id": range(len(answers)), "ts": pd.Timestamp.now(tz="UTC"), "user_id": "eval",
                       "session_id": None, "prompt": prompts, "response_text": answers, "status": 200,
                       "output_tokens": [max(1, len(a.split())) for a in answers], "cost_usd": 0.0})
    scores = quality.score_requests(df, embedder.embed(prompts), embedder.embed(answers), None,
                                    ScoringWeights(cost_efficiency=0.0), 600)
    q = scores["quality"].to_numpy(dtype=float)
    return float(np.nanmean(q)) if np.isfinite(q).any() else 0.0


@dg.asset(
    deps=[finetune_jobs],
    group_name="finetune",
    kinds={"mlx", "postgres"},
    description="Fine-tuned model versions, trained only when an operator materializes this asset.",
)
def model_versions(context: dg.AssetExecutionContext, config: FineTuneRun, postgres: PostgresResource,
                   tm_config: TokenMachineConfig, embedder: EmbedderResource) -> dg.MaterializeResult:
    settings = tm_config.load()
    if not config.approver.strip():
        raise dg.Failure("model_versions needs an approver: the run config's `approver` is empty")
    device = finetune.mlx_device()
    context.log.info(f"mlx device: {device}" + (" (the CPU build on Linux; Metal on Apple silicon)"
                                                if device == "cpu" else " (Metal)"))
    now = datetime.now(UTC)
    results = []
    with postgres.get_connection() as conn:
        jobs = pd.DataFrame(conn.execute(
            "SELECT job_id, task_type, base_model, example_ids FROM finetune_jobs"
            " WHERE hour = (SELECT max(hour) FROM finetune_jobs) ORDER BY job_id").fetchall(),
            columns=["job_id", "task_type", "base_model", "example_ids"])
        if config.job_ids:
            missing = set(config.job_ids) - set(jobs["job_id"])
            if missing:
                raise dg.Failure(f"no such job in the newest finetune_jobs hour: {', '.join(sorted(missing))}")
            jobs = jobs[jobs["job_id"].isin(config.job_ids)]
        if jobs.empty:
            raise dg.Failure("finetune_jobs has no job to run: no pattern is yet common and well served enough")

        for job in jobs.to_dict("records"):
            version = _version_name(job["job_id"], now, context.run_id)
            workdir = tm_home() / "finetune" / version
            base = settings.models.get(job["base_model"])
            base_path = config.base_model_path or (base.mlx_path if base else None)
            if not base_path and not config.dry_run:  # a dry run only exports and checks the data
                raise dg.Failure(f"{job['job_id']}: no local weights to fine-tune: set models."
                                 f"{job['base_model']}.mlx_path in tm.yaml or base_model_path in the run config")
            # 1. export
            info = finetune.export_dataset(_examples(conn, job), workdir / "data")
            problems = finetune.validate_dataset(workdir / "data", min_examples=1)
            context.log.info(f"{version}: exported {info.counts} ({info.redacted} redacted) to {workdir / 'data'}")
            if problems:
                raise dg.Failure(f"{version}: the training data is not usable: {'; '.join(problems)}")
            row = {"version": version, "job_id": job["job_id"], "task_type": job["task_type"],
                   "base_model": job["base_model"], "base_path": str(base_path) if base_path else None,
                   "data_dir": str(workdir / "data"),
                   "train_examples": info.counts["train"], "valid_examples": info.counts["valid"],
                   "test_examples": info.counts["test"], "approver": config.approver, "device": device,
                   "settings": config.model_dump(exclude={"approver", "job_ids"}), "status": "dry_run"}
            if not config.dry_run and base_path:
                # 2. train, 3. evaluate base and adapter the same way
                trained = finetune.train_lora(
                    Path(base_path), workdir / "data", workdir / "adapter", iters=config.iters, rank=config.rank,
                    num_layers=config.num_layers, learning_rate=config.learning_rate,
                    batch_size=config.batch_size, on_line=context.log.info)
                base_eval = finetune.evaluate(Path(base_path), workdir / "data", None)
                tuned_eval = finetune.evaluate(Path(base_path), workdir / "data", trained.adapter_path)
                test = finetune.held_out_examples(workdir / "data")
                base_answers = finetune.generate_answers(Path(base_path), None, [c for c, _ in test], 64)
                tuned_answers = finetune.generate_answers(Path(base_path), trained.adapter_path,
                                                          [c for c, _ in test], 64)
                margin = settings.loop.thresholds.swap_min_margin
                eval_score, base_score = 1 / tuned_eval.perplexity, 1 / base_eval.perplexity
                won = eval_score > base_score and eval_score - base_score >= margin
                row.update(adapter_path=str(trained.adapter_path), base_loss=base_eval.loss,
                           adapter_loss=tuned_eval.loss, base_perplexity=base_eval.perplexity,
                           adapter_perplexity=tuned_eval.perplexity,
                           base_quality=_answer_quality(test, base_answers, embedder.get()),
                           adapter_quality=_answer_quality(test, tuned_answers, embedder.get()),
                           eval_score=eval_score, base_eval_score=base_score, status="won" if won else "lost")
                context.log.info(f"{version}: test loss base {base_eval.loss:.3f} -> adapter {tuned_eval.loss:.3f}; "
                                 f"{'wins' if won else 'loses'} (margin needed {margin})")
                # 5. deploy as a named OpenAI-compatible endpoint, entered in the registry
                if config.deploy:
                    server = finetune.ModelServer(Path(base_path), trained.adapter_path,
                                                  log_path=workdir / "server.log").start()
                    row.update(endpoint_url=server.url, server_pid=server.pid)
                    register(conn, RegisteredModel(version, server.url, finetune.ModelServer.UPSTREAM_MODEL,
                                                   "local", base.context_window if base else 8192,
                                                   job["base_model"]))
                    context.log.info(f"{version}: serving at {server.url} (pid {server.pid})")
            # 4. register the version
            cols = list(row)
            values = [json.dumps(v) if isinstance(v, dict) else v for v in row.values()]
            conn.execute(f"INSERT INTO model_versions ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                         values)
            results.append(row)
    table = pd.DataFrame(results)
    shown = [c for c in ("version", "status", "train_examples", "test_examples", "base_loss", "adapter_loss",
                         "base_quality", "adapter_quality", "endpoint_url") if c in table]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(results),
        "approver": config.approver,
        "dry_run": config.dry_run,
        "device": device,
        "versions": dg.MetadataValue.md(table[shown].to_markdown(index=False, floatfmt=".3f")),
        "metrics": dg.MetadataValue.json(
            [{k: v for k, v in r.items() if k not in ("settings",)} for r in results]),
    })


def _newest(postgres: PostgresResource) -> list[dict]:
    with postgres.get_connection() as conn:
        cur = conn.execute("SELECT * FROM model_versions WHERE created_at = (SELECT max(created_at)"
                           " FROM model_versions) ORDER BY version")
        cols = [d.name for d in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


@dg.asset_check(asset=model_versions, metadata={"severity": dg.AssetCheckSeverity.ERROR.value},
                description="The newest run's training data: chat JSONL, every split "
                "present, no example in two splits, nothing left to redact.")
def finetune_data_valid(postgres: PostgresResource) -> dg.AssetCheckResult:
    rows = _newest(postgres)
    problems = {r["version"]: finetune.validate_dataset(Path(r["data_dir"])) for r in rows}
    bad = {v: p for v, p in problems.items() if p}
    return dg.AssetCheckResult(passed=not bad and bool(rows), severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"problems": dg.MetadataValue.json(bad),
                                         "sizes": dg.MetadataValue.json({r["version"]: [r["train_examples"],
                                                                        r["valid_examples"], r["test_examples"]]
                                                                        for r in rows})})


@dg.asset_check(asset=model_versions, description="The newest fine-tune beats its base on the held-out set.",
                metadata={"severity": dg.AssetCheckSeverity.WARN.value})
def fine_tuned_model_beats_base(postgres: PostgresResource) -> dg.AssetCheckResult:
    rows = [r for r in _newest(postgres) if r["status"] in ("won", "lost")]
    return dg.AssetCheckResult(
        passed=bool(rows) and all(r["status"] == "won" for r in rows), severity=dg.AssetCheckSeverity.WARN,
        metadata={"versions": dg.MetadataValue.json({r["version"]: {"status": r["status"],
                                                                    "base_loss": r["base_loss"],
                                                                    "adapter_loss": r["adapter_loss"]}
                                                     for r in rows})})


class Rollback(dg.Config):
    version: str = Field(description="The model version whose routing swap is rolled back.")
    operator: str = Field(description="Who rolls it back.")


@dg.op(description="Roll a fine-tune's routing swap back.")
def rollback_model_version(context: dg.OpExecutionContext, config: Rollback, postgres: PostgresResource) -> None:
    with postgres.get_connection() as conn:
        if not rollback_version(conn, config.version):
            raise dg.Failure(f"no version '{config.version}' to roll back")
    context.log.info(f"{config.operator} rolled back {config.version}; routing_rules drops its swap on its next run")


@dg.job(description="Roll back a fine-tune's routing swap (then re-run routing_rules for the newest hour).")
def rollback_model_version_job():
    rollback_model_version()
