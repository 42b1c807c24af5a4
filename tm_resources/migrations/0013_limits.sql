-- Rate limits, loop detection and keep-warm, shared by every gateway worker and replica.
-- Counters: one row per (limit subject, fixed window); a request takes one unit from each of its
-- windows in tm_take_limits, all or none, so two workers can never both spend the last unit.
-- The three tables of live counts are UNLOGGED (no write-ahead log, so a commit waits for no disk
-- flush); a database crash empties them, which only restarts the windows.
CREATE UNLOGGED TABLE limit_counters (
    name         text NOT NULL,          -- 'rpm:key:<key id>', 'tph:agent:<agent>'
    window_start timestamptz NOT NULL,
    n            integer NOT NULL,
    PRIMARY KEY (name, window_start)
);

-- Turns in flight per agent: a lease per request, deleted when its answer ends; a worker that dies
-- mid-answer leaves its lease until expires_at.
CREATE UNLOGGED TABLE limit_leases (
    request_id uuid PRIMARY KEY,
    holder     text NOT NULL,            -- 'agent:<agent>'
    expires_at timestamptz NOT NULL
);
CREATE INDEX limit_leases_holder ON limit_leases (holder);

-- Tool calls the gateway has seen answered, per session: the same call (name and arguments) seen
-- under several tool-call ids within the window is an agent going round in circles. Keyed by the
-- call's id so a retried request is not counted twice.
CREATE UNLOGGED TABLE tool_call_sightings (
    session     text NOT NULL,
    call_id     text NOT NULL,
    fingerprint text NOT NULL,
    tool        text NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (session, call_id)
);
CREATE INDEX tool_call_sightings_recent ON tool_call_sightings (session, fingerprint, seen_at);

-- Prompt prefixes (tools and system, with their cache breakpoints) recently sent to Anthropic-kind
-- models, per agent: what keep-warm re-sends before the provider's cache forgets them.
CREATE TABLE warm_prefixes (
    agent      text NOT NULL,            -- x-tm-agent, else 'user:<id>'
    model      text NOT NULL,            -- the configured model it was sent to
    prefix_key text NOT NULL,            -- a hash of the prefix
    user_id    text NOT NULL,            -- whose spend a ping counts in (the last to use it)
    prefix     jsonb NOT NULL,           -- {"system": ..., "tools": ...} exactly as sent
    tokens     integer NOT NULL,         -- estimated
    first_used timestamptz NOT NULL,
    last_used  timestamptz NOT NULL,
    uses       integer NOT NULL,
    warmed_at  timestamptz,
    PRIMARY KEY (agent, model, prefix_key)
);
CREATE INDEX warm_prefixes_last_used ON warm_prefixes (last_used);

-- Take one unit from every window (names[i], windows_s[i], limits[i]) and, when holder is given,
-- a lease among at most lease_limit; all or nothing. Returns (0, 0) when taken, else the 1-based
-- index of the limit that refused (array_length(names) + 1 for the lease) and seconds until it frees.
CREATE FUNCTION tm_take_limits(names text[], windows_s integer[], limits integer[],
                               holder text, lease_limit integer, lease_id uuid, lease_s integer,
                               OUT refused integer, OUT retry_after_s double precision)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    k integer := coalesce(array_length(names, 1), 0);
    starts timestamptz[] := '{}';
    ws timestamptz;
    held integer;
BEGIN
    refused := 0;
    retry_after_s := 0;
    FOR i IN 1..k LOOP
        ws := to_timestamp(floor(extract(epoch FROM now()) / windows_s[i]) * windows_s[i]);
        starts := starts || ws;
        INSERT INTO limit_counters AS c (name, window_start, n) VALUES (names[i], ws, 1)
        ON CONFLICT (name, window_start) DO UPDATE SET n = c.n + 1 WHERE c.n < limits[i];
        IF NOT FOUND THEN
            refused := i;
            retry_after_s := extract(epoch FROM ws + make_interval(secs => windows_s[i]) - clock_timestamp());
            EXIT;
        END IF;
    END LOOP;
    IF refused = 0 AND holder IS NOT NULL THEN
        -- Serializes the agent's leases across workers without locking anyone else's.
        PERFORM pg_advisory_xact_lock(hashtextextended('tm_lease:' || holder, 0));
        DELETE FROM limit_leases WHERE limit_leases.holder = tm_take_limits.holder
                                   AND expires_at < clock_timestamp();
        SELECT count(*) INTO held FROM limit_leases WHERE limit_leases.holder = tm_take_limits.holder;
        IF held >= lease_limit THEN
            refused := k + 1;
            retry_after_s := 1;
        ELSE
            INSERT INTO limit_leases (request_id, holder, expires_at)
            VALUES (lease_id, holder, clock_timestamp() + make_interval(secs => lease_s));
        END IF;
    END IF;
    IF refused > 0 THEN
        -- Give back what this request took before the refusal: a refused request spends nothing.
        FOR i IN 1..least(refused - 1, k) LOOP
            UPDATE limit_counters SET n = n - 1 WHERE name = names[i] AND window_start = starts[i];
        END LOOP;
    END IF;
END;
$$;

-- Record the tool calls a request answers (ignoring ids already seen) and count, per call, how many
-- distinct calls of the same name and arguments the session made within the window.
CREATE FUNCTION tm_tool_calls_seen(sess text, ids text[], fingerprints text[], tools text[],
                                   window_s double precision)
RETURNS TABLE (fp text, tool_name text, seen bigint, first_seen timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tool_call_sightings (session, call_id, fingerprint, tool)
    SELECT sess, c.id, c.f, c.t FROM unnest(ids, fingerprints, tools) AS c(id, f, t)
    ON CONFLICT DO NOTHING;
    RETURN QUERY
        SELECT s.fingerprint, min(s.tool), count(*), min(s.seen_at) FROM tool_call_sightings s
        WHERE s.session = sess AND s.fingerprint = ANY(fingerprints)
          AND s.seen_at > clock_timestamp() - make_interval(secs => window_s)
        GROUP BY s.fingerprint;
END;
$$;
