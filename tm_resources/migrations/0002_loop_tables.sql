-- The loop's tables: one per Dagster asset, each keyed by the hour it was computed for, so that
-- re-running an hour replaces exactly that hour. All are rebuilt from `requests`.

-- Columns the gateway fills once routing exists: the task type it acted on, the prompt vector it
-- computed (reused by the loop and the semantic cache), and the link between cascade attempts.
ALTER TABLE requests ADD COLUMN task_type text;
ALTER TABLE requests ADD COLUMN prompt_embedding vector(384);
ALTER TABLE requests ADD COLUMN parent_id uuid;
ALTER TABLE requests ADD COLUMN baseline_cost_usd double precision;

CREATE TABLE scored_requests (
    hour             timestamptz NOT NULL,
    request_id       uuid PRIMARY KEY,           -- one score per request, whatever the hour
    ts               timestamptz NOT NULL,
    user_id          text NOT NULL,
    model            text,
    tier             text,
    coherence        double precision,
    completion       double precision,           -- NULL: no judge reachable, weights renormalised
    brevity          double precision,
    reprompt         double precision,
    cost_efficiency  double precision,
    prompt_quality   double precision,
    quality          double precision,
    prompt_embedding vector(384)
);
CREATE INDEX scored_requests_hour ON scored_requests (hour);
CREATE INDEX scored_requests_user_ts ON scored_requests (user_id, ts);

CREATE TABLE task_types (
    hour        timestamptz NOT NULL,
    request_id  uuid PRIMARY KEY,
    ts          timestamptz NOT NULL,
    user_id     text NOT NULL,
    model       text,
    task_type   text NOT NULL,
    confidence  double precision NOT NULL
);
CREATE INDEX task_types_hour ON task_types (hour);

CREATE TABLE patterns (
    hour            timestamptz NOT NULL,
    scope           text NOT NULL,               -- 'type_model' or 'type_model_user'
    task_type       text NOT NULL,
    model           text NOT NULL,
    tier            text,
    user_id         text NOT NULL DEFAULT '',    -- '' for scope 'type_model'
    requests        integer NOT NULL,            -- every row, failed ones included (cost, tokens)
    samples         integer NOT NULL,            -- rows with a quality score (answered)
    avg_quality     double precision,
    total_cost_usd  double precision NOT NULL,
    avg_cost_usd    double precision,
    input_tokens    bigint NOT NULL,
    output_tokens   bigint NOT NULL,
    escalations     integer NOT NULL,            -- rows that were an escalation to this model
    escalated_away  integer NOT NULL,            -- rows whose answer was replaced by an escalation
    PRIMARY KEY (hour, scope, task_type, model, user_id)
);

CREATE TABLE grades (
    hour               timestamptz NOT NULL,
    user_id            text NOT NULL,
    grade              text,
    avg_quality_score  double precision,
    samples            integer NOT NULL,
    requests_today     integer NOT NULL,
    tokens_today       bigint NOT NULL,
    cost_today         double precision NOT NULL,
    escalations        integer NOT NULL DEFAULT 0,
    wrong_model_rate   double precision,
    prompt_quality_avg double precision,
    low_prompt_days    integer NOT NULL DEFAULT 0,
    prompt_quality_daily jsonb,                  -- {local date: average prompt quality}
    coaching_example   text,
    prompt_weakness    text,
    PRIMARY KEY (hour, user_id)
);

CREATE TABLE routing_rules (
    hour          timestamptz NOT NULL,
    rule_id       text NOT NULL,                 -- stable across hours, e.g. 'escalate:coding'
    action        text NOT NULL,                 -- escalate | lock_local | coach | finetune_candidate | throttle | swap_model
    task_type     text,
    user_id       text,
    model         text,
    target_model  text,
    status        text NOT NULL,                 -- active (auto) | proposed (dry-run) | inactive (manual)
    reason        text NOT NULL,
    evidence      jsonb NOT NULL,
    PRIMARY KEY (hour, rule_id)
);
CREATE TRIGGER routing_rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON routing_rules
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('routing_rules');

CREATE TABLE finetune_jobs (
    hour          timestamptz NOT NULL,
    job_id        text NOT NULL,                 -- stable: 'ft:<task_type>:<model>'
    task_type     text NOT NULL,
    base_model    text NOT NULL,
    samples       integer NOT NULL,
    avg_quality   double precision NOT NULL,
    example_ids   uuid[] NOT NULL,               -- the requests whose answers would train it
    reason        text NOT NULL,
    PRIMARY KEY (hour, job_id)
);
