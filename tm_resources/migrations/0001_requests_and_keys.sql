-- The request log (the single source of truth), API keys, and the change counters replicas poll.

CREATE EXTENSION IF NOT EXISTS vector;

-- One counter per kind of state the gateway caches (keys, rules, ...): a replica re-reads
-- a kind when its version moves, instead of querying on every request.
CREATE TABLE tm_state_versions (
    name     text PRIMARY KEY,
    version  bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION tm_bump_state_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tm_state_versions (name, version, changed_at) VALUES (TG_ARGV[0], 1, now())
    ON CONFLICT (name) DO UPDATE SET version = tm_state_versions.version + 1, changed_at = now();
    RETURN NULL;
END $$;

CREATE TABLE api_keys (
    id          text PRIMARY KEY,             -- public handle shown in listings, e.g. "k_3f9a1c2e"
    user_id     text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,        -- sha256 of the key; the key itself is never stored
    prefix      text NOT NULL,                -- the key's first characters, to recognise it
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('api_keys');

-- Partitioned by month so that old months can be detached or dropped whole.
CREATE TABLE requests (
    id                  uuid NOT NULL,
    ts                  timestamptz NOT NULL,
    user_id             text NOT NULL,
    api_key_id          text,
    api_format          text NOT NULL,        -- 'openai' | 'anthropic': what the client spoke
    endpoint            text NOT NULL,
    session_id          text,
    agent               text,
    requested_model     text,
    model               text,                 -- the configured model that answered
    provider            text,
    upstream_model      text,
    stream              boolean NOT NULL DEFAULT false,
    system              text,
    prompt              text,                 -- the last user turn as plain text
    messages            jsonb,
    params              jsonb,                -- everything else the client sent (max_tokens, tools, ...)
    response_text       text,
    finish_reason       text,
    input_tokens        integer NOT NULL DEFAULT 0,   -- uncached input tokens
    output_tokens       integer NOT NULL DEFAULT 0,
    cache_read_tokens   integer NOT NULL DEFAULT 0,
    cache_write_tokens  integer NOT NULL DEFAULT 0,
    cost_usd            double precision NOT NULL DEFAULT 0,
    latency_ms          double precision,
    ttft_ms             double precision,
    status              integer NOT NULL,     -- HTTP status the client got (499: client went away)
    error_class         text,
    error_message       text,
    route               text,
    route_reason        text,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE requests_default PARTITION OF requests DEFAULT;
CREATE INDEX requests_ts ON requests (ts);
CREATE INDEX requests_user_ts ON requests (user_id, ts);
CREATE INDEX requests_session ON requests (session_id, ts) WHERE session_id IS NOT NULL;

-- Monthly partitions from `from_month` for `months` months; an existing one is left as it is.
CREATE FUNCTION tm_ensure_request_partitions(from_month date, months integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m date;
    part text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        m := (date_trunc('month', from_month) + make_interval(months => i))::date;
        part := format('requests_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF requests FOR VALUES FROM (%L) TO (%L)',
                               part, m, (m + interval '1 month')::date);
            EXCEPTION WHEN check_violation THEN
                -- Rows for that month already sit in the default partition; they stay there.
                RAISE NOTICE 'partition % not created: the default partition holds its rows', part;
            END;
        END IF;
    END LOOP;
END $$;

SELECT tm_ensure_request_partitions((now() - interval '1 month')::date, 15);
