"""Shared clients and domain code for Token Machine's gateway and its loop."""
