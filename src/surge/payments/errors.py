"""Payments' errors (the tree is drawn in ``surge.payments.service``'s docstring)."""

from __future__ import annotations

from surge.kit.errors import BadRequest, Conflict, NotFound, SurgeError, UnprocessableEntity


class PaymentError(SurgeError):
    """Root of the payments domain's errors."""


class TopupNotFound(PaymentError, NotFound):
    pass


class TopupOutOfBounds(PaymentError, UnprocessableEntity):
    pass


class TopupKeyMismatch(PaymentError, UnprocessableEntity):
    pass


class EventNotFound(PaymentError, NotFound):
    pass


class EventNotDead(PaymentError, Conflict):
    pass


class ProviderRejected(PaymentError):
    status_code = 502
    title = "Bad Gateway"


class InvalidEvent(PaymentError, BadRequest):
    """A signed body that is not a provider event."""


class PermanentEventError(Exception):
    """Processing this event can never succeed (dead-lettered at once)."""
