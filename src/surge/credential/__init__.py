"""Service credentials: scoped API keys for server-to-server calls (issue 16)."""
