"""Password hashing with Argon2id (argon2-cffi), rehashed on login when parameters change.

Hashing costs tens of milliseconds of CPU on purpose; the async methods run it in a thread
so one login does not stall every other request of the event loop. ``verify`` also burns the
same time for an unknown account (``verify_dummy``) so response time does not reveal which
e-mail addresses exist.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class PasswordHasher:
    """Argon2id with explicit parameters; the argon2-cffi defaults follow RFC 9106's second
    recommended option (t=3, m=64 MiB, p=4)."""

    def __init__(
        self, *, time_cost: int = 3, memory_cost: int = 65536, parallelism: int = 4
    ) -> None:
        self._hasher = _Argon2(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID
        )
        self._dummy = self._hasher.hash("surge-dummy-password-for-timing")

    def hash_sync(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify_sync(self, stored: str, password: str) -> tuple[bool, str | None]:
        """``(ok, new_hash)``: ``new_hash`` is set when ``stored`` used older parameters."""
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, None
        if self._hasher.check_needs_rehash(stored):
            return True, self._hasher.hash(password)
        return True, None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hash_sync, password)

    async def verify(self, stored: str, password: str) -> tuple[bool, str | None]:
        return await asyncio.to_thread(self.verify_sync, stored, password)

    async def verify_dummy(self, password: str) -> None:
        """Spend one verification's time for an account that does not exist."""
        await asyncio.to_thread(self.verify_sync, self._dummy, password)
