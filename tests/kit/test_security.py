"""kit.security without any server: token memo and expiry, Argon2id rehash, TOTP replay
window, backup codes."""

from __future__ import annotations

import time

import pytest

from surge.kit.security import (
    BackupCodes,
    InvalidToken,
    KeyRing,
    PasswordHasher,
    TokenCodec,
    Totp,
    hash_token,
    new_opaque_token,
)
from tests.fixtures.clock import Clock

SUB = "00000000-0000-0000-0000-000000000001"


def _codec(ttl: float = 900, leeway: float = 0, clock: Clock | None = None) -> TokenCodec:
    return TokenCodec(
        KeyRing.derived("k" * 40), issuer="surge", audience="surge-api", ttl=ttl, leeway=leeway,
        clock=clock or time.time,
    )  # fmt: skip


class TestTokenCodec:
    def test_round_trip_has_registered_claims(self) -> None:
        codec = _codec()
        claims = codec.verify(codec.issue(SUB, {"sid": "s", "iss": "attacker"}))
        assert claims["sub"] == SUB
        assert claims["iss"] == "surge"  # extra claims cannot override registered ones
        assert claims["exp"] - claims["iat"] == 900

    def test_memoised_token_still_expires(self) -> None:
        clock = Clock()
        codec = _codec(ttl=60, clock=clock)
        token = codec.issue(SUB, {})
        codec.verify(token)  # memoised now
        assert token in codec._memo
        clock.now += 59
        assert codec.verify(token)["sub"] == SUB
        clock.now += 1
        with pytest.raises(InvalidToken, match="expired"):
            codec.verify(token)
        assert token not in codec._memo

    def test_expiry_and_not_before_follow_the_codecs_clock(self) -> None:
        clock = Clock()
        codec = _codec(ttl=60, leeway=5, clock=clock)
        token = codec.issue(SUB, {})
        clock.now += 64  # within the leeway
        assert codec._verify(token)["sub"] == SUB
        clock.now += 1
        with pytest.raises(InvalidToken, match="expired"):
            codec._verify(token)
        clock.now -= 65 + 6  # issued 6 s in the future: beyond the leeway
        with pytest.raises(InvalidToken, match="not yet valid"):
            codec._verify(token)

    def test_memo_is_bounded(self) -> None:
        codec = _codec()
        codec.memo_size = 3
        tokens = [codec.issue(SUB, {"n": n}) for n in range(5)]
        for token in tokens:
            codec.verify(token)
        assert list(codec._memo) == tokens[2:]

    def test_failed_verification_is_not_memoised(self) -> None:
        codec = _codec()
        with pytest.raises(InvalidToken):
            codec.verify("a.b.c")
        assert not codec._memo

    def test_a_token_of_another_type_or_purpose_is_refused(self) -> None:
        """Explicit typing (RFC 8725 §3.11) and a key per purpose: a second kind of token
        built on the codec never passes for the first, even under the same secret."""
        access = _codec()
        other = TokenCodec(
            KeyRing.derived("k" * 40, "k0", purpose="other"), issuer="surge",
            audience="surge-api", ttl=900, token_type="other+jwt",
        )  # fmt: skip
        same_key = TokenCodec(
            KeyRing.derived("k" * 40), issuer="surge", audience="surge-api", ttl=900,
            token_type="other+jwt",
        )  # fmt: skip
        assert other.verify(other.issue(SUB, {}))["sub"] == SUB
        assert KeyRing.derived("k" * 40).current != other.ring.current
        for token in (other.issue(SUB, {}), same_key.issue(SUB, {})):
            with pytest.raises(InvalidToken, match="Not an access token"):
                access.verify(token)
        with pytest.raises(InvalidToken):
            other.verify(access.issue(SUB, {}))
        with pytest.raises(InvalidToken, match="Invalid or expired"):
            # the right typ, the other purpose's key under the same kid: the MAC fails
            same_key.verify(other.issue(SUB, {}))

    def test_key_ring_parse(self) -> None:
        ring = KeyRing.parse(" new = " + "n" * 32 + " , old=" + "o" * 32)
        assert ring.current == ("new", b"n" * 32)
        assert ring.get("old") == b"o" * 32
        assert ring.get("gone") is None
        with pytest.raises(ValueError, match="pairs"):
            KeyRing.parse("no-equals-sign")

    def test_opaque_tokens(self) -> None:
        token = new_opaque_token()
        assert len(token) >= 43
        assert hash_token(token) == hash_token(token) != hash_token(new_opaque_token())


class TestPasswords:
    def test_verify_and_rehash_on_parameter_change(self) -> None:
        old = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        stored = old.hash_sync("hunter2hunter2")
        assert old.verify_sync(stored, "hunter2hunter2") == (True, None)
        assert old.verify_sync(stored, "wrong") == (False, None)
        assert old.verify_sync("not-a-hash", "x") == (False, None)
        new = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
        ok, rehashed = new.verify_sync(stored, "hunter2hunter2")
        assert ok
        assert rehashed is not None
        assert rehashed.startswith("$argon2id$")
        assert "t=2" in rehashed
        assert new.verify_sync(rehashed, "hunter2hunter2") == (True, None)


class TestTotp:
    def test_replay_and_window(self) -> None:
        totp = Totp(issuer="Surge")
        secret = totp.new_secret()
        now = 1_800_000_000.0
        code = totp.now(secret, at=now)
        step = totp.verify(secret, code, last_step=None, at=now)
        assert step == int(now) // 30
        assert totp.verify(secret, code, last_step=step, at=now) is None  # replay
        # The previous step's code is accepted once (clock skew), never after a newer one.
        previous = totp.now(secret, at=now - 30)
        assert totp.verify(secret, previous, last_step=None, at=now) == step - 1
        assert totp.verify(secret, previous, last_step=step, at=now) is None
        # Two steps away is refused.
        assert totp.verify(secret, totp.now(secret, at=now - 90), last_step=None, at=now) is None
        assert totp.verify(secret, "12345", last_step=None, at=now) is None
        assert totp.provisioning_uri(secret, "a@b.cd").startswith("otpauth://totp/Surge:")


class TestBackupCodes:
    def test_codes_match_once_normalised(self) -> None:
        codes = BackupCodes(b"server-key")
        plain = codes.generate()
        assert len(plain) == 10
        assert len(set(plain)) == 10
        stored = [codes.digest(c) for c in plain]
        spaced = plain[3][:5].lower() + "-" + plain[3][5:].lower()
        matched = codes.match(spaced, stored)
        assert matched == stored[3]
        stored.remove(matched)
        assert codes.match(plain[3], stored) is None
        assert BackupCodes(b"other-key").match(plain[0], stored) is None
