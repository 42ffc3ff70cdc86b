"""HTTP plumbing shared by every router: problem+json errors, the request middleware,
client IP resolution, pagination and idempotency helpers."""
