"""One command for a session lent a GPU: every device check of the sampler, in one bounded run.

    python benchmarks/device_check.py --out "$OUT"            # on the GPU host (fits in 9 minutes on an H200)
    python benchmarks/device_check.py --toy --device cpu --out /tmp/dc   # the same code at toy size (CI)

Writes ``report.md`` (the tables below, also printed), ``results.json`` and ``latency.png`` under ``--out``:

1. finiteness per dtype with the trained embedded model (float32/float16/bfloat16): non-finite rows, mean
   |image - float32 image|;
2. host syncs per stage (``torch.cuda.set_sync_debug_mode`` warnings on CUDA) and host reads counted at the
   Python level (every device): admission, one unmasking step, the head loop, the finish;
3. kernel launches (CUDA) or operators (CPU) per unmasking step, from ``torch.profiler``;
4. eager vs ``torch.compile`` vs CUDA graphs at batch 1/16/64 for the full-size model at 512 px in float16:
   latency, images/s, peak memory, achieved TFLOP/s against a measured matmul ceiling; every output checked
   finite. Cases that would not fit the time budget are reported as skipped, never silently dropped.
The process exits 1 if any output held NaN or inf.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from gpu import matmul_ceiling, run_case, sync  # benchmarks/ is on sys.path when a script runs
from plotting import latency_throughput_plot

from dcar.model.config import PIPELINE_PRESETS, T5_BASE
from dcar.model.flops import image_flops
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import SamplerOptions
from dcar.training.shapes_eval import EVAL_PROMPTS
from dcar.weights import embedded_weights

MODES = {
    "eager": SamplerOptions(),
    "compiled": SamplerOptions(compile=True),
    "cuda_graphs": SamplerOptions(cuda_graphs=True),
}
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReads:
    """Counts host reads of tensor values (each one a blocking device->host copy on CUDA) and, on CUDA,
    the synchronising calls ``torch.cuda.set_sync_debug_mode`` reports, inside ``with probe.counting():``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reads = 0
        self.syncs = 0
        self._on = False
        self.caught: list = []
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, original):
        def method(t, *args, **kwargs):
            if self._on:
                self.reads += 1
            return original(t, *args, **kwargs)

        return method

    @contextmanager
    def counting(self):
        self.reads = self.syncs = 0
        self._on = True
        with warnings.catch_warnings(record=True) as caught:
            self.caught = caught
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
                self._on = False
        self.syncs = sync_warnings(caught)


def sync_warnings(caught: list) -> int:
    return sum("synchroniz" in str(w.message) for w in caught)


def finiteness(device: torch.device, size: int, prompts: int, steps: int | None = None) -> list[dict]:
    """``steps`` None: the model's own number of unmasking steps."""
    texts = [s.prompt for s in EVAL_PROMPTS[:: max(1, len(EVAL_PROMPTS) // prompts)][:prompts]]
    rows, reference = [], None
    for dtype in ("float32", "float16", "bfloat16"):
        pipe = Pipeline.from_pretrained(embedded_weights(), device=device, dtype=dtype)
        results = pipe.generate(
            [
                pipe.params(t, seed=s, height=size, width=size, **({"steps": steps} if steps else {}))
                for t in texts
                for s in (0, 1)
            ]
        )
        images = torch.stack([r.image for r in results])
        bad = sum(not r.finite for r in results)
        diff = 0.0 if reference is None else (images - reference).abs().mean().item()
        reference = images if reference is None else reference
        rows.append({"dtype": dtype, "rows": len(results), "non_finite": bad, "mean_abs_diff_vs_fp32": diff})
        del pipe
    return rows


def syncs_and_launches(pipe: Pipeline, size: int, batch: int) -> dict:
    probe = HostReads(pipe.device)
    params = [pipe.params(f"prompt {i}", seed=i, height=size, width=size) for i in range(batch)]
    pipe.generate(params)  # warm-up: lazy initialisation is not what we count
    out = {}
    with probe.counting():
        state = pipe.sampler.start(params)
    out["admission"] = (probe.syncs, probe.reads)
    with probe.counting():
        pipe.sampler.step(state)
    out["one unmasking step"] = (probe.syncs, probe.reads)
    while not all(r.done for r in state.rows):
        pipe.sampler.step(state)
    head = pipe.generator.diffloss
    original = head.denoise_step
    loop = {"syncs": 0, "reads": 0}

    def counted(*args):  # the head loop's body, counted alone (not the finish's final copy to the host)
        reads, seen = probe.reads, len(probe.caught)
        result = original(*args)
        loop["syncs"] += sync_warnings(probe.caught[seen:])
        loop["reads"] += probe.reads - reads
        return result

    pipe.sampler._head_step = counted
    with probe.counting():
        pipe.sampler.finish(state)
    pipe.sampler._head_step = original
    out["head loop (all steps)"] = (loop["syncs"], loop["reads"])
    out["finish (head + decode + copy out)"] = (probe.syncs, probe.reads)

    state = pipe.sampler.start(params)
    pipe.sampler.step(state)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if pipe.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        pipe.sampler.step(state)
        sync(pipe.device)
    events = prof.key_averages()
    if pipe.device.type == "cuda":
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
        )
        unit = "CUDA kernel launches"
    else:
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
        unit = "aten operators"
    return {"stages": out, "launches_per_step": launches, "launch_unit": unit}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="device-check", help="folder for report.md, results.json, latency.png")
    ap.add_argument(
        "--toy", action="store_true", help="tiny preset, small sizes (the CPU test of this script)"
    )
    ap.add_argument("--modes", default="eager,compiled,cuda_graphs")
    ap.add_argument("--batches", default=None, help="default 1,16,64 (toy: 1,2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="skip speed cases that would start after this"
    )
    args = ap.parse_args()
    t_start = time.monotonic()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.toy:
        cfg, size, dtype, mm = PIPELINE_PRESETS["tiny"], 128, torch.float32, 256
        # float16 runs emulated on a CPU (several times float32's time): one prompt, 4 steps keep it short
        batches, fin_size, fin_prompts, sync_batch = args.batches or "1,2", 128, 1, 2
        fin_steps: int | None = 4
    else:  # T5-base-sized encoder on bytes: random weights need no vocabulary file
        cfg = replace(
            PIPELINE_PRESETS["dc-ar-512"], text_encoder=replace(T5_BASE, tokenizer="byt5", vocab_size=384)
        )
        size, dtype, mm = 512, torch.float16, 8192 if device.type == "cuda" else 1024
        batches, fin_size, fin_prompts, sync_batch = args.batches or "1,16,64", 256, 16, 16
        fin_steps = None
    batches = [int(b) for b in batches.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    dt_name = str(dtype).replace("torch.", "")
    say(
        f"# dcar device check: {name}, torch {torch.__version__}, {'toy (tiny preset)' if args.toy else 'dc-ar-512'}"
    )
    results: dict = {"device": name, "torch": torch.__version__, "toy": args.toy}

    say("\n## 1. Finiteness per dtype (embedded tiny-shapes model)\n")
    say("| dtype | rows | non-finite rows | mean abs diff vs float32 |")
    say("|---|---|---|---|")
    fin = finiteness(device, fin_size, fin_prompts, fin_steps)
    for r in fin:
        say(f"| {r['dtype']} | {r['rows']} | {r['non_finite']} | {r['mean_abs_diff_vs_fp32']:.4f} |")
    results["finiteness"] = fin
    any_bad = any(r["non_finite"] for r in fin)

    base = Pipeline.from_config(cfg, device=device, dtype=dtype, name="random")
    # Random init zeroes the head's output layers: give them weights so the head's numerics are exercised.
    g = torch.Generator().manual_seed(0)
    head = base.generator.diffloss.net
    for lin in [
        base.generator.final_layer.linear,
        head.final_layer.linear,
        head.final_layer.adaLN_modulation[-1],
        *(b.adaLN_modulation[-1] for b in head.res_blocks),
    ]:
        lin.weight.copy_((torch.randn(lin.weight.shape, generator=g) * 0.02).to(lin.weight))

    say(f"\n## 2. Host syncs per stage (batch {sync_batch}, {size} px, {dt_name}, eager)\n")
    say("| stage | syncs reported by CUDA | host reads of tensor values |")
    say("|---|---|---|")
    sl = syncs_and_launches(base, size, sync_batch)
    for stage, (syncs, reads) in sl["stages"].items():
        say(f"| {stage} | {syncs if device.type == 'cuda' else 'n/a (cpu)'} | {reads} |")
    say(f"\n## 3. Launches per unmasking step: {sl['launches_per_step']} {sl['launch_unit']}")
    results["syncs"] = {k: {"syncs": v[0], "reads": v[1]} for k, v in sl["stages"].items()}
    results["launches_per_step"] = {"count": sl["launches_per_step"], "unit": sl["launch_unit"]}

    ceiling = matmul_ceiling(device, dtype, mm)
    flops = image_flops(cfg, size=size)
    say(f"\n## 4. Speed: eager vs compiled vs CUDA graphs ({size} px, {dt_name})\n")
    say(f"matmul ceiling ({mm}^3): {ceiling / 1e12:.2f} TFLOP/s; FLOPs per image {flops.total / 1e9:.1f} G")
    say("\n| mode | batch | latency s | images/s | peak mem GiB | TFLOP/s | % of ceiling | finite |")
    say("|---|---|---|---|---|---|---|---|")
    speed = []
    for mode in args.modes.split(","):
        pipe = base.with_options(MODES[mode], name=mode)
        for b in batches:
            if time.monotonic() - t_start > args.budget_s:
                say(f"| {mode} | {b} | skipped (time budget) | | | | | |")
                continue
            m = run_case(pipe, size, b, args.repeat)
            achieved = b * flops.total / m["wall"]
            any_bad |= not m["finite"]
            speed.append({"mode": mode, "batch": b, **m, "tflops": achieved / 1e12})
            say(
                f"| {mode} | {b} | {m['wall']:.3f} | {m['img_s']:.2f} | {m['mem'] / 2**30:.2f} | "
                f"{achieved / 1e12:.2f} | {100 * achieved / ceiling:.1f} | {'yes' if m['finite'] else 'NO'} |"
            )
    results["speed"] = speed
    results["matmul_ceiling_tflops"] = ceiling / 1e12
    results["wall_s"] = time.monotonic() - t_start
    say(f"\n(total {results['wall_s']:.0f} s)")
    series: dict = {}
    for row in speed:
        series.setdefault(row["mode"], {})[row["batch"]] = row["wall"]
    if series:
        latency_throughput_plot(series, str(out / "latency.png"), f"DC-AR {size}px on {name}, {dt_name}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if any_bad:
        print("NON-FINITE OUTPUT: see the tables above")
    return 1 if any_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
