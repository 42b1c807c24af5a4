-- The judge's task-completion rate per pattern: the decision engine's measure of right answers.
ALTER TABLE patterns ADD COLUMN judged integer NOT NULL DEFAULT 0;   -- rows with a judge verdict
ALTER TABLE patterns ADD COLUMN avg_completion double precision;
