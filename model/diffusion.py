"""The iDDPM Gaussian diffusion process of the residual head.

Reference: openai/improved-diffusion ``gaussian_diffusion.py`` and ``respace.py`` as vendored by MAR and
DC-AR: a 1000-step cosine beta schedule (max beta 0.999), respaced to N evenly spaced steps, epsilon
prediction with learned-range variance, x0 clipped to [-1, 1] at sampling. Arrays are float64 numpy, as
in the official code, and cast to float32 only when gathered for a timestep.

All arithmetic of the process runs in float32 whatever the network's dtype: at t=999 of the cosine
schedule ``sqrt_recip_alphas_cumprod`` is about 2e4, so ``coef * x_t`` overflows float16 for |x_t| > ~3.2
and ``inf - inf`` gives NaN residuals (the official sampler runs entirely in float32 for the same reason).
The coefficients are copied to each device once and cached, so a sampling loop never transfers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """betas from alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2), each clipped at ``max_beta``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
            for i in range(num_steps)
        ],
        dtype=np.float64,
    )


def linear_betas(num_steps: int) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of the base process, first and last included (respace.py rule)."""
    if count == 1:
        return [0]
    stride = (num_timesteps - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


STEP_COEFFICIENTS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_betas",
    "noise_on",
)


def ancestral_step(
    x: torch.Tensor, out: torch.Tensor, coef: torch.Tensor, z: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """One float32 step x_t -> x_{t-1} from the network output [eps | v] (M, 2C), x0 clipped to [-1, 1].

    ``coef`` is one row of ``DiffusionSchedule.step_coefficients``; pure tensor code (no host sync, no
    data-dependent branch), so it compiles with ``fullgraph=True`` and is captured by CUDA graphs.
    """
    sr, srm1, c1, c2, min_log, max_log, noise_on = coef.unbind()
    c = x.shape[1]
    eps, v = out[:, :c], out[:, c:]
    x0 = (sr * x - srm1 * eps).clamp(-1, 1)
    mean = c1 * x0 + c2 * x
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return mean + noise_on * torch.exp(0.5 * log_var) * z * temperature


@dataclass(frozen=True)
class DiffusionSchedule:
    """All per-step arrays of a (possibly respaced) process. ``timestep_map[i]`` is the network's timestep."""

    betas: np.ndarray
    timestep_map: np.ndarray

    def __post_init__(self) -> None:
        b = self.betas
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        pv = b * (1.0 - ac_prev) / (1.0 - ac)
        # The first posterior variance is 0; the official code substitutes the second one in the log.
        pv_log = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(np.maximum(pv, 1e-20))
        values = {
            "log_betas": np.log(b),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": pv,
            "posterior_log_variance_clipped": pv_log,
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @classmethod
    def create(
        cls, train_steps: int = 1000, schedule: str = "cosine", respace: int | None = None
    ) -> DiffusionSchedule:
        if schedule == "cosine":
            base = cosine_betas(train_steps)
        elif schedule == "linear":
            base = linear_betas(train_steps)
        else:
            raise ValueError(f"unknown noise schedule {schedule!r}; expected 'cosine' or 'linear'")
        if respace is None or respace == train_steps:
            return cls(base, np.arange(train_steps))
        if not 1 <= respace <= train_steps:
            raise ValueError(f"respaced steps={respace} must be in [1, {train_steps}]")
        use = set(space_timesteps(train_steps, respace))
        base_ac = np.cumprod(1.0 - base)
        betas, last, kept = [], 1.0, []
        for i, ac in enumerate(base_ac):
            if i in use:
                betas.append(1 - ac / last)
                last = ac
                kept.append(i)
        return cls(np.array(betas, dtype=np.float64), np.array(kept, dtype=np.int64))

    def on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """The named array as a float32 tensor on ``device`` (``timestep_map`` as int64), copied once."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (name, str(device))
        if key not in cache:
            arr = torch.from_numpy(getattr(self, name))
            cache[key] = (arr if name == "timestep_map" else arr.float()).to(device)
        return cache[key]

    def step_coefficients(self, device: torch.device) -> torch.Tensor:
        """(num_steps, 7) float32 on ``device``: per step the constants of one ancestral sampling step,
        in the order of ``STEP_COEFFICIENTS`` (the last is 0 at step 0, where no noise is added)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = ("step", str(device))
        if key not in cache:
            cols = [getattr(self, n) for n in STEP_COEFFICIENTS[:-1]]
            cols.append((np.arange(self.num_steps) != 0).astype(np.float64))
            cache[key] = torch.from_numpy(np.stack(cols, axis=1)).float().to(device)
        return cache[key]

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32, broadcast over like's trailing dims (float32 whatever like's dtype)."""
        arr = self.on_device(name, t.device)[t]
        return arr.view(-1, *([1] * (like.dim() - 1)))

    # --- the process -----------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self.gather("sqrt_alphas_cumprod", t, x0) * x0
            + self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = (
            self.gather("posterior_mean_coef1", t, xt) * x0 + self.gather("posterior_mean_coef2", t, xt) * xt
        )
        return mean, self.gather("posterior_log_variance_clipped", t, xt)

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = True):
        """Network output (M, 2C) = [eps | v] -> (mean, log_variance, pred_x0), learned-range variance."""
        c = xt.shape[1]
        out, xt = out.float(), xt.float()
        eps, v = out[:, :c], out[:, c:]
        min_log = self.gather("posterior_log_variance_clipped", t, xt)
        max_log = self.gather("log_betas", t, xt)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = (
            self.gather("sqrt_recip_alphas_cumprod", t, xt) * xt
            - self.gather("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        )
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    def vb_term(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor
    ) -> torch.Tensor:
        """Variational bound term in bits per dim, per row (KL for t>0, decoder NLL at t=0)."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        kl = 0.5 * (
            -1.0
            + log_var
            - true_log_var
            + torch.exp(true_log_var - log_var)
            + (true_mean - mean) ** 2 * torch.exp(-log_var)
        )
        kl = kl.mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
    """improved-diffusion's decoder likelihood for data in [-1, 1] discretised to 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
