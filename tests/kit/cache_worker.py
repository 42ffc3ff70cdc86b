"""A cache in its own process, driven by JSON lines on stdin (for tests/kit/test_cache_multiprocess.py).

``python -m tests.kit.cache_worker REDIS_URL NAMESPACE`` prints ``{"ready": true}`` and then answers each
command line with one JSON line. Loaders count their calls in Redis (``INCR loads:KEY``) so the
test can add them up across processes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as redis_async
import structlog

from surge.kit.cache import Cache
from surge.kit.redis import RedisGateway


async def _wait_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def handle(cache: Cache, counter: redis_async.Redis, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    key = cmd.get("key", "")

    async def loader() -> Any:
        if cmd.get("count", True):  # the Redis-down test's loader must not need Redis
            await counter.incr(f"loads:{key}")
        await asyncio.sleep(cmd.get("load_s", 0.0))
        return cmd.get("value")

    if op == "stampede":
        await _wait_until(cmd["at"])
        results = await asyncio.gather(
            *[cache.get_or_load(key, loader, tags=cmd.get("tags", ())) for _ in range(cmd["n"])]
        )
        return {"distinct": sorted({json.dumps(r) for r in results})}
    if op == "load":
        result = await cache.fetch(key, loader, tags=cmd.get("tags", ()))
        return {"value": result.value, "source": result.source, "stale": result.stale}
    if op == "in_l1":
        return {"in_l1": key in cache.l1}
    if op == "wait_drop":
        # Poll this process's L1 until the entry is gone; report when (wall clock).
        deadline = time.monotonic() + cmd.get("timeout", 5.0)
        while key in cache.l1 and time.monotonic() < deadline:  # noqa: ASYNC110 (measuring)
            await asyncio.sleep(0.0005)
        return {"dropped": key not in cache.l1, "at": time.time()}
    if op == "delete":
        started = time.time()
        await cache.delete(key)
        return {"at": started}
    if op == "invalidate_tags":
        await cache.invalidate_tags(*cmd["tags"])
        return {}
    if op == "stats":
        return {"stats": cache.stats(), "redis_up": cache.gateway.is_up}
    if op == "clear":
        await cache.clear()
        return {}
    raise ValueError(f"unknown op {op!r}")


async def main(url: str, namespace: str) -> None:
    # stdout is the command channel: logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    gateway = RedisGateway(url)
    cache = Cache(gateway, name="worker", namespace=namespace, resync_interval=0.2)
    counter = redis_async.Redis.from_url(url)
    await cache.start()
    loop = asyncio.get_running_loop()
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            try:
                reply = await handle(cache, counter, json.loads(line))
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await cache.close()
        await counter.aclose()
        await gateway.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
