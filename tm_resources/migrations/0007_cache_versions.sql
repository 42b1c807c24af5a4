-- Replicas hold which contexts have semantic cache entries (cache.CacheContexts), so a request whose
-- context has none costs no lookup; they re-read it when the loop rewrites the entries.
CREATE TRIGGER cache_entries_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cache_entries
    FOR EACH STATEMENT EXECUTE FUNCTION tm_bump_state_version('cache_entries');
