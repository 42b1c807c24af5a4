-- Admin keys: sign in to the dashboard's team-wide pages and call the MCP tools that change things.
-- An ordinary key sees only its own (or its team's) usage.
ALTER TABLE api_keys ADD COLUMN admin boolean NOT NULL DEFAULT false;
