-- The dashboard's hourly roll-ups of the request log, and which Dagster run wrote each hour of each
-- loop table (so a routing rule links to the run that decided it).

-- One row per hour x user x agent x model x route x task type: what the dashboard reads instead of
-- `requests`, so its pages stay fast however long the log grows. Rebuilt from `requests` like every
-- loop table ('' stands for "none" in the key columns).
CREATE TABLE usage_hourly (
    hour                timestamptz NOT NULL,
    user_id             text NOT NULL,
    agent               text NOT NULL DEFAULT '',
    model               text NOT NULL DEFAULT '',
    tier                text NOT NULL DEFAULT '',       -- the model's tier when rolled up: local | included | premium
    route               text NOT NULL DEFAULT '',
    task_type           text NOT NULL DEFAULT '',
    requests            integer NOT NULL,
    errors              integer NOT NULL,               -- status >= 400 (client went away: 499 included)
    fallbacks           integer NOT NULL,               -- answered after more than one attempt
    cache_hits          integer NOT NULL,
    input_tokens        bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cache_read_tokens   bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    cost_usd            double precision NOT NULL,
    baseline_cost_usd   double precision NOT NULL,      -- the same tokens on defaults.frontier_model
    latency_ms_sum      double precision NOT NULL,
    -- Requests per latency bucket: bucket i holds latencies in [2^(i-1), 2^i) ms (bucket 0: under 1 ms,
    -- the last: 2^14 ms and over), enough for percentiles within a factor of two without the raw rows.
    latency_buckets     integer[] NOT NULL,
    PRIMARY KEY (hour, user_id, agent, model, route, task_type)
);
CREATE INDEX usage_hourly_user_hour ON usage_hourly (user_id, hour);

-- The same per hour x agent x model x route, for everyone: what the team overview reads (a few times fewer
-- rows than usage_hourly, whose users and task types it does not show).
CREATE TABLE team_usage_hourly (
    hour                timestamptz NOT NULL,
    agent               text NOT NULL,
    model               text NOT NULL,
    tier                text NOT NULL,
    route               text NOT NULL,
    requests            integer NOT NULL,
    errors              integer NOT NULL,
    fallbacks           integer NOT NULL,
    cache_hits          integer NOT NULL,
    input_tokens        bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cache_read_tokens   bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    cost_usd            double precision NOT NULL,
    baseline_cost_usd   double precision NOT NULL,
    latency_ms_sum      double precision NOT NULL,
    latency_buckets     integer[] NOT NULL,
    PRIMARY KEY (hour, agent, model, route)
);

-- The Dagster run that last wrote each hour of each loop table.
CREATE TABLE loop_runs (
    table_name  text NOT NULL,
    hour        timestamptz NOT NULL,
    run_id      text NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, hour)
);
