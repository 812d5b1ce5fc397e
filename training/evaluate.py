"""Evaluation of a weights directory: ShapesEval, tokenizer reconstruction, hybrid vs discrete-only.

* ShapesEval (training/shapes_eval.py) at 256 px, 12 steps, 4 seeds per prompt, the model's own sampling
  defaults; run a second time with the residual head off (the same tokens, decoded from codewords alone).
* Reconstruction on the evaluation split (``write_eval_split``; its scenes re-rendered at each size):
  PSNR and SSIM of the continuous path (normalised latent), the discrete path (codewords) and the hybrid
  path (codewords + the true residuals, which is the continuous latent again up to rounding) at 256 and
  512 px: the tokenizer is trained on 128 px crops, so both sizes test its cross-resolution behaviour.
* Hybrid vs discrete-only against ground truth. Free generations have no ground-truth image, so the
  measure conditions on tokens that do: for each evaluation-split scene, its true ids are given to the
  generator with its caption, with the positions that the sampler's last step still has masked masked
  (the input the head sees in generation), the diffusion head samples the residuals with CFG, and the
  same ids are decoded with and without them. PSNR/SSIM against the scene's rendering then measure
  exactly what the residuals add to the decoded image; the true residuals give the upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dcar.model.images import pil_to_tensor, tensor_to_pil
from dcar.model.maskgit import schedule_counts
from dcar.model.pipeline import Pipeline
from dcar.training.captions import describe
from dcar.training.dataset import load_eval_split, write_eval_split
from dcar.training.render import render
from dcar.training.scenes import COLORS, RELATIONS, SHAPES, Description, Phrase
from dcar.training.shapes_eval import EVAL_PROMPTS, PromptSpec, run_shapes_eval

EVAL_SEED = 1234  # the evaluation split's seed: its scenes never appear in a training stream


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of images in [0, 1],
    per image (B,), averaged over the RGB channels and the valid window positions."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = _gaussian_window().to(a).expand(c, 1, 11, 11)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def psnr01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1], per image (B,)."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp(min=1e-12))).float()


def _to01(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * 0.5 + 0.5).clamp(0, 1)


def eval_split(directory: str | Path, n: int, size: int = 256) -> list:
    """The evaluation split in ``directory`` (written on first use with ``EVAL_SEED``)."""
    directory = Path(directory)
    if not (directory / "scenes.jsonl").is_file():
        write_eval_split(directory, n, size, EVAL_SEED)
    samples = load_eval_split(directory)
    if len(samples) < n:
        raise ValueError(f"{directory} holds {len(samples)} samples, fewer than the {n} asked for")
    return samples[:n]


@torch.inference_mode()
def reconstruction(
    pipe: Pipeline, samples: Sequence, sizes: Sequence[int] = (256, 512), batch: int = 8
) -> dict[str, dict[str, dict[str, float]]]:
    """{size: {path: {"psnr", "ssim"}}} over the split, each scene rendered at each size."""
    tok, dev = pipe.tokenizer, pipe.device
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size in sizes:
        scores: dict[str, dict[str, list[torch.Tensor]]] = {}
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            x = torch.stack([pil_to_tensor(render(s.scene, size)) for s in chunk]).to(dev, pipe.dtype)
            q = tok.encode(x)
            hybrid = q.codewords + (q.normalized - q.codewords)
            decoded = {
                "continuous": tok.decode(q.normalized),
                "discrete": tok.decode(q.codewords),
                "hybrid": tok.decode(hybrid),
            }
            target = _to01(x)
            for path, img in decoded.items():
                rec = _to01(img)
                d = scores.setdefault(path, {"psnr": [], "ssim": []})
                d["psnr"].append(psnr01(rec, target).cpu())
                d["ssim"].append(ssim(rec, target).cpu())
        out[str(size)] = {p: {k: float(torch.cat(v).mean()) for k, v in d.items()} for p, d in scores.items()}
    return out


@torch.inference_mode()
def hybrid_vs_discrete(
    pipe: Pipeline, samples: Sequence, size: int = 256, batch: int = 8, seed: int = 0
) -> dict[str, dict[str, float]]:
    """PSNR/SSIM against the rendered scene of: the true ids decoded alone ("discrete"), with residuals
    sampled by the diffusion head ("hybrid"), and with the true residuals ("hybrid_oracle")."""
    tok, gen, text = pipe.tokenizer, pipe.generator, pipe.text_encoder
    dev, d = pipe.device, pipe.config.sampling
    grid = (size // tok.compression, size // tok.compression)
    length = grid[0] * grid[1]
    still_masked = schedule_counts(length, d.steps)[-2] if d.steps > 1 else length
    g = torch.Generator().manual_seed(seed)
    scores: dict[str, dict[str, list[torch.Tensor]]] = {}
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        n = len(chunk)
        x = torch.stack([pil_to_tensor(render(s.scene, size)) for s in chunk]).to(dev, pipe.dtype)
        q = tok.encode(x)
        ids = q.tokens
        # The last sampling step's input: all ids known except the ones that step reveals.
        order = torch.rand(n, length, generator=g).argsort(1).to(dev)
        masked = torch.zeros(n, length, dtype=torch.bool, device=dev).scatter(
            1, order[:, :still_masked], True
        )
        inp = torch.where(masked, torch.full_like(ids, gen.cfg.mask_token_id), ids)
        states, mask = text([s.caption for s in chunk])
        drop = torch.tensor([False, True], device=dev).repeat(n)
        kv = gen.text_kv(states.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), drop)
        _, hidden = gen(inp.repeat_interleave(2, 0), kv, grid)
        c = gen.cfg.token_size
        shape = (n * length, c)
        residual = (
            gen.diffloss.sample(
                hidden[0::2].reshape(n * length, -1),
                lambda kind, shape=shape: torch.randn(shape, generator=g).to(dev),
                uncond=hidden[1::2].reshape(n * length, -1),
                guidance=torch.full((n * length,), d.guidance_scale, device=dev),
                temperature=d.residual_temperature,
                steps=d.residual_steps,
            )
            .float()
            .view(n, length, c)
        )
        decoded = {
            "discrete": tok.decode_tokens(ids, grid),
            "hybrid": tok.decode_tokens(ids, grid, residual),
            "hybrid_oracle": tok.decode_tokens(ids, grid, q.residual),
        }
        target = _to01(x)
        for path, img in decoded.items():
            rec = _to01(img)
            e = scores.setdefault(path, {"psnr": [], "ssim": []})
            e["psnr"].append(psnr01(rec, target).cpu())
            e["ssim"].append(ssim(rec, target).cpu())
    out = {p: {k: float(torch.cat(v).mean()) for k, v in e.items()} for p, e in scores.items()}
    out["discrete"]["wins"] = 0.0
    hyb, dis = torch.cat(scores["hybrid"]["psnr"]), torch.cat(scores["discrete"]["psnr"])
    out["hybrid"]["wins"] = float((hyb > dis).float().mean())  # share of scenes where residuals help
    return out


def tuning_prompts(per_category: int = 8, seed: int = 7) -> tuple[PromptSpec, ...]:
    """ShapesEval-style prompts that are not ShapesEval's, for choosing sampling defaults (guidance) without
    looking at the benchmark: the same six categories, other shape/colour/count/relation combinations."""
    rng = np.random.default_rng(seed)
    taken = {p.prompt for p in EVAL_PROMPTS}
    colors = list(COLORS)

    def pair() -> tuple[Phrase, Phrase]:
        s1, s2 = rng.choice(SHAPES, 2, replace=False)
        c1, c2 = rng.choice(colors, 2, replace=False)
        return Phrase(str(s1), str(c1)), Phrase(str(s2), str(c2))

    def one() -> Description:  # 24 shape/colour pairs, most of them taken: sizes widen the pool
        size = rng.choice([None, "small", "large"])
        return Description(
            (
                Phrase(
                    str(rng.choice(SHAPES)), str(rng.choice(colors)), size=None if size is None else str(size)
                ),
            )
        )

    makers = {
        "single_object": one,
        "two_object": lambda: Description(pair()),
        "counting": lambda: Description(
            (Phrase(str(rng.choice(SHAPES)), str(rng.choice(colors)), int(rng.integers(2, 5))),)
        ),
        "colors": one,
        "position": lambda: Description(pair(), relation=str(rng.choice(RELATIONS))),
        "color_attr": lambda: Description(pair()),
    }
    out: list[PromptSpec] = []
    for category, make in makers.items():
        texts: list[str] = []
        for _ in range(1000 * per_category):
            if len(texts) == per_category:
                break
            text = describe(make())
            if text not in taken and text not in texts:
                texts.append(text)
        out += [PromptSpec.from_text(category, t) for t in texts]
    return tuple(out)


def shapes_eval(
    pipe: Pipeline,
    size: int = 256,
    steps: int = 12,
    seeds: Sequence[int] = (0, 1, 2, 3),
    use_residuals: bool = True,
    batch_size: int = 16,
    prompts: Sequence[PromptSpec] = EVAL_PROMPTS,
    **overrides,
) -> dict[str, Any]:
    """ShapesEval of the pipeline with its sampling defaults (plus ``overrides``)."""

    def generate(prompts: list[str], row_seeds: list[int]) -> list[Image.Image]:
        params = [
            pipe.params(
                p, seed=s, height=size, width=size, steps=steps, use_residuals=use_residuals, **overrides
            )
            for p, s in zip(prompts, row_seeds)
        ]
        return [tensor_to_pil(r.image) for r in pipe.generate(params)]

    return run_shapes_eval(generate, size=size, seeds=seeds, prompts=prompts, batch_size=batch_size)


def sample_grid(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], size: int = 256) -> Image.Image:
    """Rows = seeds, columns = prompts."""
    params = [pipe.params(p, seed=s, height=size, width=size) for s in seeds for p in prompts]
    images = [np.asarray(tensor_to_pil(r.image)) for r in pipe.generate(params)]
    pad = 4
    grid = np.full((len(seeds) * (size + pad) + pad, len(prompts) * (size + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        i, j = divmod(k, len(prompts))
        grid[
            pad + i * (size + pad) : pad + i * (size + pad) + size,
            pad + j * (size + pad) : pad + j * (size + pad) + size,
        ] = img
    return Image.fromarray(grid)
