"""The admin tests use identity's app (cheap Argon2) and the shared factories."""

from tests.identity.conftest import app_settings, id_app, id_settings

__all__ = ["app_settings", "id_app", "id_settings"]
