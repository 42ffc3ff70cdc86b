"""Administration: fleet metrics, cache clearing, and the operator's console (``GET /admin``,
``surge.admin.console``).

The other admin endpoints live with what they administer (jobs, breakers, withdrawals,
plans, audit log); all of them sit behind ``require_admin_mfa``.
"""
