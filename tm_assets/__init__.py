"""The Token Machine loop: Dagster assets that turn the request log into routing rules."""
