-- Fine-tuned model versions (the human-gated model_versions asset) and the registry of models the
-- gateway serves beyond tm.yaml (deployed fine-tunes), which replicas re-read when it changes.

CREATE TABLE model_versions (
    version            text PRIMARY KEY,             -- the served model's name, e.g. 'ft-coding-20261122-0412'
    job_id             text NOT NULL,
    task_type          text NOT NULL,
    base_model         text NOT NULL,                -- the configured model it was trained on top of
    base_path          text NOT NULL,
    adapter_path       text,
    data_dir           text NOT NULL,
    train_examples     integer NOT NULL,
    valid_examples     integer NOT NULL,
    test_examples      integer NOT NULL,
    base_loss          double precision,
    adapter_loss       double precision,
    base_perplexity    double precision,
    adapter_perplexity double precision,
    base_quality       double precision,             -- the loop's quality score on generated test answers
    adapter_quality    double precision,
    eval_score         double precision,             -- what decision rule 6 compares: 1 / test perplexity
    base_eval_score    double precision,
    settings           jsonb NOT NULL,
    device             text,
    approver           text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    status             text NOT NULL,                -- dry_run | won | lost | rolled_back
    endpoint_url       text,
    server_pid         integer
);

CREATE TABLE model_registry (
    name            text PRIMARY KEY,
    base_url        text NOT NULL,                   -- an OpenAI-compatible endpoint (mlx_lm.server)
    upstream        text NOT NULL,                   -- the model name that server expects
    base_model      text,                            -- where its requests go when its server fails
    tier            text NOT NULL DEFAULT 'local',
    context_window  integer NOT NULL DEFAULT 8192,
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER model_registry_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON model_registry
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('model_registry');
