"""The client's IP: ``X-Forwarded-For`` is believed only when the peer is a trusted proxy.

Anyone can send ``X-Forwarded-For: 1.2.3.4``; a limiter keyed on it unconditionally is
bypassed by rotating the header (fastify-rate-limit#7, slowapi#255). So the header is read
only when the TCP peer is in ``TRUSTED_PROXIES`` (IPs or CIDRs), and then from the right:
each trusted hop appended the address it saw, so the first untrusted address from the right
is the last one a proxy of ours vouched for. Everything left of it is the client's say-so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"


class ClientIpResolver:
    """Resolves the client IP of an ASGI scope against a fixed set of trusted proxies."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False)
            for entry in trusted_proxies
            if entry.strip()
        )

    def is_trusted(self, address: str) -> bool:
        ip = _parse(address)
        return ip is not None and any(ip in network for network in self.networks)

    def __call__(self, scope: Any) -> str:
        client = scope.get("client")
        peer = client[0] if client else UNKNOWN
        if not self.networks or not self.is_trusted(peer):
            return peer
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops += [hop.strip() for hop in value.decode("latin-1").split(",")]
        address = peer
        for hop in reversed(hops):
            if _parse(hop) is None:
                break  # garbage: stop at the last address a trusted hop gave us
            address = hop
            if not self.is_trusted(hop):
                break
        return _normalise(address)


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _normalise(address: str) -> str:
    ip = _parse(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def client_ip(scope: Any, trusted_proxies: Iterable[str]) -> str:
    """One-off form of ``ClientIpResolver(trusted_proxies)(scope)``."""
    return ClientIpResolver(trusted_proxies)(scope)


def ip_bucket(address: str) -> str:
    """The unit a per-IP limit counts: the address itself for IPv4, its /64 for IPv6 (one
    host usually owns a whole /64, RFC 6177, and can rotate through it at will)."""
    if ":" not in address:
        return address
    try:
        network = ipaddress.ip_network(f"{address}/64", strict=False)
    except ValueError:
        return address
    return str(network)
