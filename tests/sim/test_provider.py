"""The provider simulator's lost replies: ``drop_schedule`` drops exactly the renewals it
names (in the order the provider performs them) after doing the work, whatever the random
``drop_rate`` draws, so a test can count on its lost replies however fast the machine is."""

from __future__ import annotations

from urllib.parse import urlencode

from surge.sim.provider import Config, Provider, Session, _csrf


async def renew(provider: Provider, sid: str, card: str, reference: str) -> int:
    body = urlencode({
        "card": card, "package": "basic", "months": "1", "reference": reference,
        "csrf": _csrf(sid),
    }).encode()  # fmt: skip
    reply = await provider.handle("POST", "/renew", {"cookie": f"sid={sid}"}, body, "127.0.0.2")
    return reply.status


def signed_in(provider: Provider) -> str:
    sid = "test-session"
    provider.sessions[sid] = Session(user="agent", ip="127.0.0.2", last_seen=1e18)
    return sid


async def test_scheduled_renewals_are_performed_and_their_replies_dropped() -> None:
    provider = Provider(config=Config(drop_schedule=[2, 5], idle_timeout=1e18))
    sid = signed_in(provider)
    statuses = [await renew(provider, sid, f"12345678{n:02d}", f"ref-{n}") for n in range(1, 7)]
    assert statuses == [200, 0, 200, 200, 0, 200]  # 0: the connection is dropped, no reply
    assert [p["reference"] for p in provider.performed] == [f"ref-{n}" for n in range(1, 7)]
    assert provider.state()["renewals"] == 6


async def test_refused_renewals_are_not_counted_by_the_schedule() -> None:
    provider = Provider(config=Config(drop_schedule=[1], idle_timeout=1e18))
    sid = signed_in(provider)
    assert await renew(provider, sid, "bad-card", "ref-0") == 200  # refused: nothing done
    assert await renew(provider, sid, "1234567890", "ref-1") == 0  # the first performed
    assert await renew(provider, sid, "1234567890", "ref-2") == 200


async def test_the_random_drops_still_apply_beside_the_schedule() -> None:
    provider = Provider(config=Config(drop_rate=1.0, drop_schedule=[1], idle_timeout=1e18))
    sid = signed_in(provider)
    assert [await renew(provider, sid, "1234567890", f"r{n}") for n in range(3)] == [0, 0, 0]
