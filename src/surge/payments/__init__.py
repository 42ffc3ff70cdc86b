"""Payments: top-ups through a payment provider with signed webhooks (ADR 0018)."""
