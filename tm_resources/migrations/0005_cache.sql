-- The response cache. Exact hits are found in `requests` by the hash of the whole request; semantic
-- hits in `cache_entries`, which the loop fills (an asset like the others, rebuilt from `requests`
-- and `scored_requests`) with the answers that scored well, one row per answer. Vectors are halfvec:
-- half the size, and the embedded server's pgvector can compute their distances on any x86-64 CPU
-- (its `vector` distances need AVX-512). The HNSW index is created by db.migrate where the server
-- can run it (tm_resources/db.py: ensure_vector_indexes).

ALTER TABLE requests ADD COLUMN request_hash text;       -- sha256 of model + system + messages + params
ALTER TABLE requests ADD COLUMN context_hash text;       -- the same without the last user turn and sampling
ALTER TABLE requests ADD COLUMN cache_hit text;          -- 'exact' | 'semantic': answered from the cache
ALTER TABLE requests ADD COLUMN cache_source_id uuid;    -- the request whose answer was served
ALTER TABLE requests ADD COLUMN cache_similarity real;   -- cosine similarity of the prompts (semantic)
CREATE INDEX requests_request_hash ON requests (request_hash, ts) WHERE request_hash IS NOT NULL;

CREATE TABLE cache_entries (
    hour             timestamptz NOT NULL,
    request_id       uuid PRIMARY KEY,
    ts               timestamptz NOT NULL,
    user_id          text NOT NULL,
    requested_model  text NOT NULL,
    context_hash     text NOT NULL,
    model            text,
    quality          double precision NOT NULL,
    prompt_embedding halfvec(384) NOT NULL
);
CREATE INDEX cache_entries_hour ON cache_entries (hour);
CREATE INDEX cache_entries_ts ON cache_entries (ts);
CREATE INDEX cache_entries_lookup ON cache_entries (context_hash, requested_model, ts);
