"""The admin console: fleet metrics, cache clearing, and the dashboard page (``GET /admin``).

The other admin endpoints live with what they administer (jobs, breakers, withdrawals,
plans, audit log); all of them sit behind ``require_admin_mfa``.
"""
