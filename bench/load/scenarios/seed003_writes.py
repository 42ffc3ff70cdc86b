"""``seed003`` with a 10 % write mix: plan changes that must invalidate every tier at once.

A write is the service caller (admin, MFA) setting the acting user's plan
(``PUT /api/admin/users/{id}/plan``), followed at once by that user's own
``GET /api/v1/me/privileges``, which must show the new plan: the follow-up may land on the
other web process, whose memory tier only learns of the change through kit.cache's pub/sub
invalidation, and the Redis tier must have dropped the entry too. A follow-up that shows the
old plan counts as an error (``stale after write``). The other 90 % are seed003's steps in
seed003's proportions.

Only a write the server confirmed (a 2xx) is checked. A write refused under load (a 503 from
admission, a pool wait, a 429) changed nothing, so the follow-up that shows the old plan is
right; the generator still sends it (the load keeps its shape) but does not judge it: counting
it as stale mixed refused writes into the stale figure (the 974 of the run before this rule,
next to 2 356 ``write: HTTP 503``). A write whose answer never came (the user timed out) is
*unconfirmed*: it may still commit later, after a newer write of the same user. A follow-up
that shows such an unconfirmed plan is counted apart (``shows an unconfirmed earlier write``),
so the stale figure is only what a cache served after a confirmed change.
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
    known = ctx.state.get(user.id)  # the user's plan as of its last confirmed write
    plan = rng.choice([p for p in PLANS if p != known])
    #: Plans of this user's writes not (yet) confirmed by a 2xx: refused, or never answered.
    unconfirmed: set[str] = ctx.state.setdefault(f"unconfirmed:{user.id}", set())
    unconfirmed.add(plan)
    confirmed = False
    headers = {**bearer(ctx.service_token), "Content-Type": "application/json"}
    body = orjson.dumps({"plan": plan})

    def applied(status: int, content: bytes) -> str | None:
        # Called for an answer under 400 only (the generator counts the others as errors).
        nonlocal confirmed
        confirmed = True
        ctx.state[user.id] = plan
        unconfirmed.discard(plan)
        return None

    def shows_new_plan(status: int, content: bytes) -> str | None:
        if not confirmed:
            return None  # the write was refused: the old plan is the right answer
        shown = orjson.loads(content).get("plan")
        if shown == plan:
            return None
        if shown in unconfirmed:
            return "shows an unconfirmed earlier write"
        return "stale after write"

    return [
        Call("PUT", f"/api/admin/users/{user.id}/plan", headers, body, expect=applied),
        Call("GET", "/api/v1/me/privileges", bearer(user.token), expect=shows_new_plan),
    ]


STEPS = [
    *(Step(s.name, s.weight * 0.9, s.build, s.static) for s in seed003.STEPS),
    Step("write", 10, write),
]
