-- A dry run (export and validate the training data) needs no weights: its version may have no base path.
ALTER TABLE model_versions ALTER COLUMN base_path DROP NOT NULL;
