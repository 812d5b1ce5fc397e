"""The residual diffusion head: SimpleMLPAdaLN plus its iDDPM loss and sampler.

Reference: LTH14/mar ``models/diffloss.py`` (Li et al., "Autoregressive Image Generation without Vector
Quantization", 2024), used unchanged by HART and DC-AR. The head is per token: each position's residual
(32-d, divided by ``vae_scale``) is denoised conditioned on that position's transformer hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dcar.model.config import DiffusionHeadConfig
from dcar.model.diffusion import DiffusionSchedule, ancestral_step


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal embedding ([cos | sin], DiT/MAR order) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # type: ignore[arg-type]  # a Linear's weight


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """x_t (M, C), t (M,), condition (M, Z) -> [eps | variance interpolation] (M, 2C)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The network after its condition embedding ``y`` = time_embed(t) + cond_embed(c) (M, width).

        A sampling loop computes ``cond_embed`` once and ``time_embed`` once per schedule, not per step.
        """
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        uc: torch.Tensor,
        scale: torch.Tensor,
        forward: Callable | None = None,
    ) -> torch.Tensor:
        """Both branches on the same x_t (M, C) in one batch; eps = (1 + s) eps_c - s eps_u per row.

        ``t`` is (M,) for both branches or (2M,) with the unconditional half's own timesteps (the
        official wrapper takes the doubled batch). The variance channels are the conditional branch's.
        ``forward`` replaces the plain network call (e.g. by a compiled one).
        """
        t = t if t.shape[0] == 2 * x.shape[0] else torch.cat([t, t])
        out = (self.forward if forward is None else forward)(torch.cat([x, x]), t, torch.cat([c, uc]))
        return guide_eps(out, scale, self.in_channels)


def guide_eps(out: torch.Tensor, scale: torch.Tensor, channels: int) -> torch.Tensor:
    """[cond; uncond] outputs (2M, 2C) -> (M, 2C) float32 with eps = (1 + s) eps_c - s eps_u per row.

    In float32: with s = 4.5 the difference is amplified 4.5x, which a float16 output can overflow.
    """
    cond, uncond = out.float().chunk(2)
    s = scale.float().view(-1, 1)
    eps = cond[:, :channels] + s * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], dim=1)


NoiseFn = Callable[[str], torch.Tensor]
"""``noise(kind)`` returns standard normal noise (M, C) for kind "init" or "step"."""


class DiffusionHead(nn.Module):
    """Holds the network as ``net`` (official key prefix ``diffloss.net``) and the two schedules."""

    def __init__(self, cfg: DiffusionHeadConfig, target_channels: int, cond_channels: int):
        super().__init__()
        self.cfg = cfg
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, cfg.width, 2 * target_channels, cond_channels, cfg.depth)
        self.train_schedule = DiffusionSchedule.create(cfg.train_steps, cfg.noise_schedule)
        self._sample_schedules: dict[int, DiffusionSchedule] = {}

    def initialize_weights(self) -> None:
        """MAR init: xavier linears, N(0, .02) time MLP, zero adaLN outputs and final linear."""
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # (nn.Module attribute and item types are not known to mypy here: Linear layers throughout)
        nn.init.normal_(self.net.time_embed.mlp[0].weight, std=0.02)  # type: ignore[arg-type]
        nn.init.normal_(self.net.time_embed.mlp[2].weight, std=0.02)  # type: ignore[arg-type]
        for block in self.net.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)  # type: ignore[index,union-attr]
            nn.init.zeros_(block.adaLN_modulation[-1].bias)  # type: ignore[index,union-attr]
        for lin in (self.net.final_layer.adaLN_modulation[-1], self.net.final_layer.linear):
            nn.init.zeros_(lin.weight)  # type: ignore[arg-type]
            nn.init.zeros_(lin.bias)  # type: ignore[arg-type]

    def schedule(self, steps: int | None = None) -> DiffusionSchedule:
        steps = steps or self.cfg.num_sampling_steps
        if steps not in self._sample_schedules:
            self._sample_schedules[steps] = DiffusionSchedule.create(
                self.cfg.train_steps, self.cfg.noise_schedule, respace=steps
            )
        return self._sample_schedules[steps]

    def loss(
        self, target: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training loss on residuals (M, C) (unscaled) conditioned on hidden states (M, Z).

        Each pair is repeated ``batch_mul`` times with independent t and noise; loss = MSE(eps) + VB
        (the VB term trains only the variance: its mean is detached), improved-diffusion's hybrid loss.
        """
        mul = self.cfg.batch_mul
        x0 = (target / self.cfg.vae_scale).repeat(mul, 1)
        cond = cond.repeat(mul, 1)
        sched = self.train_schedule
        t = torch.randint(0, sched.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = sched.q_sample(x0, t, noise)
        out = self.net(xt, t, cond)
        eps, v = out[:, : self.in_channels], out[:, self.in_channels :]
        mse = F.mse_loss(eps, noise, reduction="none").mean(dim=1)
        frozen = torch.cat([eps.detach(), v], dim=1)
        mean, log_var, _ = sched.p_mean_variance(frozen, xt, t, clip=False)
        vb = sched.vb_term(x0, xt, t, mean, log_var)
        return (mse + vb).mean()

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        noise: NoiseFn,
        uncond: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        temperature: torch.Tensor | float = 1.0,
        steps: int | None = None,
        forward: Callable | None = None,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling of residuals for conditions (M, Z); returns (M, C) float32 times vae_scale.

        With ``uncond`` given, classifier-free guidance per row with ``guidance`` (M,). ``temperature``
        scales the per-step noise (scalar or (M,)). Noise is drawn through ``noise`` only, in the official
        order: one "init" draw, then one "step" draw per step (the last is multiplied by 0).
        ``forward`` replaces ``denoise_step`` (e.g. a compiled one). ``pad_to`` runs the loop on that many
        rows (copies of the last row, zero noise), so a CUDA graph per bucket serves every M up to it.

        The network runs in its own dtype; x_t, guidance and the posterior stay float32 (see
        model/diffusion.py). The condition and time embeddings, the cond/uncond concatenation and the
        schedule constants are computed once before the loop; the loop itself never syncs with the host.
        """
        step_fn = self.denoise_step if forward is None else forward
        sched = self.schedule(steps)
        dev = cond.device
        m = cond.shape[0]
        pad = 0 if pad_to is None else max(0, pad_to - m)

        def rows(t: torch.Tensor) -> torch.Tensor:  # (M, ...) -> (M + pad, ...) with copies of the last row
            return t if not pad else torch.cat([t, t[-1:].expand(pad, *t.shape[1:])])

        def draw(kind: str) -> torch.Tensor:
            z = noise(kind).float()
            return z if not pad else torch.cat([z, z.new_zeros(pad, *z.shape[1:])])

        x = draw("init")
        temp = rows(torch.as_tensor(temperature, dtype=torch.float32, device=dev).reshape(-1, 1).expand(m, 1))
        coefs = sched.step_coefficients(dev)
        c_all = rows(cond) if uncond is None else torch.cat([rows(cond), rows(uncond)])
        y_cond = self.net.cond_embed(c_all.to(self.net.cond_embed.weight.dtype))
        t_emb = self.net.time_embed(sched.on_device("timestep_map", dev))  # (steps, width)
        g = None if uncond is None else rows(guidance.float().to(dev).view(-1, 1).expand(m, 1))  # type: ignore[union-attr]  # given with uncond
        for i in reversed(range(sched.num_steps)):
            x = step_fn(x, y_cond + t_emb[i], coefs[i], draw("step"), temp, g)
        return x[:m] * self.cfg.vae_scale

    def denoise_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        coef: torch.Tensor,
        z: torch.Tensor,
        temperature: torch.Tensor,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """x_t (M, C) float32 -> x_{t-1}: the network in its dtype on ``y`` (M or 2M rows), the rest float32."""
        xin = x.to(y.dtype)
        if guidance is None:
            out = self.net.forward_embedded(xin, y).float()
        else:
            out = guide_eps(self.net.forward_embedded(torch.cat([xin, xin]), y), guidance, self.in_channels)
        return ancestral_step(x, out, coef, z, temperature)
