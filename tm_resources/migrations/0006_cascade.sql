-- Cascades: the cheap model's answer that the gate refused keeps its own row (served = false); the
-- answer the user got names it in parent_id. Every other row is the answer its user got.
ALTER TABLE requests ADD COLUMN served boolean NOT NULL DEFAULT true;
