"""The root of every error Surge raises on purpose.

    SurgeError                      status 500 unless a subclass says otherwise
    ├── BadRequest                  400
    ├── NotAuthenticated            401
    ├── Forbidden                   403
    ├── NotFound                    404
    ├── Conflict                    409
    ├── PayloadTooLarge             413
    ├── UnprocessableEntity         422
    ├── TooManyRequests             429 (+ Retry-After)
    └── ServiceUnavailable          503 (+ Retry-After)
        └── DependencyUnavailable   a server Surge needs is down

Domain packages derive their own base (``class OrdersError(SurgeError)``) and specific
subclasses carry their status. ``surge.kit.web.problem`` renders any of them as RFC 9457
``application/problem+json``; anything else that escapes a handler is a bug and becomes 500
with no detail sent to the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class SurgeError(Exception):
    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code  # type: ignore[misc]
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    @property
    def type_slug(self) -> str:
        """Stable machine-readable name used in the problem ``type`` URI."""
        name = type(self).__name__
        out = []
        for index, char in enumerate(name):
            if char.isupper() and index:
                out.append("-")
            out.append(char.lower())
        return "".join(out).removesuffix("-error")


class BadRequest(SurgeError):
    status_code = 400
    title = "Bad Request"


class NotAuthenticated(SurgeError):
    status_code = 401
    title = "Unauthorized"

    def __init__(self, message: str = "Authentication required", **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(SurgeError):
    status_code = 403
    title = "Forbidden"


class NotFound(SurgeError):
    status_code = 404
    title = "Not Found"


class Conflict(SurgeError):
    status_code = 409
    title = "Conflict"


class PayloadTooLarge(SurgeError):
    status_code = 413
    title = "Content Too Large"


class UnprocessableEntity(SurgeError):
    status_code = 422
    title = "Unprocessable Content"


class TooManyRequests(SurgeError):
    status_code = 429
    title = "Too Many Requests"

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        super().__init__(message, headers=headers, **kwargs)


class ServiceUnavailable(SurgeError):
    status_code = 503
    title = "Service Unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("Retry-After", str(retry_after))
        super().__init__(message, headers=headers, **kwargs)


class DependencyUnavailable(ServiceUnavailable):
    """A server Surge depends on (PostgreSQL, Redis, an upstream) cannot be reached."""
