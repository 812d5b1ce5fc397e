"""Resident memory of ``dcar serve`` across batch shapes, with and without the heap trim (DCAR_TRIM_HEAP).

On CPU every new batch shape leaves freed blocks of new sizes on the C heap; without ``malloc_trim`` the
resident size grows in steps with each shape seen (server/memory.py). For each setting this starts a server
(a subprocess on 127.0.0.1), sends bursts of b concurrent one-image requests for b in ``--shapes`` (each
burst runs as one batch of b rows), twice over, and reads the server's RSS after each burst.

    python benchmarks/memory.py [--weights DIR|preset:tiny] [--shapes 1,2,3,4,6,8,12,16] [--steps 4]

A benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import benchmark_env, free_port, start_server  # noqa: E402  (a sibling module)


async def bursts(url: str, shapes: list[int], rounds: int, steps: int, server: psutil.Process) -> list[float]:
    """RSS in MiB after start-up, then after each burst."""
    rss = [server.memory_info().rss / 2**20]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for r in range(rounds):
            for b in shapes:
                results = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/generate",
                            json={"prompt": "a red circle", "seed": 1000 * r + i, "steps": steps},
                        )
                        for i in range(b)
                    )
                )
                bad = [x.status_code for x in results if x.status_code != 200]
                if bad:
                    raise SystemExit(f"burst of {b}: statuses {bad}")
                rss.append(server.memory_info().rss / 2**20)
    return rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights", default=None, help="weights directory or preset:tiny (default: the embedded model)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="1,2,3,4,6,8,12,16", help="burst sizes (rows of one batch)")
    ap.add_argument("--rounds", type=int, default=2, help="times the shape sequence is sent")
    ap.add_argument(
        "--steps", type=int, default=4, help="unmasking steps per image (shapes matter, not steps)"
    )
    args = ap.parse_args()
    if args.weights is None:
        from dcar.weights import embedded_weights

        args.weights = str(embedded_weights())
    shapes = [int(s) for s in args.shapes.split(",")]
    runs = {}
    for trim in ("false", "true"):
        settings = [
            ("trim_heap", trim),
            ("max_batch_size", str(max(shapes))),
            ("max_queue_delay_s", "600"),
            ("max_wait_ms", "200"),
        ]  # a burst starts as one batch
        port = free_port()
        serve_args = ["--weights", args.weights, "--device", args.device, "--log-level", "warning"]
        proc = start_server(port, serve_args, benchmark_env(**dict(settings)))
        try:
            runs[trim] = asyncio.run(
                bursts(f"http://127.0.0.1:{port}", shapes, args.rounds, args.steps, psutil.Process(proc.pid))
            )
        finally:
            proc.terminate()
            proc.wait(timeout=120)

    print(
        f"\ndcar memory across batch shapes: weights={args.weights} device={args.device} steps={args.steps}"
    )
    print(
        "\n| after | rows | RSS MiB, DCAR_TRIM_HEAP=false | RSS MiB, DCAR_TRIM_HEAP=true |\n|---|---|---|---|"
    )
    labels = ["start-up"] + [f"round {r + 1}" for r in range(args.rounds) for _ in shapes]
    rows = [""] + [str(b) for _ in range(args.rounds) for b in shapes]
    for label, b, off, on in zip(labels, rows, runs["false"], runs["true"]):
        print(f"| {label} | {b} | {off:.0f} | {on:.0f} |")
    for trim in ("false", "true"):
        r = runs[trim]
        print(
            f"DCAR_TRIM_HEAP={trim}: start-up {r[0]:.0f} MiB, peak {max(r):.0f} MiB, last {r[-1]:.0f} MiB, "
            f"growth over the run {r[-1] - r[0]:+.0f} MiB"
        )


if __name__ == "__main__":
    main()
