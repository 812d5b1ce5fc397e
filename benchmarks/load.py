"""Load test of the HTTP server: images/s and latency percentiles against concurrency, over real HTTP.

Starts ``dcar serve`` (``python -m server.serve``) in a subprocess, sweeps the number of concurrent clients
(1, 2, 4, 8, 16, 32 by default; each client sends its next request as soon as the last one returns), and
prints one row per level: images/s, p50/p95/p99 latency, the mean forward batch size (from /metrics), and
the throughput relative to
  * sequential single requests over HTTP (the concurrency-1 row),
  * the direct Pipeline call, one image at a time, no HTTP (measured before the server starts),
  * the direct Pipeline call on a static batch of that many images (the ideal the server batches towards).

    python benchmarks/load.py [--weights preset:tiny] [--device cpu] [--concurrency 1,2,4,8,16,32]

A benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_process import benchmark_env, free_port  # benchmarks/ is on sys.path when a script runs
from server_process import start_server as serve_child

from dcar.server.runtime import load_pipeline
from dcar.server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def batch_totals(text: str) -> tuple[float, float]:
    """(rows stepped, forwards) so far, from dcar_batch_size's sum and count."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dcar_batch_size_sum":
                total = s.value
            elif s.name == "dcar_batch_size_count":
                count = s.value
    return total, count


def direct_rates(args, levels: list[int]) -> tuple[float, dict[int, float]]:
    """Images/s of the Pipeline itself: one image per call, and a static batch of c images per call."""
    pipe = load_pipeline(Settings(weights=args.weights, device=args.device, dtype=args.dtype))
    overrides = {"steps": args.steps} if args.steps else {}

    def rate(batch: int, images: int) -> float:
        params = [pipe.params(f"direct {i}", seed=i, **overrides) for i in range(batch)]
        pipe.generate(params)  # warm-up
        calls = max(1, images // batch)
        t0 = time.perf_counter()
        for _ in range(calls):
            pipe.generate(params)
        return calls * batch / (time.perf_counter() - t0)

    single = rate(1, args.direct_images)
    batched = {c: rate(c, max(c, args.direct_images)) for c in levels}
    return single, batched


async def level(url: str, concurrency: int, requests: int, steps: int | None) -> dict:
    """``concurrency`` clients sending ``requests`` requests in all; returns latencies, wall time, batch stats."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        rows0, forwards0 = batch_totals((await client.get("/metrics")).text)

        async def worker() -> None:
            nonlocal failures
            for i in counter:
                body = {"prompt": f"load test {i}", "seed": i}
                if steps:
                    body["steps"] = steps
                t0 = time.perf_counter()
                r = await client.post("/v1/generate", json=body)
                latencies.append(time.perf_counter() - t0)
                failures += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        rows1, forwards1 = batch_totals((await client.get("/metrics")).text)
    mean_batch = (rows1 - rows0) / max(1.0, forwards1 - forwards0)
    return {"latencies": latencies, "wall": wall, "failures": failures, "mean_batch": mean_batch}


def child_env(args) -> dict[str, str]:
    """Environment of the measured processes (server and direct baseline): the same for both."""
    return benchmark_env(args.omp_wait_policy)


def measure_direct(args, levels: list[int]) -> tuple[float, dict[int, float]]:
    """Run the direct-Pipeline measurement in a child process with the server's environment."""
    cmd = [
        sys.executable,
        __file__,
        "--direct-only",
        "--weights",
        args.weights,
        "--device",
        args.device,
        "--concurrency",
        ",".join(map(str, levels)),
        "--direct-images",
        str(args.direct_images),
    ]
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    out = subprocess.run(
        cmd, cwd=REPO, env=child_env(args), check=True, capture_output=True, text=True
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return data["single"], {int(k): v for k, v in data["batched"].items()}


def start_server(args, port: int) -> subprocess.Popen:
    serve_args = [
        "--weights",
        args.weights,
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(max(256, 4 * args.max_batch_size)),
        "--log-level",
        "warning",
    ] + (["--dtype", args.dtype] if args.dtype else [])
    return serve_child(port, serve_args, child_env(args), timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="preset:tiny", help="weights directory or preset:tiny (default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated client counts")
    ap.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(16, 4 x concurrency))"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="unmasking steps per image (default: the model's)"
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    ap.add_argument("--direct-images", type=int, default=32, help="images per direct-Pipeline measurement")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the measured processes ('' keeps the environment's)",
    )
    ap.add_argument("--direct-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.direct_only:
        single, batched = direct_rates(args, levels)
        print(json.dumps({"single": single, "batched": batched}))
        return

    single, batched = measure_direct(args, levels)
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(level(url, 2, 4, args.steps))  # the first HTTP requests pay for connection setup
        results = {}
        for c in levels:
            results[c] = asyncio.run(level(url, c, args.requests or max(16, 4 * c), args.steps))
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    print(
        f"\ndcar load benchmark: weights={args.weights} device={args.device} "
        f"max_batch_size={args.max_batch_size} max_wait_ms={args.max_wait_ms:g} steps={args.steps or 'default'} "
        f"OMP_WAIT_POLICY={child_env(args).get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"direct Pipeline, one image per call: {single:.2f} images/s\n")
    header = (
        "| clients | requests | images/s | p50 s | p95 s | p99 s | mean batch | x sequential HTTP "
        "| x direct (1/call) | x direct (static batch) | errors |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    base = None
    for c, r in results.items():
        lat = r["latencies"]
        rate = len(lat) / r["wall"]
        base = base or rate
        print(
            f"| {c} | {len(lat)} | {rate:.2f} | {statistics.median(lat):.3f} | {percentile(lat, 95):.3f} | "
            f"{percentile(lat, 99):.3f} | {r['mean_batch']:.2f} | {rate / base:.2f} | {rate / single:.2f} | "
            f"{rate / batched[c]:.2f} | {r['failures']} |"
        )


if __name__ == "__main__":
    main()
