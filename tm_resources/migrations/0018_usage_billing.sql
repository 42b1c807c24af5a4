-- What each roll-up row was billed, by the row's billing (migration 0016): the customer view's
-- included / overage / premium / local breakdown without reading the raw log.
ALTER TABLE usage_hourly
    ADD COLUMN included_cost_usd  double precision NOT NULL DEFAULT 0,  -- cost of included tokens (paid by the pool)
    ADD COLUMN included_billed_usd double precision NOT NULL DEFAULT 0, -- billed for them (0 inside a pool)
    ADD COLUMN overage_billed_usd double precision NOT NULL DEFAULT 0,
    ADD COLUMN premium_billed_usd double precision NOT NULL DEFAULT 0,
    ADD COLUMN local_billed_usd   double precision NOT NULL DEFAULT 0;
