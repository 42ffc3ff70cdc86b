"""kit.cache across real processes: each worker is ``python -m tests.kit.cache_worker`` with its
own event loop, Redis pool and L1, talking to the suite's real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fixtures.servers import start_redis

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, url: str, namespace: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kit.cache_worker", url, namespace],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "SURGE_LOG_LEVEL": "WARNING"},
            text=True,
        )
        assert self.read() == {"ready": True}

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.poll()}"
        reply: dict[str, Any] = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture(scope="module")
def workers(server_urls: tuple[str, str]) -> Iterator[tuple[Worker, Worker]]:
    namespace = f"test:mp:{uuid.uuid4().hex[:6]}"
    a, b = Worker(server_urls[1], namespace), Worker(server_urls[1], namespace)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def counter(server_urls: tuple[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server_urls[1])
    try:
        yield client
    finally:
        client.close()


def _key() -> str:
    return f"mp-{uuid.uuid4().hex[:8]}"


class TestStampede:
    def test_1000_concurrent_misses_over_two_processes_load_at_most_twice(
        self, workers: tuple[Worker, Worker], counter: redis.Redis
    ) -> None:
        a, b = workers
        key = _key()
        at = time.time() + 0.3  # both start together
        for w in workers:
            w.send(op="stampede", key=key, n=500, at=at, value={"v": 1}, load_s=0.2)
        replies = [a.read(), b.read()]
        loads = int(counter.get(f"loads:{key}") or 0)
        assert 1 <= loads <= 2, loads
        # The lease makes the second process wait for the first one's value: one load.
        assert loads == 1, f"expected the lease to serialise the load, got {loads}"
        assert replies[0]["distinct"] == replies[1]["distinct"] == [json.dumps({"v": 1})]


class TestInvalidation:
    def test_delete_on_one_process_drops_the_other_l1_within_100ms(
        self, workers: tuple[Worker, Worker]
    ) -> None:
        a, b = workers
        key = _key()
        assert b.call(op="load", key=key, value="old")["source"] == "loader"
        assert b.call(op="in_l1", key=key)["in_l1"] is True
        latencies = []
        for _ in range(3):
            b.call(op="load", key=key, value="old")
            b.send(op="wait_drop", key=key)
            time.sleep(0.05)  # b is polling its L1 now
            sent = a.call(op="delete", key=key)["at"]
            dropped = b.read()
            assert dropped["dropped"] is True
            latencies.append(dropped["at"] - sent)
        assert sorted(latencies)[1] < 0.1, latencies
        assert b.call(op="load", key=key, value="new")["value"] == "new"

    def test_tag_invalidation_reaches_the_other_process(
        self, workers: tuple[Worker, Worker]
    ) -> None:
        a, b = workers
        key = _key()
        assert b.call(op="load", key=key, value="v1", tags=["grp"])["value"] == "v1"
        assert a.call(op="load", key=key, value="ignored", tags=["grp"])["source"] == "l2"
        a.call(op="invalidate_tags", tags=["grp"])
        for w in workers:
            reply = w.call(op="load", key=key, value="v2", tags=["grp"])
            assert reply["value"] == "v2"

    def test_clear_reaches_the_other_process(self, workers: tuple[Worker, Worker]) -> None:
        a, b = workers
        key = _key()
        assert b.call(op="load", key=key, value="v1")["value"] == "v1"
        a.call(op="clear")
        deadline = time.monotonic() + 1.0
        while b.call(op="in_l1", key=key)["in_l1"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.call(op="in_l1", key=key)["in_l1"] is False
        assert b.call(op="load", key=key, value="v2") == {
            "value": "v2",
            "source": "loader",
            "stale": False,
        }


@pytest.mark.chaos
class TestRedisDown:
    def test_redis_stopped_mid_test_no_process_sees_an_error(self, tmp_path: Path) -> None:
        server = start_redis(tmp_path / "redis")
        namespace = f"test:down:{uuid.uuid4().hex[:6]}"
        a, b = Worker(server.url, namespace), Worker(server.url, namespace)
        try:
            keys = [f"k{i}" for i in range(5)]
            for key in keys:
                assert a.call(op="load", key=key, value=key, count=False)["source"] == "loader"
                assert b.call(op="load", key=key, value="unused", count=False)["source"] == "l2"
            server.stop()
            # Every reply is checked for an error by Worker.read: none may come back.
            for key in keys:
                assert a.call(op="load", key=key, value="unused", count=False)["value"] == key
                assert b.call(op="load", key=key, value="unused", count=False)["value"] == key
            assert a.call(op="load", key="fresh", value="db-a", count=False)["source"] == "loader"
            assert b.call(op="load", key="fresh", value="db-b", count=False)["value"] == "db-b"
            a.call(op="delete", key="k0")  # queued, replayed when Redis is back
            assert a.call(op="stats")["stats"]["degraded"] is True

            server.start()  # same port
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                states = [w.call(op="stats") for w in (a, b)]
                if all(s["redis_up"] and not s["stats"]["degraded"] for s in states):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"no recovery: {states}")
            # The delete made while Redis was down reached L2 and b's L1 once Redis came back.
            deadline = time.monotonic() + 5
            while b.call(op="load", key="k0", value="new", count=False)["value"] != "new":
                assert time.monotonic() < deadline, "the queued delete was not replayed"
                time.sleep(0.05)
            a.call(op="load", key="after", value="v", count=False)
            assert b.call(op="load", key="after", value="unused", count=False) == {
                "value": "v",
                "source": "l2",
                "stale": False,
            }
        finally:
            a.stop()
            b.stop()
            server.stop()
