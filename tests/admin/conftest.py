"""The admin tests use identity's app and helpers (cheap Argon2, admin with MFA)."""

from tests.identity.conftest import api, id_app, id_settings

__all__ = ["api", "id_app", "id_settings"]
