"""The cheapest open-loop scenario: anonymous ``GET /livez`` (the harness's own floor)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from bench.load.scenario import Call, Context, Step, User

NAME = "ping"
THINK = 5.0


def livez(user: User, rng: random.Random, ctx: Context) -> list[Call]:
    return [Call("GET", "/livez")]


STEPS = [Step("livez", 1, livez)]


async def prepare(
    database_url: str,
    settings: Any,
    *,
    population: int,
    signed_in: int,
    seed: int,
    progress: Callable[[str, int, int], None],
) -> tuple[list[User], list[User], str | None]:
    users = [User(str(i)) for i in range(signed_in)]
    progress("users", signed_in, signed_in)
    return users, users, None
