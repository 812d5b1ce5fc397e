"""Soak test of ``dcar serve``: open-loop load at k x its measured capacity, then how fast it recovers.

1. Starts ``dcar serve`` on 127.0.0.1 (a subprocess; loopback only) and waits until it is ready.
2. Capacity: ``max_batch_size`` closed-loop clients (each sends its next request when the last returns) for
   ``--capacity-s`` seconds; images/s, and the latency of one image in a full batch. ``--capacity`` skips it.
3. Load: Poisson arrivals at k x capacity for ``--duration`` seconds, whatever the server answers (open
   loop: a slow or refusing server does not slow the arrivals). At most ``--max-in-flight`` requests are
   outstanding; arrivals beyond that are counted as ``skipped`` (the client's own bound).
4. Recovery: the moment the load stops, one more request; its latency is the recovery time. Then the
   outstanding requests are awaited (bounded by their timeouts).

It prints markdown tables: outcomes (accepted 200, 429 by code, 5xx, 504, ...), latency percentiles of the
successes against the bound max_queue_delay_s + one image at full batch, the server's RSS and queue over time,
and the recovery. A benchmark prints; it asserts nothing.

    python benchmarks/soak.py [--weights DIR|preset:tiny] [--k 2] [--duration 180] [--capacity-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from server_process import benchmark_env, free_port  # benchmarks/ is on sys.path when a script runs
from server_process import start_server as serve_child

from dcar.server.settings import Settings

PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "two green triangles",
    "a yellow circle",
    "three purple squares",
    "a small orange circle",
    "a large cyan triangle",
]  # within every token limit


@dataclass
class Outcome:
    sent: float  # seconds since the load started
    latency: float
    status: int
    code: str | None = None
    retry_after: float | None = None
    queue_wait: float | None = None  # the server's timings.queue_wait: from admission to a batch slot


def start_server(args, port: int) -> subprocess.Popen:
    return serve_child(
        port,
        ["--weights", args.weights, "--device", args.device, "--log-level", args.log_level],
        benchmark_env(**dict(args.set)),
    )


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def gauges(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


async def post(client: httpx.AsyncClient, i: int, args, t0: float) -> Outcome:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
    if args.steps:
        body["steps"] = args.steps
    if args.timeout:
        body["timeout"] = args.timeout
    sent = time.monotonic()
    try:
        r = await client.post("/v1/generate", json=body)
    except httpx.HTTPError as e:
        return Outcome(sent - t0, time.monotonic() - sent, 0, type(e).__name__)
    latency = time.monotonic() - sent
    code, wait = None, None
    try:
        body = r.json()
        if r.status_code == 200:
            wait = body["timings"]["queue_wait"]
        else:
            code = body.get("error", {}).get("code")
    except (ValueError, KeyError):  # not a JSON body
        pass
    retry = r.headers.get("retry-after")
    return Outcome(sent - t0, latency, r.status_code, code, float(retry) if retry else None, wait)


async def recover(client: httpx.AsyncClient, args, t0: float) -> tuple[float, int, Outcome]:
    """The first request after the load stops, retried as Retry-After says until it succeeds:
    (seconds from the end of the load to its image, attempts, the successful attempt)."""
    start = time.monotonic()
    for attempt in range(1, 100):
        o = await post(client, 99_999, args, t0)
        if o.status != 429:
            return time.monotonic() - start, attempt, o
        await asyncio.sleep(o.retry_after or 1.0)
    return time.monotonic() - start, attempt, o


async def capacity(client: httpx.AsyncClient, args, clients: int) -> tuple[float, float]:
    """(images/s, mean latency) of ``clients`` closed-loop clients over ``args.capacity_s`` seconds."""
    await asyncio.gather(*(post(client, i, args, 0.0) for i in range(clients)))  # fill the batch once
    done: list[Outcome] = []
    stop = time.monotonic() + args.capacity_s
    t0 = time.monotonic()

    async def loop(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            o = await post(client, 10_000 + i, args, t0)
            done.append(o)
            i += clients
            if o.status == 429:  # a well-behaved client: no hot loop of refusals
                await asyncio.sleep(o.retry_after or 1.0)

    await asyncio.gather(*(loop(k) for k in range(clients)))
    ok = [o for o in done if o.status == 200]
    return len(ok) / (time.monotonic() - t0), statistics.mean(o.latency for o in ok)


async def sample(
    client: httpx.AsyncClient, proc: psutil.Process, t0: float, rows: list, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            g = gauges((await client.get("/metrics")).text)
        except httpx.HTTPError:
            g = {}
        rows.append(
            (
                time.monotonic() - t0,
                proc.memory_info().rss / 2**20,
                g.get("dcar_queue_size", float("nan")),
                g.get("dcar_rows_running", float("nan")),
                g.get("dcar_admission_margin_seconds", float("nan")),
            )
        )
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def soak(url: str, args, server: psutil.Process) -> None:
    limits = httpx.Limits(max_connections=args.max_in_flight + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=args.client_timeout, limits=limits) as client:
        batch = int(gauges((await client.get("/metrics")).text).get("dcar_batch_size_limit", 16))
        if args.capacity:
            rate_cap, full_latency = args.capacity, float("nan")
        else:
            rate_cap, full_latency = await capacity(client, args, batch)
        rate = args.k * rate_cap
        print(
            f"\ncapacity: {rate_cap:.2f} images/s with {batch} closed-loop clients (latency of an image in a "
            f"full batch {full_latency:.2f} s); load: {args.k:g} x = {rate:.2f} requests/s for {args.duration:g} s"
        )

        rng = random.Random(args.seed)
        outcomes: list[Outcome] = []
        tasks: set[asyncio.Task] = set()
        skipped = 0
        samples: list[tuple] = []
        stop_sampling = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample(client, server, t0, samples, stop_sampling))
        i = 0
        next_at = t0
        while next_at < t0 + args.duration:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if len(tasks) >= args.max_in_flight:
                skipped += 1
            else:
                task = asyncio.create_task(post(client, i, args, t0))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), outcomes.append(t.result())))
            i += 1
            next_at += rng.expovariate(rate)
        load_end = time.monotonic()
        probe = await recover(client, args, t0)
        idle_after = None
        while tasks or idle_after is None:
            g = gauges((await client.get("/metrics")).text)
            if idle_after is None and g.get("dcar_queue_size", 1) == 0 and g.get("dcar_rows_running", 1) == 0:
                idle_after = time.monotonic() - load_end
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            elif idle_after is None:
                await asyncio.sleep(0.2)
        stop_sampling.set()
        await sampler
        info = gauges((await client.get("/metrics")).text)
    report(args, outcomes, skipped, probe, idle_after, samples, (rate_cap, full_latency), info)


def report(
    args,
    outcomes: list[Outcome],
    skipped: int,
    probe: tuple,
    idle_after: float,
    samples: list,
    measured: tuple[float, float],
    info: dict,
) -> None:
    rate_cap, full_latency = measured
    kinds = Counter()
    for o in outcomes:
        if o.status == 200:
            kinds["accepted, 200"] += 1
        elif o.status == 429:
            kinds[f"429 {o.code}"] += 1
        elif o.status == 504:
            kinds["504 (accepted, then expired)"] += 1
        elif o.status >= 500:
            kinds[f"{o.status} {o.code}"] += 1
        else:
            kinds[f"{o.status or 'transport error'} {o.code}"] += 1
    total = len(outcomes)
    print("\n| outcome | requests | share |\n|---|---|---|")
    for kind in sorted(kinds, key=lambda k: (not k.startswith("accepted"), k)):
        print(f"| {kind} | {kinds[kind]} | {kinds[kind] / total:.1%} |")
    if skipped:
        print(f"| not sent (client bound {args.max_in_flight} in flight) | {skipped} | |")
    fivexx = sum(v for k, v in kinds.items() if k[:1] == "5")
    print(f"| **all** | {total} | 5xx: {fivexx}, of which 504: {kinds['504 (accepted, then expired)']} |")

    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    served = len(ok) / args.duration
    print(
        f"\nserved {len(ok)} images for {args.duration:g} s of load: {served:.2f} images/s, "
        f"{served / rate_cap:.0%} of the measured capacity"
    )
    delay = float(dict(args.set).get("max_queue_delay_s", Settings.model_fields["max_queue_delay_s"].default))
    print("\n| successes, seconds | p50 | p90 | p99 | max |\n|---|---|---|---|---|")
    parts = [
        ("latency (client)", [o.latency for o in ok]),
        (
            f"queue wait (limit max_queue_delay_s = {delay:g})",
            [o.queue_wait for o in ok if o.queue_wait is not None],
        ),
        ("the rest: in the batch, encoding, HTTP", [o.latency - (o.queue_wait or 0.0) for o in ok]),
    ]
    for name, values in parts:
        if values:
            print(
                f"| {name} | {percentile(values, 50):.2f} | {percentile(values, 90):.2f} | "
                f"{percentile(values, 99):.2f} | {max(values):.2f} |"
            )
    if ok:
        image = percentile(parts[2][1], 50)
        p99 = percentile(parts[0][1], 99)
        print(
            f"\nbound: max_queue_delay_s + one image (median time in the batch under this load) = {delay:g} + "
            f"{image:.2f} = {delay + image:.2f} s; p99 latency {p99:.2f} s "
            f"({'within' if p99 <= delay + image else 'above'}); an image in a full batch of the capacity "
            f"run: {full_latency:.2f} s"
        )
    if refused:
        ra = [o.retry_after for o in refused if o.retry_after is not None]
        print(
            f"\n429 answered in p50 {percentile([o.latency for o in refused], 50) * 1000:.0f} ms; "
            f"Retry-After p50 {percentile(ra, 50):g} s, max {max(ra):g} s, {len(set(ra))} distinct values"
        )

    print(
        "\n| t (s) | server RSS (MiB) | rows queued | rows running | admission margin (s) |\n|---|---|---|---|---|"
    )
    step = max(1, len(samples) // 12)
    for t, rss, queued, running, margin in samples[::step] + (
        [samples[-1]] if len(samples) % step != 1 else []
    ):
        print(f"| {t:.0f} | {rss:.0f} | {queued:.0f} | {running:.0f} | {margin:.2f} |")
    rss = [s[1] for s in samples]
    print(f"\nRSS: min {min(rss):.0f} MiB, max {max(rss):.0f} MiB, last {rss[-1]:.0f} MiB")
    seconds, attempts, last = probe
    print(
        f"\nrecovery: the first request after the load stopped had its image ({last.status}) {seconds:.2f} s later "
        f"({attempts} attempt(s), following Retry-After; the last took {last.latency:.2f} s); the server was idle "
        f"{idle_after:.1f} s after the load stopped"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights", default=None, help="weights directory or preset:tiny (default: the embedded model)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=float, default=2.0, help="load as a multiple of the measured capacity")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of open-loop load")
    ap.add_argument(
        "--capacity-s", type=float, default=30.0, help="seconds of the closed-loop capacity measurement"
    )
    ap.add_argument("--capacity", type=float, default=None, help="images/s; skips the capacity measurement")
    ap.add_argument(
        "--steps", type=int, default=None, help="unmasking steps per image (default: the model's)"
    )
    ap.add_argument("--timeout", type=float, default=None, help="per-request timeout (default: the server's)")
    ap.add_argument(
        "--max-in-flight", type=int, default=2000, help="client-side bound on outstanding requests"
    )
    ap.add_argument("--client-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    ap.add_argument(
        "--log-level", default="warning", help="the server's log level (debug: predicted vs actual)"
    )
    ap.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("SETTING", "VALUE"),
        help="a server setting, e.g. --set max_queue_delay_s 2 (as DCAR_MAX_QUEUE_DELAY_S)",
    )
    args = ap.parse_args()
    if args.weights is None:
        from dcar.weights import embedded_weights

        args.weights = str(embedded_weights())
    port = free_port()
    proc = start_server(args, port)
    try:
        print(
            f"dcar soak: weights={args.weights} device={args.device} settings={dict(args.set) or 'defaults'} "
            f"host: {os.cpu_count()} CPUs"
        )
        asyncio.run(soak(f"http://127.0.0.1:{port}", args, psutil.Process(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
