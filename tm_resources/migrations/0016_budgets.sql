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

-- Reserve amounts[i] on each subject in one statement, all or none: each counter moves only while it
-- stays within its limit (a conditional upsert that holds the row's lock), so no interleaving of
-- requests, on any number of replicas, can take a counter past its limit. The caller sorts the
-- subjects, so two requests lock shared rows in the same order. refused: the 1-based index of the
-- first subject that had no room (0: all reserved); used: each counter after the reservation, or
-- for a refusal that counter as it stands.
CREATE FUNCTION tm_budget_reserve(subjects text[], starts timestamptz[], amounts float8[], limits float8[],
                                  OUT refused int, OUT used float8[]) LANGUAGE plpgsql AS $$
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
    EXCEPTION WHEN SQLSTATE 'TMB01' THEN
        -- The reservations made before the refusal are rolled back with this block.
        SELECT b.used INTO u FROM budget_usage b WHERE b.subject = subjects[refused] AND b.period_start = starts[refused];
        used := ARRAY[coalesce(u, 0)];
    END;
END $$;

-- Settle: move each counter by deltas[i] (the real cost less what was reserved) and add costs[i] to
-- its settled cost, in the caller's (sorted) order; returns the counters after.
CREATE FUNCTION tm_budget_settle(subjects text[], starts timestamptz[], deltas float8[], costs float8[])
RETURNS float8[] LANGUAGE plpgsql AS $$
DECLARE
    u float8;
    after float8[] := '{}';
BEGIN
    FOR i IN 1 .. coalesce(array_length(subjects, 1), 0) LOOP
        INSERT INTO budget_usage AS b (subject, period_start, used, cost_usd)
        VALUES (subjects[i], starts[i], greatest(deltas[i], 0), costs[i])
        ON CONFLICT (subject, period_start) DO UPDATE
            SET used = greatest(b.used + deltas[i], 0), cost_usd = b.cost_usd + costs[i]
        RETURNING b.used INTO u;
        after := after || u;
    END LOOP;
    RETURN after;
END $$;

-- A key may carry its team (`tm keys create --team`), over users.<id>.team in tm.yaml.
ALTER TABLE api_keys ADD COLUMN team text;

-- Each row's team, and what it is billed: billing included (drawn from the team's pool) | overage
-- (past the pool, at the price band's markup) | premium (metered outside the pool) | local.
ALTER TABLE requests ADD COLUMN team text;
ALTER TABLE requests ADD COLUMN billed_usd double precision;
ALTER TABLE requests ADD COLUMN billing text;
