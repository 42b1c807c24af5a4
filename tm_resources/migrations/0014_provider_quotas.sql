-- Provider quotas: what operators say by hand (a usage reading, a reset), the loop's hourly view of
-- each quota (the provider_quotas asset), and the settings operators change from the command line
-- (`tm mode`), which override tm.yaml.

-- `tm set-usage` (kind 'usage': value is a fraction of the limit when unit = 'fraction', else an
-- amount in the quota's unit) and `tm reset` (kind 'reset'). Usage after a reading adds to it.
CREATE TABLE quota_adjustments (
    id        bigserial PRIMARY KEY,
    ts        timestamptz NOT NULL DEFAULT now(),
    provider  text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('usage', 'reset')),
    value     double precision,
    unit      text CHECK (unit IN ('fraction', 'amount'))
);
CREATE INDEX quota_adjustments_provider_ts ON quota_adjustments (provider, ts DESC);

CREATE TABLE provider_quotas (
    hour           timestamptz NOT NULL,
    provider       text NOT NULL,
    source         text NOT NULL,
    quota_type     text NOT NULL,
    used           double precision NOT NULL,
    quota_limit    double precision,
    used_fraction  double precision,
    rate_per_h     double precision,
    window_start   timestamptz,
    reset_at       timestamptz,
    exhausts_at    timestamptz,
    exhausts_early timestamptz,
    exhausts_late  timestamptz,
    state          text NOT NULL,              -- ok | warning | critical | exhausted | unknown
    summary        text NOT NULL,
    forecast       jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (hour, provider)
);

CREATE TABLE tm_settings (
    name        text PRIMARY KEY,              -- 'loop.mode'
    value       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
