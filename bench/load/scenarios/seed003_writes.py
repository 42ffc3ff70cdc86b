"""``seed003`` with a 10 % write mix: plan changes that must invalidate every tier at once.

A write is the service caller (admin, MFA) setting the acting user's plan
(``PUT /api/admin/users/{id}/plan``), followed at once by that user's own
``GET /api/v1/me/privileges``, which must show the new plan: the follow-up may land on the
other web process, whose memory tier only learns of the change through kit.cache's pub/sub
invalidation, and the Redis tier must have dropped the entry too. A follow-up that shows the
old plan counts as an error (``stale after write``). The other 90 % are seed003's steps in
seed003's proportions.
"""

from __future__ import annotations

import random

import orjson

from bench.load.scenario import Call, Context, Step, User, bearer
from bench.load.scenarios import seed003

NAME = "seed003_writes"
THINK = seed003.THINK
PLANS = ("free", "plus", "pro", "ultra")
prepare = seed003.prepare
warm = seed003.warm


def write(user: User, rng: random.Random, ctx: Context) -> list[Call]:
    previous = ctx.state.get(user.id)
    plan = rng.choice([p for p in PLANS if p != previous])
    ctx.state[user.id] = plan
    headers = {**bearer(ctx.service_token), "Content-Type": "application/json"}
    body = orjson.dumps({"plan": plan})

    def shows_new_plan(status: int, content: bytes) -> str | None:
        return None if orjson.loads(content).get("plan") == plan else "stale after write"

    return [
        Call("PUT", f"/api/admin/users/{user.id}/plan", headers, body),
        Call("GET", "/api/v1/me/privileges", bearer(user.token), expect=shows_new_plan),
    ]


STEPS = [
    *(Step(s.name, s.weight * 0.9, s.build, s.static) for s in seed003.STEPS),
    Step("write", 10, write),
]
