-- Every attempt a request made (fallbacks, key rotation, retries), in order, for the row that answered.
ALTER TABLE requests ADD COLUMN attempts jsonb;
