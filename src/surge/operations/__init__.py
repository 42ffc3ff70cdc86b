"""Reseller operations through the upstream provider (issue 13, seed 000)."""
