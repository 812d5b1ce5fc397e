"""DC-AR against its peers at equal transformer width and depth, side by side in one run.

* DC-AR: 12 unmasking steps (CFG, one forward of 2B) + 32 diffusion-head steps + the DC-HT decoder;
* Sana-style: diffusers' ``SanaTransformer2DModel`` (same width/depth, Sana's linear attention and
  GLUMBConv MLP) on the 32x latent, 20 flow-matching Euler steps with CFG, then diffusers' ``AutoencoderDC``
  decoder of the same widths and depths as DC-HT's;
* MAR-style: our generator driven 64 steps, with the diffusion head (32 steps, CFG) run at every step on
  the positions revealed there (MAR's continuous-token sampler; MAR itself uses 100 head steps).

Random weights, same resolution, the same random caption states for all (text encoding is excluded for
all three). Latency at batch 1 and throughput at larger batches, medians over --repeat runs after a
warm-up, ratios against DC-AR, and a PNG plot. Default sizes (width 256, depth 4, 256 px, decoder widths
/4, codebook 4096) run in minutes on 2 CPU cores; ``--full`` uses the official sizes at 512 px (a GPU host).

    python benchmarks/peers.py [--full] [--device cuda --dtype float16] [--batches 1,8,16] [--plot peers.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from plotting import latency_throughput_plot  # benchmarks/ is on sys.path when a script runs

from dcar.model.config import (
    DC_AR_512,
    DC_HT,
    DecoderConfig,
    DiffusionHeadConfig,
    EncoderConfig,
    GeneratorConfig,
)
from dcar.model.maskgit import masked_after_step
from dcar.model.params import SamplingParams
from dcar.model.pipeline import build_generator, build_tokenizer
from dcar.model.sampler import Sampler


def configs(args) -> tuple[GeneratorConfig, tuple[int, ...]]:
    """The generator shared by DC-AR and MAR-style, and the decoder widths shared by all three."""
    if args.full:
        return DC_AR_512, DC_HT.decoder.width_list
    widths = tuple(w // args.decoder_div for w in DC_HT.decoder.width_list)
    gen = replace(
        DC_AR_512,
        hidden_size=args.width,
        num_layers=args.depth,
        num_heads=args.heads,
        intermediate_size=4 * args.width,
        codebook_size=args.codebook,
        context_dim=args.context,
        head=DiffusionHeadConfig(width=args.width, depth=args.head_depth),
    )
    return gen, widths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DCAR:
    name = "DC-AR (12 + head)"

    def __init__(self, gen_cfg, widths, device, dtype):
        tok_cfg = replace(
            DC_HT,
            codebook_size=gen_cfg.codebook_size,
            encoder=EncoderConfig(width_list=widths, depth_list=(0, 1, 1, 1, 1, 1)),
            decoder=DecoderConfig(width_list=widths),
        )
        self.gen = build_generator(gen_cfg, None).to(device, dtype).eval()
        self.tok = build_tokenizer(tok_cfg, None).to(device, dtype).eval()
        self.sampler = Sampler(self.gen, self.tok, text_encoder=None)

    def __call__(self, text, size: int) -> None:
        b = text[0].shape[0]
        params = [SamplingParams("-", seed=i, height=size, width=size) for i in range(b)]
        self.sampler.generate(params, text=text)


class SanaStyle:
    name = "Sana-style (20 steps)"

    def __init__(self, gen_cfg, widths, device, dtype, size):
        from diffusers import AutoencoderDC, SanaTransformer2DModel

        heads = gen_cfg.num_heads
        self.net = (
            SanaTransformer2DModel(
                in_channels=32,
                out_channels=32,
                num_attention_heads=heads,
                attention_head_dim=gen_cfg.hidden_size // heads,
                num_layers=gen_cfg.num_layers,
                num_cross_attention_heads=heads,
                cross_attention_head_dim=gen_cfg.hidden_size // heads,
                cross_attention_dim=gen_cfg.hidden_size,
                caption_channels=gen_cfg.context_dim,
                sample_size=size // 32,
                patch_size=1,
            )
            .to(device, dtype)
            .eval()
        )
        evit = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        self.ae = (
            AutoencoderDC(
                latent_channels=32,
                encoder_block_out_channels=widths,
                decoder_block_out_channels=widths,
                encoder_layers_per_block=(1,) * 6,
                decoder_layers_per_block=DC_HT.decoder.depth_list,
                encoder_block_types=evit,
                decoder_block_types=evit,
                encoder_qkv_multiscales=((),) * 6,
                decoder_qkv_multiscales=((),) * 6,
                decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
                decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
            )
            .to(device, dtype)
            .eval()
        )
        self.device, self.dtype = device, dtype

    def __call__(self, text, size: int, steps: int = 20, guidance: float = 4.5) -> None:
        states, mask = text
        b = states.shape[0]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(b, 32, size // 32, size // 32, generator=g, device=self.device, dtype=self.dtype)
        cond = torch.cat([states, torch.zeros_like(states)]).to(self.dtype)
        cmask = torch.cat([mask, mask])
        for i in range(steps):  # flow matching, Euler: x <- x + dt * v
            t = torch.full((2 * b,), 1000 * (1 - i / steps), device=self.device)
            v = self.net(torch.cat([x, x]), cond, t, encoder_attention_mask=cmask, return_dict=False)[0]
            vc, vu = v.chunk(2)
            x = x - (vu + guidance * (vc - vu)) / steps
        return self.ae.decode(x).sample


class MARStyle:
    name = "MAR-style (64 + head each)"

    def __init__(self, dcar: DCAR):
        self.gen, self.tok = dcar.gen, dcar.tok

    def __call__(self, text, size: int, steps: int = 64, head_steps: int = 32) -> None:
        states, mask = text
        b, grid = states.shape[0], (size // 32, size // 32)
        n = grid[0] * grid[1]
        drop = torch.tensor([False, True], device=states.device).repeat(b)
        kv = self.gen.text_kv(states.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), drop)
        ids = torch.full((2 * b, n), self.gen.cfg.mask_token_id, dtype=torch.long, device=states.device)
        g = torch.Generator(device=states.device).manual_seed(0)
        masked = torch.tensor([n])
        for s in range(steps):
            _, hidden = self.gen(ids, kv, grid)
            left = 0 if s == steps - 1 else int(masked_after_step(n, torch.tensor([(s + 1) / steps]), masked))
            k = int(masked) - left  # positions revealed at this step get their continuous token now
            masked = torch.tensor([left])
            if k <= 0:
                continue
            h = hidden.view(b, 2, n, -1)[:, :, :k]
            cond, uncond = h[:, 0].reshape(b * k, -1), h[:, 1].reshape(b * k, -1)
            shape, dev, dt = (b * k, 32), cond.device, cond.dtype
            self.gen.diffloss.sample(
                cond,
                lambda kind, shape=shape, dev=dev, dt=dt: torch.randn(
                    shape, generator=g, device=dev, dtype=dt
                ),
                uncond=uncond,
                guidance=torch.full((b * k,), 4.5, device=dev),
                steps=head_steps,
            )
        self.tok.decode(torch.randn(b, 32, *grid, generator=g, device=states.device))


def timed(fn, repeat: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--full", action="store_true", help="official sizes (1152 x 28, codebook 16384, full decoder)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None, help="image side (default 256; --full: 512)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--codebook", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--head-depth", type=int, default=3)
    ap.add_argument("--decoder-div", type=int, default=4, help="decoder widths = DC-HT's / this (CPU runs)")
    ap.add_argument("--batches", default=None, help="default 1,8 (--full: 1,8,16)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plot", default="peers.png", help="PNG plot path ('' to skip)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    args.size = args.size or (512 if args.full else 256)
    args.batches = args.batches or ("1,8,16" if args.full else "1,8")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen_cfg, widths = configs(args)
    dcar = DCAR(gen_cfg, widths, device, dtype)
    systems = [dcar, SanaStyle(gen_cfg, widths, device, dtype, args.size), MARStyle(dcar)]
    batches = [int(b) for b in args.batches.split(",")]

    g = torch.Generator().manual_seed(0)
    results: dict[str, dict[int, float]] = {s.name: {} for s in systems}
    for b in batches:
        states = torch.randn(b, 20, gen_cfg.context_dim, generator=g).to(device, dtype)
        text = (states, torch.ones(b, 20, dtype=torch.long, device=device))
        for s in systems:  # interleaved per batch size, so drifting machine load hits all three alike
            results[s.name][b] = timed(lambda s=s, text=text: s(text, args.size), args.repeat, device)

    print(
        f"# peers at equal width/depth: width {gen_cfg.hidden_size}, depth {gen_cfg.num_layers}, heads "
        f"{gen_cfg.num_heads}, codebook {gen_cfg.codebook_size}, decoder widths {list(widths)}, {args.size}px, "
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()}; median of {args.repeat}"
    )
    head = "| system | " + " | ".join(f"batch {b}: s/batch | img/s" for b in batches) + " |"
    print(head)
    print("|---|" + "---|---|" * len(batches))
    base = results[systems[0].name]
    for s in systems:
        r = results[s.name]
        print(f"| {s.name} | " + " | ".join(f"{r[b]:.3f} | {b / r[b]:.2f}" for b in batches) + " |")
    print()
    print("| ratio vs DC-AR | " + " | ".join(f"latency x (batch {b})" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for s in systems[1:]:
        r = results[s.name]
        print(f"| {s.name} | " + " | ".join(f"{r[b] / base[b]:.2f}" for b in batches) + " |")
    b1 = batches[0]
    for s in systems[1:]:
        print(f"DC-AR latency at batch {b1} = {base[b1] / results[s.name][b1]:.2f} x {s.name}")
    if args.plot:
        latency_throughput_plot(
            results,
            args.plot,
            f"DC-AR vs peers ({args.size}px, width {gen_cfg.hidden_size}, depth {gen_cfg.num_layers})",
        )


if __name__ == "__main__":
    main()
