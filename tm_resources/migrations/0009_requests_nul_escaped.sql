-- Postgres text and jsonb cannot hold a NUL character. A row that had one is stored with every
-- string escaped (backslash -> \\, NUL -> \0) and marked here, so the original stays recoverable
-- (tm_gateway.requestlog.unescape_nul) and every request still leaves its row.
ALTER TABLE requests ADD COLUMN nul_escaped boolean NOT NULL DEFAULT false;
