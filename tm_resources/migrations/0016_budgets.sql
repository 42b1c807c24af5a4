-- Budgets, teams, token pools and billing (issue 14): the limits set at run time (`tm budgets set`,
-- over tm.yaml's defaults), the counters the gateway reserves against, a key's team, and each row's bill.

-- A limit per (scope, subject, period): scope user | team | key in USD per day | week | month, or
-- scope pool: a team's monthly pool in standard tokens (period month).
CREATE TABLE budgets (
    scope      text NOT NULL,
    subject    text NOT NULL,
    period     text NOT NULL,
    amount     double precision NOT NULL CHECK (amount >= 0),
    set_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, subject, period)
);
CREATE TRIGGER budgets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON budgets
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('budgets');

-- What each budget (USD: settled cost plus what requests in flight have reserved) or pool (standard
-- tokens) has used in one period; `cost_usd` is the settled cost alone.
CREATE TABLE budget_usage (
    subject      text NOT NULL,           -- 'user:alice:day', 'team:design:month', 'key:k_1a2b:week', 'pool:design'
    period_start timestamptz NOT NULL,
    used         double precision NOT NULL DEFAULT 0,
    cost_usd     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, period_start)
);

-- A request's reservation until it settles: what it holds on which counters. A gateway killed before
-- settling leaves its hold behind; once `expires_at` passes, any replica gives it back
-- (tm_budget_release_expired), so a crash makes a budget stricter for a while, never for good.
CREATE TABLE budget_holds (
    request_id uuid PRIMARY KEY,
    subjects   text[] NOT NULL,
    starts     timestamptz[] NOT NULL,
    amounts    float8[] NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX budget_holds_expiry ON budget_holds (expires_at);

-- Reserve amounts[i] on each subject in one statement, all or none: each counter moves only while it
-- stays within its limit (a conditional upsert that holds the row's lock), so no interleaving of
-- requests, on any number of replicas, can take a counter past its limit. The caller sorts the
-- subjects, so two requests lock shared rows in the same order. refused: the 1-based index of the
-- first subject that had no room (0: all reserved, and the hold recorded); used: each counter after
-- the reservation, or for a refusal that counter as it stands.
CREATE FUNCTION tm_budget_reserve(request uuid, subjects text[], starts timestamptz[], amounts float8[],
                                  limits float8[], ttl_s float8, OUT refused int, OUT used float8[])
LANGUAGE plpgsql AS $$
DECLARE
    u float8;
BEGIN
    refused := 0;
    used := '{}';
    BEGIN
        FOR i IN 1 .. coalesce(array_length(subjects, 1), 0) LOOP
            u := NULL;
            IF amounts[i] <= limits[i] THEN
                INSERT INTO budget_usage AS b (subject, period_start, used) VALUES (subjects[i], starts[i], amounts[i])
                ON CONFLICT (subject, period_start) DO UPDATE SET used = b.used + excluded.used
                    WHERE b.used + excluded.used <= limits[i]
                RETURNING b.used INTO u;
            END IF;
            IF u IS NULL THEN
                refused := i;
                RAISE EXCEPTION 'budget % has no room', subjects[i] USING ERRCODE = 'TMB01';
            END IF;
            used := used || u;
        END LOOP;
        INSERT INTO budget_holds (request_id, subjects, starts, amounts, expires_at)
        VALUES (request, subjects, starts, amounts, now() + make_interval(secs => ttl_s));
    EXCEPTION WHEN SQLSTATE 'TMB01' THEN
        -- The reservations made before the refusal are rolled back with this block.
        SELECT b.used INTO u FROM budget_usage b WHERE b.subject = subjects[refused] AND b.period_start = starts[refused];
        used := ARRAY[coalesce(u, 0)];
    END;
END $$;

-- Settle a request: its hold is dropped and each counter moves from what was held to actual[i] (the
-- real cost, or for a pool the standard tokens), costs[i] added to its settled cost, in the hold's
-- (sorted) order. A hold already given back as expired counts as nothing held. Returns the counters after.
CREATE FUNCTION tm_budget_settle(request uuid, subjects text[], starts timestamptz[], actual float8[], costs float8[])
RETURNS float8[] LANGUAGE plpgsql AS $$
DECLARE
    held float8[];
    u float8;
    after float8[] := '{}';
BEGIN
    DELETE FROM budget_holds WHERE request_id = request RETURNING amounts INTO held;
    FOR i IN 1 .. coalesce(array_length(subjects, 1), 0) LOOP
        INSERT INTO budget_usage AS b (subject, period_start, used, cost_usd)
        VALUES (subjects[i], starts[i], actual[i], costs[i])
        ON CONFLICT (subject, period_start) DO UPDATE
            SET used = greatest(b.used + actual[i] - coalesce(held[i], 0), 0), cost_usd = b.cost_usd + costs[i]
        RETURNING b.used INTO u;
        after := after || u;
    END LOOP;
    RETURN after;
END $$;

-- Give back one expired hold (one per call, so its counters are locked in their sorted order and no
-- sweep can deadlock with a reservation); true when there was one.
CREATE FUNCTION tm_budget_release_expired() RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    h budget_holds;
BEGIN
    DELETE FROM budget_holds WHERE request_id = (
        SELECT request_id FROM budget_holds WHERE expires_at < now() LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING * INTO h;
    IF h.request_id IS NULL THEN
        RETURN false;
    END IF;
    FOR i IN 1 .. array_length(h.subjects, 1) LOOP
        UPDATE budget_usage SET used = greatest(used - h.amounts[i], 0)
        WHERE subject = h.subjects[i] AND period_start = h.starts[i];
    END LOOP;
    RETURN true;
END $$;

-- A key may carry its team (`tm keys create --team`), over users.<id>.team in tm.yaml.
ALTER TABLE api_keys ADD COLUMN team text;

-- Each row's team, and what it is billed: billing included (drawn from the team's pool) | overage
-- (past the pool, at the price band's markup) | premium (metered outside the pool) | local.
ALTER TABLE requests ADD COLUMN team text, ADD COLUMN billed_usd double precision, ADD COLUMN billing text;
