"""What a scenario file is: weighted steps, each building the requests of one user action.

A scenario is a module in ``bench/load/scenarios/`` with ``NAME``, ``STEPS`` (a list of
``Step``), ``THINK`` (default mean think time, seconds) and ``prepare(target, options)``,
which makes the population on the server under test and returns the ``User`` list the
generator draws from (see ``scenarios/seed003.py``). A step's ``build`` is called at the
moment of the request (so a write can carry a fresh ``Idempotency-Key``) and returns one or
more ``Call``s, sent one after the other on the user's connection; a call's ``expect`` can
check the body (the write mix uses it to prove a plan change is visible at once).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class User:
    """One member of the population: an id, its bearer token (None: anonymous), extras."""

    id: str
    token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Call:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Checks the response body; returns an error label (counted as a failed request) or None.
    expect: Callable[[int, bytes], str | None] | None = None


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    weight: float
    build: Callable[[User, random.Random, Context], list[Call]]
    #: The calls depend on the user alone (no randomness, no state, no ``expect``): the
    #: generator builds their bytes once per user and reuses them (its per-request CPU is
    #: taken from the cores the server under test needs).
    static: bool = False


@dataclass(slots=True)
class Context:
    """What steps may share inside one generator process: the whole population (a service
    caller picks other users from it) and the service caller's token."""

    users: list[User]
    service_token: str | None
    state: dict[str, Any] = field(default_factory=dict)


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
