-- Alerts: a budget or pool passing a threshold, a provider quota changing state. One row per
-- (kind, subject, level, period): the unique key is what makes "once per threshold per period" hold
-- across replicas, whoever sees the crossing first.
CREATE TABLE alerts (
    id           bigserial PRIMARY KEY,
    ts           timestamptz NOT NULL DEFAULT now(),
    kind         text NOT NULL,          -- budget | pool | quota | ...
    subject      text NOT NULL,          -- what it is about: 'user:alice:day', 'team:design', 'provider:anthropic'
    level        text NOT NULL,          -- the threshold ('0.75') or state ('critical') reached
    period_start timestamptz NOT NULL,   -- the budget period or quota window it belongs to
    message      text NOT NULL,          -- in words, for a person
    data         jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (kind, subject, level, period_start)
);
CREATE INDEX alerts_ts ON alerts (ts DESC);
