"""kit.security.webhooks: Stripe's signature scheme over the raw body."""

from __future__ import annotations

import pytest

from surge.kit.security.webhooks import InvalidSignature, compute, header, parse, verify

BODY = b'{"id":"evt_1","type":"payment_intent.succeeded"}'
NOW = 1_800_000_000


def clock() -> float:
    return float(NOW)


class TestVerify:
    def test_valid_signature_returns_its_timestamp(self) -> None:
        assert verify(BODY, header(["s1"], BODY, NOW), ["s1"], now=clock) == NOW

    def test_any_v1_against_any_secret_during_rotation(self) -> None:
        signed = header(["new", "old"], BODY, NOW)
        assert verify(BODY, signed, ["old"], now=clock) == NOW
        assert verify(BODY, signed, ["other", "new"], now=clock) == NOW
        assert verify(BODY, header(["old"], BODY, NOW), ["new", "old"], now=clock) == NOW

    @pytest.mark.parametrize(
        ("signature", "secrets", "reason"),
        [
            (None, ["s1"], "missing"),
            ("", ["s1"], "missing"),
            ("t=12x,v1=00", ["s1"], "malformed"),
            (f"t={NOW}", ["s1"], "malformed"),
            ("v1=" + "0" * 64, ["s1"], "malformed"),
            ("t=" + "9" * 20 + ",v1=00", ["s1"], "malformed"),
            ("x" * 5000, ["s1"], "malformed"),
            (header(["s2"], BODY, NOW), ["s1"], "mismatch"),
            (header(["s1"], BODY, NOW - 301), ["s1"], "too_old"),
            (header(["s1"], BODY, NOW + 301), ["s1"], "too_new"),
            (f"t={NOW},v0={compute('s1', NOW, BODY)}", ["s1"], "malformed"),
        ],
    )
    def test_refused(self, signature: str | None, secrets: list[str], reason: str) -> None:
        with pytest.raises(InvalidSignature) as info:
            verify(BODY, signature, secrets, now=clock)
        assert info.value.reason == reason
        assert info.value.status_code == 400

    def test_tolerance_edges(self) -> None:
        assert verify(BODY, header(["s"], BODY, NOW - 300), ["s"], now=clock) == NOW - 300
        assert verify(BODY, header(["s"], BODY, NOW - 10), ["s"], tolerance=10, now=clock)

    def test_the_signature_covers_the_timestamp_and_every_byte(self) -> None:
        signed = header(["s"], BODY, NOW)
        forged_time = signed.replace(f"t={NOW}", f"t={NOW + 1}")
        with pytest.raises(InvalidSignature):
            verify(BODY, forged_time, ["s"], now=clock)
        with pytest.raises(InvalidSignature):
            verify(BODY + b" ", signed, ["s"], now=clock)

    def test_parse(self) -> None:
        assert parse("t=5, v1=aa ,v1=bb,other=zz") == (5, ["aa", "bb"])
