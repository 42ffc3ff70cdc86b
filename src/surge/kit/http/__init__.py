"""Outbound HTTP: one client with timeouts, jittered retries, a breaker per target and an
egress proxy pool with block detection and failover (see ``client`` and ``proxies``)."""

from surge.kit.http.client import (
    OutboundClient,
    OutboundError,
    OutboundTimeout,
    ProxyBlocked,
    ProxyUnavailable,
    client_from_settings,
)
from surge.kit.http.proxies import NoProxyAvailable, Proxy, ProxyPool

__all__ = [
    "NoProxyAvailable",
    "OutboundClient",
    "OutboundError",
    "OutboundTimeout",
    "Proxy",
    "ProxyBlocked",
    "ProxyPool",
    "ProxyUnavailable",
    "client_from_settings",
]
