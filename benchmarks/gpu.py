"""Everything a GPU host should measure, in one run (under 10 minutes on an H200).

Full-size DC-AR with random weights (fp16, 512 px by default): latency at batch 1, throughput at larger
batches, peak memory, time per stage, achieved TFLOP/s per stage against a measured matmul ceiling
(FLOPs counted from the modules, model/flops.py), eager against optimised (``torch.compile``), and a PNG
plot. ``--tiny`` runs the same code on the tiny preset: that is how it is tested on CPU.

    python benchmarks/gpu.py --device cuda                 # full size, fp16
    python benchmarks/gpu.py --tiny --device cpu           # smoke test
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from dataclasses import replace

import torch
from plotting import latency_throughput_plot  # benchmarks/ is on sys.path when a script runs

from dcar.model.config import PIPELINE_PRESETS, T5_BASE
from dcar.model.flops import image_flops
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import SamplerOptions

STAGES = ("text_encode", "unmask", "residual", "decode")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 10) -> float:
    """Measured FLOP/s of a square matmul: what 'the hardware allows' for this dtype here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - t0)


def peak_memory(device: torch.device) -> float:
    """Peak bytes: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_case(pipe: Pipeline, size: int, batch: int, repeat: int) -> dict:
    params = [pipe.params(f"prompt {i}", seed=i, height=size, width=size) for i in range(batch)]
    pipe.generate(params)  # warm-up (and compilation for the optimised path)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    walls, stages, finite = [], {s: [] for s in STAGES}, True
    for _ in range(repeat):
        sync(pipe.device)
        t0 = time.perf_counter()
        results = pipe.generate(params)
        sync(pipe.device)
        walls.append(time.perf_counter() - t0)
        finite &= all(r.finite for r in results)  # a fast NaN is no result
        for s in STAGES:
            stages[s].append(results[0].timings.get(s, 0.0))
    wall = statistics.median(walls)
    return {
        "wall": wall,
        "img_s": batch / wall,
        "mem": peak_memory(pipe.device),
        "finite": finite,
        **{s: statistics.median(v) for s, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke test)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; tiny: 128)")
    ap.add_argument("--batches", default=None, help="default 1,16,32,64 (tiny: 1,4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    ap.add_argument("--plot", default="gpu.png", help="PNG plot path ('' to skip)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    if args.tiny:
        cfg, size, batches, mm = PIPELINE_PRESETS["tiny"], args.size or 128, args.batches or "1,4", 256
    else:  # T5-base-sized encoder on bytes: no vocabulary file is needed for random weights
        cfg = replace(
            PIPELINE_PRESETS["dc-ar-512"], text_encoder=replace(T5_BASE, tokenizer="byt5", vocab_size=384)
        )
        size, batches, mm = (
            args.size or 512,
            args.batches or "1,16,32,64",
            8192 if device.type == "cuda" else 1024,
        )
    batches = [int(b) for b in batches.split(",")]

    ceiling = matmul_ceiling(device, dtype, mm)
    flops = image_flops(cfg, size=size)
    print(
        f"# gpu benchmark: device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}) "
        f"dtype={str(dtype).replace('torch.', '')} torch={torch.__version__} preset={'tiny' if args.tiny else 'dc-ar-512'} {size}px"
    )
    print(f"# matmul ceiling ({mm}^3, {str(dtype).replace('torch.', '')}): {ceiling / 1e12:.2f} TFLOP/s")
    print(
        f"# FLOPs per image: unmask {flops.unmask / 1e9:.1f} G, head {flops.residual / 1e9:.1f} G, "
        f"decode {flops.decode / 1e9:.1f} G, total {flops.total / 1e9:.1f} G -> ceiling "
        f"{ceiling / flops.total:.1f} images/s"
    )

    rows = []
    modes = args.modes.split(",")
    base = Pipeline.from_config(cfg, device=device, dtype=dtype, name="random")
    for mode in modes:
        options = SamplerOptions(compile=(mode == "compiled"))
        pipe = base.with_options(options, name=mode)
        for b in batches:
            rows.append((mode, b, run_case(pipe, size, b, args.repeat)))

    head = (
        "| mode | batch | latency s | images/s | unmask ms | head ms | decode ms | TFLOP/s unmask | "
        "TFLOP/s head | TFLOP/s decode | % of ceiling | peak mem GiB | finite |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for mode, b, m in rows:
        tf = [
            b * f / max(m[s], 1e-9) / 1e12
            for f, s in ((flops.unmask, "unmask"), (flops.residual, "residual"), (flops.decode, "decode"))
        ]
        achieved = b * flops.total / m["wall"]
        print(
            f"| {mode} | {b} | {m['wall']:.3f} | {m['img_s']:.2f} | {m['unmask'] * 1e3:.1f} | "
            f"{m['residual'] * 1e3:.1f} | {m['decode'] * 1e3:.1f} | {tf[0]:.2f} | {tf[1]:.2f} | {tf[2]:.2f} | "
            f"{100 * achieved / ceiling:.1f} | {m['mem'] / 2**30:.2f} | {'yes' if m['finite'] else 'NO'} |"
        )
    if len(modes) == 2:
        for b in batches:
            e = next(m for mode, bb, m in rows if mode == modes[0] and bb == b)
            o = next(m for mode, bb, m in rows if mode == modes[1] and bb == b)
            print(f"batch {b}: {modes[1]} / {modes[0]} latency = {o['wall'] / e['wall']:.2f}")
    bad = [(mode, b) for mode, b, m in rows if not m["finite"]]
    if bad:
        raise SystemExit(f"non-finite outputs (NaN/inf) in {bad}")
    if args.plot:
        series = {mode: {b: m["wall"] for md, b, m in rows if md == mode} for mode in modes}
        latency_throughput_plot(
            series, args.plot, f"DC-AR {size}px on {device}, {str(dtype).replace('torch.', '')}"
        )


if __name__ == "__main__":
    main()
