"""``surge load SCENARIO``: servers, population, Surge, open-loop users, figures, report.

One command reproduces a run: an embedded PostgreSQL and Redis in a temporary folder, the
migrations, the scenario's population, Surge started the way production starts it
(``surge serve``: uvicorn, uvloop, httptools, N processes, the keep-alive and backlog
settings), then ``users`` open-loop users over a ramp and a steady phase, ``/metrics``
scraped every second (cache tiers, pool use and waits). The last stdout line is the bench
protocol's JSON (``bench/results/load-SCENARIO.json``); an HTML report with inline SVG plots
goes beside it (``bench/results/load-SCENARIO.html``), readable offline.

``--capacity``: the highest arrival rate that still meets the targets (p95, p99, errors,
served = offered), by doubling from the requested rate until a step fails, then bisection;
each step is a short steady run against the same (warm) server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bench.common import console, report, results_path
from bench.load import html
from bench.load.cpu import CpuMeter, Sample, per_request
from bench.load.engine import NO_ANSWER, load_scenario
from bench.load.runner import open_run, summarize, timeline
from bench.load.scenario import User

ROOT = Path(__file__).resolve().parents[2]
#: Limits nobody reaches in a load run: the limiter still decides every request (its Redis
#: round trip is part of what is measured), but a user thinking 2 s would otherwise spend
#: seed 004's 300 per 15 min, and the service caller sends hundreds a second.
HIGH_LIMITS = [
    {"name": "load-subject", "limit": 10**8, "period": "PT1H", "per": "subject"},
    {"name": "load-ip", "limit": 10**8, "period": "PT1H", "per": "ip"},
]
#: Seed 003's reported figures: the targets (and the bench's baseline).
SEED003 = {"p95_ms": 120.0, "p99_ms": 250.0, "error_rate": 0.0005, "cache_hit_ratio": 0.96}


@dataclass
class Options:
    scenario: str = "seed003"
    users: int = 10_000
    population: int = 300_000
    think: float = 5.0
    duration: float = 60.0
    ramp: float = 20.0
    processes: int = 2
    workers: int = 2
    seed: int = 3
    capacity: bool = False
    step_duration: float = 30.0
    #: Before the run, the scenario's ``warm`` (if any) puts the cache tiers in steady state.
    warm_cache: bool = False
    targets: dict[str, float] = field(default_factory=lambda: dict(SEED003))
    server_env: dict[str, str] = field(default_factory=dict)


# ---- /metrics scraping ----------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{"name{labels}": value}`` for the series the report plots."""
    wanted = ("surge_privilege_lookups_total", "surge_privilege_batch_lookups_total",
              "cache_hits_total", "cache_misses_total", "db_pool_checked_out", "db_pool_waiting", "db_pool_connections",
              "cache_stale_served_total", "http_requests_in_flight",
              "process_gc_seconds_total", "process_gc_collections_total")  # fmt: skip
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(wanted):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


class Scraper:
    """``/metrics`` every ``interval`` seconds in a thread, stamped with the run's clock,
    and the CPU time of each role (``cpu``) at the same moments."""

    def __init__(self, base: str, interval: float = 1.0, cpu: CpuMeter | None = None) -> None:
        self.base = base
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.cpu = cpu
        self.cpu_samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.zero = time.time()

    def start(self, zero: float) -> None:
        self.zero = zero
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                if self.cpu is not None:
                    self.cpu_samples.append(self.cpu.sample(time.time() - self.zero))
                try:
                    text = client.get(f"{self.base}/metrics").text
                    self.samples.append((time.time() - self.zero, parse_metrics(text)))
                except httpx.HTTPError:
                    pass
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _sum(sample: dict[str, float], prefix: str, label: str = "") -> float:
    return sum(v for k, v in sample.items() if k.startswith(prefix) and label in k)


def cache_figures(
    samples: list[tuple[float, dict[str, float]]], lo: float, hi: float
) -> dict[str, Any]:
    """Privilege lookups by tier between the samples nearest ``lo`` and ``hi`` seconds."""
    inside = [s for s in samples if lo <= s[0] <= hi + 2] or samples
    if len(inside) < 2:
        return {}
    first, last = inside[0][1], inside[-1][1]

    def tiers_of(name: str) -> dict[str, float]:
        return {t: _sum(last, name, f'source="{t}"') - _sum(first, name, f'source="{t}"')
                for t in TIERS}  # fmt: skip

    def ratio(tiers: dict[str, float]) -> float | None:
        total = sum(tiers.values())
        hits = tiers["memory"] + tiers["redis"] + tiers["stale"]
        return round(hits / total, 4) if total else None

    tiers = tiers_of("surge_privilege_lookups_total")
    batch = tiers_of("surge_privilege_batch_lookups_total")
    own = {t: tiers[t] - batch[t] for t in TIERS}
    pool_out = [_sum(s, "db_pool_checked_out") for _, s in inside]
    pool_wait = [_sum(s, "db_pool_waiting") for _, s in inside]
    gc = {f"gen{g}": {"seconds": round(_sum(last, "process_gc_seconds_total", f'"{g}"')
                                       - _sum(first, "process_gc_seconds_total", f'"{g}"'), 3),
                      "collections": int(_sum(last, "process_gc_collections_total", f'"{g}"')
                                         - _sum(first, "process_gc_collections_total", f'"{g}"'))}
          for g in range(3)}  # fmt: skip
    return {
        # The web processes' garbage collector over the window (ADR 0041).
        "web_gc": gc,
        "privilege_lookups": {k: int(v) for k, v in tiers.items()},
        # Every lookup (the judged figure, ADR 0041), then its two parts: users checking
        # their own privileges, and the service caller's batch checks of random users.
        "cache_hit_ratio": ratio(tiers),
        "cache_hit_ratio_own": ratio(own),
        "cache_hit_ratio_batch": ratio(batch),
        "privilege_lookups_own": {k: int(v) for k, v in own.items()},
        "privilege_lookups_batch": {k: int(v) for k, v in batch.items()},
        "pool_checked_out_max": max(pool_out, default=0),
        "pool_waiting_max": max(pool_wait, default=0),
    }


def cpu_figures(samples: list[Sample], records: Any, lo: float, hi: float) -> dict[str, Any]:
    """CPU per answered request by role over the steady phase (the samples nearest ``lo``
    and ``hi``), user and kernel apart (``bench/load/cpu.py``)."""
    inside = [s for s in samples if lo <= s.at <= hi + 0.5]
    if len(inside) < 2 or not inside[-1].roles:
        return {}
    first, last = inside[0], inside[-1]
    a, b = int(first.at * 1e6), int(last.at * 1e6)
    answered = sum(1 for done, status in zip(records.done, records.status, strict=True)
                   if a <= done < b and status != NO_ANSWER)  # fmt: skip
    return per_request(first, last, answered)


TIERS = ("memory", "redis", "database", "stale", "unavailable")


def series(samples: list[tuple[float, dict[str, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per-second rates of the cache tiers and gauges of the pool, for the plots."""
    out: dict[str, list[tuple[float, float]]] = {}
    name = "surge_privilege_lookups_total"
    for (t0, a), (t1, b) in itertools.pairwise(samples):
        dt = max(1e-3, t1 - t0)
        for tier in ("memory", "redis", "database", "stale", "unavailable"):
            rate = (_sum(b, name, f'source="{tier}"') - _sum(a, name, f'source="{tier}"')) / dt
            out.setdefault(f"lookups/s: {tier}", []).append((t1, max(0.0, rate)))
        out.setdefault("pool: checked out", []).append((t1, _sum(b, "db_pool_checked_out")))
        out.setdefault("pool: waiting", []).append((t1, _sum(b, "db_pool_waiting")))
        out.setdefault("requests in flight", []).append((t1, _sum(b, "http_requests_in_flight")))
    return out


# ---- servers --------------------------------------------------------------------------------


class Stack:
    """Embedded PostgreSQL + Redis + Surge (``surge serve``) in a temporary folder."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.folder = Path(tempfile.mkdtemp(prefix="surge-load-"))
        self.server: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.database_url = ""
        self.redis_url = ""
        self._servers: list[Any] = []
        #: The generator processes of the current run (set by each run as it starts them).
        self.generator_pids: list[int] = []
        self.cpu = CpuMeter()
        self.cpu.add("generator", lambda: list(self.generator_pids))
        self.cpu.add("web", lambda: [self.server.pid] if self.server is not None else [])
        self.cpu.add("harness", lambda: [os.getpid()], alone=True)

    def start_data(self) -> None:
        from surge.kit.db import migrate
        from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis

        pg = EmbeddedPostgres(self.folder / "pg")
        redis = EmbeddedRedis(self.folder / "redis")
        self.database_url = pg.start()
        self._servers.append(pg)
        self.redis_url = redis.start()
        self._servers.append(redis)
        self.cpu.add("postgres", lambda: [p for p in [pg.pid()] if p is not None])
        self.cpu.add("redis", lambda: [p for p in [redis.pid()] if p is not None])
        migrate.upgrade(self.database_url)

    def start_surge(self) -> None:
        from surge.kit.embedded import free_port

        port = free_port()
        metrics_dir = self.folder / "metrics"
        metrics_dir.mkdir()
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "SURGE_LOG_LEVEL": "WARNING",
            "SURGE_RATELIMIT_POLICIES": json.dumps(HIGH_LIMITS),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
            **self.options.server_env,
        }
        cmd = [sys.executable, "-m", "surge.cli", "serve", "--no-servers", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(self.options.workers)]  # fmt: skip
        self.server = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"surge serve exited with {self.server.returncode}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("surge serve did not become ready")

    def stop(self) -> None:
        import signal

        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        for server in reversed(self._servers):
            try:
                server.stop()
            except Exception as error:
                console.print(f"[red]could not stop {type(server).__name__}: {error}")
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- runs -----------------------------------------------------------------------------------


def one_run(
    stack: Stack,
    options: Options,
    users: list[User],
    population: list[User],
    service_token: str | None,
    *,
    think: float,
    ramp: float,
    duration: float,
    label: str,
) -> dict[str, Any]:
    scenario = load_scenario(options.scenario)
    step_names = [s.name for s in scenario.STEPS]
    scraper = Scraper(stack.base, cpu=stack.cpu)
    total = ramp + duration
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task(
            f"{label}: {len(users):,} users, think {think:.2f} s "
            f"(≈ {len(users) / think:,.0f}/s), ramp {ramp:.0f} s",
            total=total,
        )
        scraper.start(time.time() + 2.0)
        records = open_run(
            "127.0.0.1", int(stack.base.rsplit(":", 1)[1]), options.scenario, users,
            think=think, ramp=ramp, duration=duration, processes=options.processes,
            service_token=service_token, seed=options.seed, population=population,
            on_tick=lambda t: progress.update(task, completed=min(total, t)),
            on_start=lambda pids: stack.generator_pids.__setitem__(slice(None), pids),
        )  # fmt: skip
        progress.update(task, completed=total)
    scraper.stop()
    summary = summarize(records, step_names, steady_from=ramp, steady_to=total)
    summary["cache"] = cache_figures(scraper.samples, ramp, total)
    summary["cpu"] = cpu_figures(scraper.cpu_samples, records, ramp, total)
    summary["errors_by_kind"] = dict(sorted(records.errors.items(), key=lambda kv: -kv[1])[:20])
    summary["connects"] = records.connects
    summary["think_s"] = think
    summary["users"] = len(users)
    return {"summary": summary, "timeline": timeline(records, int(total) + 1),
            "series": series(scraper.samples), "records": records}  # fmt: skip


def meets(summary: dict[str, Any], targets: dict[str, float]) -> tuple[bool, list[str]]:
    misses = []
    latency = summary["latency"]
    if latency["p95_ms"] > targets["p95_ms"]:
        misses.append(f"p95 {latency['p95_ms']} > {targets['p95_ms']} ms")
    if latency["p99_ms"] > targets["p99_ms"]:
        misses.append(f"p99 {latency['p99_ms']} > {targets['p99_ms']} ms")
    if summary["error_rate"] > targets["error_rate"]:
        misses.append(f"errors {summary['error_rate']:.4%} > {targets['error_rate']:.2%}")
    if summary["served_rps"] < 0.98 * summary["offered_rps"]:
        misses.append(f"served {summary['served_rps']}/s < offered {summary['offered_rps']}/s")
    ratio = summary.get("cache", {}).get("cache_hit_ratio")
    if ratio is not None and ratio < targets["cache_hit_ratio"]:
        misses.append(f"cache hits {ratio:.2%} < {targets['cache_hit_ratio']:.0%}")
    return not misses, misses


def settle(base: str, timeout: float = 60.0) -> None:
    """Until the server has (almost) nothing in flight: a step after an overloaded one must
    not start while the server still works through answers nobody waits for."""
    deadline = time.monotonic() + timeout
    with console.status("Waiting for the server to drain..."):
        while time.monotonic() < deadline:
            try:
                sample = parse_metrics(httpx.get(f"{base}/metrics", timeout=5).text)
            except httpx.HTTPError:
                sample = {}
            if sample and _sum(sample, "http_requests_in_flight") <= 2:
                return
            time.sleep(1.0)


def capacity_search(
    stack: Stack, options: Options, users: list[User], population: list[User], *,
    service_token: str | None, start_rate: float, steps: int = 6,
) -> dict[str, Any]:  # fmt: skip
    """Highest rate (users / think) meeting the targets: double until a failure, bisect.
    Each step's generators open every user's connection again, so each step ramps over
    ``--ramp`` like the main run (a 5 s ramp was a 2 000 connects/s storm of its own).

    The bisection follows the *serving* targets (p95, p99, errors, served = offered): the
    cache-hit figure of a step depends on how long the caches have been filling and on the
    rate itself (batch checks of random users hit in proportion to how often each user is
    asked about within the cache TTL: ADR 0041), not on what the server can carry, so it
    cannot steer a search for that. It is still judged: ``capacity_rps`` is the highest step
    that met every target, cache hits included (0 when none did);
    ``serving_capacity_rps`` the highest that met the serving targets."""
    tried: list[dict[str, Any]] = []
    good, bad = 0.0, float("inf")
    every_target = 0.0
    rate = start_rate
    serving_targets = {**options.targets, "cache_hit_ratio": 0.0}
    for _ in range(steps):
        settle(stack.base)
        result = one_run(stack, options, users, population, service_token,
                         think=len(users) / rate, ramp=options.ramp, duration=options.step_duration,
                         label=f"capacity step {len(tried) + 1}: {rate:,.0f}/s")  # fmt: skip
        ok, misses = meets(result["summary"], options.targets)
        serving, _ = meets(result["summary"], serving_targets)
        s = result["summary"]
        tried.append({"rate": round(rate), "ok": ok, "serving_ok": serving, "misses": misses,
                      "served_rps": s["served_rps"], "p95_ms": s["latency"]["p95_ms"],
                      "p99_ms": s["latency"]["p99_ms"], "error_rate": s["error_rate"],
                      "cache_hit_ratio": s["cache"].get("cache_hit_ratio"),
                      "cache_hit_ratio_own": s["cache"].get("cache_hit_ratio_own"),
                      "cache_hit_ratio_batch": s["cache"].get("cache_hit_ratio_batch"),
                      "cpu_us_per_request": {role: f["us_per_request"] for role, f
                                             in s["cpu"].get("roles", {}).items()}})  # fmt: skip
        console.print(f"  {rate:,.0f}/s → {'[green]meets' if ok else '[red]misses'}[/] "
                      f"{'; '.join(misses)}")  # fmt: skip
        if ok:
            every_target = max(every_target, rate)
        if serving:
            good = max(good, rate)
        else:
            bad = min(bad, rate)
        if bad == float("inf"):
            rate *= 2
        elif bad - good <= 0.1 * bad:
            break
        else:
            rate = (good + bad) / 2 if good else bad / 2
    return {"capacity_rps": round(every_target), "serving_capacity_rps": round(good),
            "first_failing_rps": None if bad == float("inf") else round(bad),
            "steps": tried}  # fmt: skip


def run(options: Options) -> dict[str, Any]:
    from surge.config import Settings

    scenario = load_scenario(options.scenario)
    stack = Stack(options)
    capacity: dict[str, Any] | None = None
    try:
        with console.status("Starting PostgreSQL and Redis, migrating..."):
            stack.start_data()
        settings = Settings(DATABASE_URL=stack.database_url, REDIS_URL=stack.redis_url)
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed:,}/{task.total:,}"), console=console) as bar:  # fmt: skip
            tasks: dict[str, Any] = {}

            def progress(what: str, done: int, total: int) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(f"population: {what}", total=total)
                bar.update(tasks[what], completed=done)

            started = time.perf_counter()
            users, population, service_token = asyncio.run(
                scenario.prepare(stack.database_url, settings, population=options.population,
                                 signed_in=options.users, seed=options.seed, progress=progress)
            )  # fmt: skip
        console.print(f"[green]✓[/] population ready in {time.perf_counter() - started:.1f} s")
        with console.status(f"Starting Surge ({options.workers} processes)..."):
            stack.start_surge()
        if options.warm_cache and hasattr(scenario, "warm") and service_token:
            started = time.perf_counter()
            with console.status("Warming the cache tiers (steady state)..."):
                warmed = asyncio.run(scenario.warm(stack.base, population, service_token))
            console.print(f"[green]✓[/] {warmed:,} users warmed in "
                          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        main = one_run(stack, options, users, population, service_token, think=options.think,
                       ramp=options.ramp, duration=options.duration, label="run")  # fmt: skip
        if options.capacity:
            capacity = capacity_search(stack, options, users, population, service_token=service_token,
                                       start_rate=len(users) / options.think)  # fmt: skip
    finally:
        stack.stop()
    return finish(options, main, capacity)


def dump_requests(name: str, records: Any, step_names: list[str]) -> Path:
    """Every request of the main run as gzipped CSV (due, sent, done in µs from the start;
    status; step; the server's queue and app µs; request id), beside the system's temporary
    files: too big to commit, there to join with the server's logs by request id."""
    import csv
    import gzip

    path = Path(tempfile.gettempdir()) / f"surge-{name}-requests.csv.gz"
    with gzip.open(path, "wt", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["due_us", "sent_us", "done_us", "status", "step", "server_queue_us",
                         "server_app_us", "request_id"])  # fmt: skip
        for i in range(len(records.due)):
            writer.writerow([records.due[i], records.sent[i], records.done[i], records.status[i],
                             step_names[records.step[i]], records.queue_us[i],
                             records.app_us[i], records.request_ids[i]])  # fmt: skip
    return path


def finish(
    options: Options, main: dict[str, Any], capacity: dict[str, Any] | None
) -> dict[str, Any]:
    summary = main["summary"]
    ok, misses = meets(summary, options.targets)
    name = f"load-{options.scenario}"
    json_path = results_path(name)  # bench/results/, or bench/results/quick/ for --quick
    json_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [s.name for s in load_scenario(options.scenario).STEPS]
    requests_csv = dump_requests(name, main["records"], steps)
    html_path = json_path.with_suffix(".html")
    html_path.write_text(html.render(name, options=options.__dict__, summary=summary,
                                     timeline=main["timeline"], series=main["series"],
                                     capacity=capacity, misses=misses))  # fmt: skip
    # The latency plot alone, for the README (an SVG file renders on any Git host, offline).
    json_path.with_suffix(".svg").write_text(
        html.latency_chart(main["timeline"], options.ramp, options.ramp + options.duration)
    )
    latency = summary["latency"]
    hit = summary.get("cache", {}).get("cache_hit_ratio")
    rows = [
        ("offered / served req/s", f"{summary['offered_rps']:,} / {summary['served_rps']:,}", "= offered"),
        ("p50 / p95 / p99 / p99.9 ms", f"{latency['p50_ms']} / {latency['p95_ms']} / {latency['p99_ms']} / "
         f"{latency['p99.9_ms']}", f"p95 ≤ {options.targets['p95_ms']:g}, p99 ≤ {options.targets['p99_ms']:g}"),
        ("errors", f"{summary['error_rate']:.4%} ({summary['errors']})", f"≤ {options.targets['error_rate']:.2%}"),
        ("cache hits (privileges, every lookup)", f"{hit:.2%}" if hit is not None else "n/a",
         f"≥ {options.targets['cache_hit_ratio']:.0%}"),
        ("server queue p95 ms", str(summary["where"]["server_queue"]["p95_ms"]), ""),
        ("server app p95 ms", str(summary["where"]["server_app"]["p95_ms"]), ""),
        ("client wait before send p95 ms", str(summary["where"]["client_wait_before_send"]["p95_ms"]), ""),
    ]  # fmt: skip
    cache = summary.get("cache", {})
    rows.append(("cache hits: own checks / batch checks",
                 " / ".join(f"{r:.2%}" if r is not None else "n/a" for r in
                            (cache.get("cache_hit_ratio_own"), cache.get("cache_hit_ratio_batch"))),
                 "(parts of the judged figure: ADR 0041)"))  # fmt: skip
    for role, f in summary.get("cpu", {}).get("roles", {}).items():
        rows.append((f"CPU {role}: cores, µs/request (user + kernel)",
                     f"{f['cores']:.2f}, {f['us_per_request']:g} ({f['user_us_per_request']:g} + "
                     f"{f['kernel_us_per_request']:g})", ""))  # fmt: skip
    if capacity is not None:
        rows.append(("capacity (meets all targets)", f"{capacity['capacity_rps']:,}/s", ""))
        rows.append(("capacity (p95, p99, errors, served)",
                     f"{capacity['serving_capacity_rps']:,}/s", ""))  # fmt: skip
    ours = {
        "offered_rps": summary["offered_rps"], "served_rps": summary["served_rps"],
        **latency, "error_rate": summary["error_rate"],
        "cache_hit_ratio": hit,
    }  # fmt: skip
    if capacity is not None:
        ours["capacity_rps"] = capacity["capacity_rps"]
        ours["serving_capacity_rps"] = capacity["serving_capacity_rps"]
    return report(
        name,
        ours=ours,
        baseline={**options.targets, "what": "seed 003's reported figures (the targets)"},
        ratio=options.targets["p95_ms"] / max(latency["p95_ms"], 0.001),
        target="p95, p99, errors, cache hits within seed 003's figures; served = offered",
        ok=ok,
        rows=rows,
        extra={
            "options": {k: v for k, v in options.__dict__.items() if k != "server_env"},
            "summary": summary,
            "capacity": capacity,
            "misses": misses,
            "report": str(html_path.relative_to(ROOT)),
            "requests_csv": requests_csv.name + " (in the system's temporary directory)",
            "note": "generator, server, PostgreSQL and Redis share the machine's cores",
        },
        title=f"surge load {options.scenario}",
    )
