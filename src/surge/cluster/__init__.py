"""`surge cluster up|down|status`: Surge on a real HA topology inside one machine (issue 18).

``topology`` holds the hosts and every server's configuration (pure), ``control`` builds the
network namespaces and starts, probes, breaks and removes the processes, ``commands`` is
the thin Typer sub-app registered in ``surge.cli``. See ADR 0022 and docs/scaling.md.
"""
