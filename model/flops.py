"""FLOPs per image by stage, counted from the modules themselves (the roofline's numerator).

The modules are built on the meta device and run under ``torch.utils.flop_counter.FlopCounterMode``,
which counts every matmul, convolution and attention exactly as executed (2 FLOPs per multiply-add),
without allocating memory. Elementwise work (norms, activations, Gumbel sampling) is not counted: it is
bandwidth-bound and small next to the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dcar.model.config import PipelineConfig
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer


@dataclass(frozen=True)
class StageFlops:
    """FLOPs for one image (CFG included), by stage."""

    text_kv: float  # caption keys/values of every block, both branches, once per image
    unmask: float  # all unmasking steps (2 rows per step with CFG)
    residual: float  # all diffusion-head steps (2 x tokens rows per step with CFG)
    decode: float  # DC-HT decoder

    @property
    def total(self) -> float:
        return self.text_kv + self.unmask + self.residual + self.decode


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def image_flops(
    cfg: PipelineConfig,
    size: int | None = None,
    steps: int | None = None,
    residual_steps: int | None = None,
    text_tokens: int = 20,
    cfg_branches: int = 2,
) -> StageFlops:
    """FLOPs of generating one ``size`` x ``size`` image with the given step counts (defaults: the config's)."""
    size = size or cfg.sampling.size
    steps = steps or cfg.sampling.steps
    residual_steps = residual_steps or cfg.sampling.residual_steps
    f = cfg.tokenizer.spatial_compression
    grid = (size // f, size // f)
    n = grid[0] * grid[1]
    with torch.device("meta"):
        gen, tok = DCARTransformer(cfg.generator), DCHT(cfg.tokenizer)
        caption = torch.zeros(cfg_branches, text_tokens, cfg.generator.context_dim)
        mask = torch.ones(cfg_branches, text_tokens, dtype=torch.long)
        ids = torch.zeros(cfg_branches, n, dtype=torch.long)
        holder: dict[str, Any] = {}
        text_kv = _count(lambda: holder.setdefault("kv", gen.text_kv(caption, mask)))
        step = _count(lambda: gen(ids, holder["kv"], grid))
        rows = cfg_branches * n
        x, t = torch.zeros(rows, cfg.generator.token_size), torch.zeros(rows, dtype=torch.long)
        c = torch.zeros(rows, cfg.generator.hidden_size)
        head_step = _count(lambda: gen.diffloss.net(x, t, c))
        decode = _count(lambda: tok.decoder(torch.zeros(1, cfg.tokenizer.latent_channels, *grid)))
    return StageFlops(text_kv, steps * step, residual_steps * head_step, decode)
