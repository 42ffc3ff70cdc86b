"""Logs, metrics and alerts: everything an operator reads."""
