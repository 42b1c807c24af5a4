-- Operator rules: overrides an operator applied (`tm optimize --apply`, the MCP optimize tool), which
-- the gateway obeys beside the loop's routing_rules. They are not derived from `requests` and not
-- an asset: the hourly loop rewrites its own rules and never touches these. Reverting keeps the row
-- (reverted_at), so `tm rules --all` can say what was tried and undone.
CREATE TABLE operator_rules (
    id           bigserial PRIMARY KEY,           -- shown as 'op-<id>': `tm rules revert op-3`
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,                   -- the operator (OS user, or the admin key's user over MCP)
    action       text NOT NULL DEFAULT 'override',
    agent        text,                            -- whose work it steers: an agent (x-tm-agent) ...
    user_id      text,                            -- ... or a user's own requests
    task_type    text,                            -- NULL: every task type
    model        text,                            -- what the work went to when the rule was written
    target_model text NOT NULL,                   -- where it goes now
    reason       text NOT NULL,
    evidence     jsonb NOT NULL DEFAULT '{}'::jsonb,
    reverted_at  timestamptz,
    reverted_by  text,
    CHECK ((agent IS NULL) <> (user_id IS NULL))
);
-- One rule in force per (agent or user, task type): applying again replaces, never stacks.
CREATE UNIQUE INDEX operator_rules_in_force ON operator_rules
    (coalesce(agent, ''), coalesce(user_id, ''), coalesce(task_type, '')) WHERE reverted_at IS NULL;
CREATE TRIGGER operator_rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON operator_rules
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('operator_rules');
