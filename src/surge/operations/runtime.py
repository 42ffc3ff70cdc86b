"""Operations' per-process state on the ``Runtime``, behind typed accessors."""

from __future__ import annotations

from surge.kit.runtime import Runtime
from surge.kit.security.sealing import Sealer
from surge.operations.errors import ProviderNotConfigured
from surge.operations.provider import ProviderClient


def provider_client(runtime: Runtime) -> ProviderClient:
    """The process's provider client (one httpx client per egress proxy)."""
    client = runtime.extensions.get("operations.provider")
    if client is None:
        url = runtime.settings.OPERATIONS_PROVIDER_URL
        if not url:
            raise ProviderNotConfigured("OPERATIONS_PROVIDER_URL is not set.")
        client = ProviderClient(url, timeout=runtime.settings.OPERATIONS_TIMEOUT.total_seconds())
        runtime.extensions["operations.provider"] = client
    assert isinstance(client, ProviderClient)
    return client


def sealer(runtime: Runtime) -> Sealer:
    """Fernet keyed from SECRET_KEY for account passwords and proxy URLs."""
    found = runtime.extensions.get("operations.sealer")
    if found is None:
        found = Sealer(runtime.settings.SECRET_KEY.get_secret_value(), purpose="operations")
        runtime.extensions["operations.sealer"] = found
    assert isinstance(found, Sealer)
    return found
