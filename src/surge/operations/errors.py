"""Operations' errors (the tree is drawn in ``surge.operations.service``'s docstring)."""

from __future__ import annotations

from surge.kit.errors import Conflict, NotFound, ServiceUnavailable, SurgeError, UnprocessableEntity


class OperationError(SurgeError):
    pass


class OperationNotFound(OperationError, NotFound):
    pass


class AccountNotFound(OperationError, NotFound):
    pass


class ProxyNotFound(OperationError, NotFound):
    pass


class InvalidOperation(OperationError, UnprocessableEntity):
    pass


class OperationKeyMismatch(OperationError, UnprocessableEntity):
    """The client's Idempotency-Key already made another operation."""


class DuplicateAccount(OperationError, Conflict):
    pass


class DuplicateProxy(OperationError, Conflict):
    pass


class NotInReview(OperationError, Conflict):
    pass


class ProviderNotConfigured(OperationError, ServiceUnavailable):
    pass


class RetryLater(Exception):
    """This attempt could not finish; the job is retried (its backoff) unless it was the last."""
