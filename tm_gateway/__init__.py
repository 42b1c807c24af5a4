"""The Token Machine gateway: an OpenAI- and Anthropic-compatible front door that routes, falls back and logs."""
