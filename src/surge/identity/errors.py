"""Identity's errors (the tree is drawn in ``surge.identity.service``)."""

from __future__ import annotations

from surge.kit.errors import Conflict, NotAuthenticated, SurgeError


class IdentityError(SurgeError):
    """Base of identity's own errors."""


class InvalidCredentials(IdentityError, NotAuthenticated):
    status_code = 401
    title = "Unauthorized"


class MfaRequired(IdentityError, NotAuthenticated):
    status_code = 401
    title = "Unauthorized"


class EmailTaken(IdentityError, Conflict):
    status_code = 409
    title = "Conflict"


class UnknownPlan(IdentityError):
    status_code = 422
    title = "Unprocessable Content"
