"""Notifications: the transactional e-mail outbox (ADR 0019)."""
