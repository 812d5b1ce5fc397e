"""Training losses: pixel reconstruction, the PatchGAN discriminator and its hinge losses (tokenizer), and
the generator's masking distribution and masked-token cross-entropy.

References: LlamaGen ``tokenizer/tokenizer_image/vq_loss.py`` and taming-transformers'
``NLayerDiscriminator`` (PatchGAN, hinge); 1d-tokenizer ``modeling/modules/losses.py`` ``MLMLoss``
(label smoothing over every position, unmasked positions down-weighted) and DC-AR's
``masking_input_tokens`` (arccos mask ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(
    rec: torch.Tensor,
    target: torch.Tensor,
    l1: float = 1.0,
    l2: float = 1.0,
    pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``l1 * |rec - x| + l2 * (rec - x)^2``, both means over pixels; images in [-1, 1].

    LlamaGen uses L2 plus LPIPS; LPIPS needs downloaded VGG weights, so L1 takes its place as the
    edge-sharpening term (L1 penalises small residual blur more than L2 does). ``pixel_weight`` (B, 1, H, W)
    turns both means into weighted means (``outline_weights``); the logged l1/l2 stay unweighted.
    """
    rec = rec.float()
    err = rec - target
    a, b = err.abs().mean(), err.square().mean()
    if pixel_weight is None:
        return l1 * a + l2 * b, {"l1": a.item(), "l2": b.item()}
    w = pixel_weight.float()  # broadcast over channels: (err * w).mean() / w.mean() is the weighted mean
    loss = (l1 * (err.abs() * w).mean() + l2 * (err.square() * w).mean()) / w.mean()
    return loss, {"l1": a.item(), "l2": b.item()}


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


@torch.no_grad()
def outline_weights(
    images: torch.Tensor, weight: float, band: int = 5, threshold: float = 0.2
) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): ``1 + weight`` within ``band`` pixels of an outline, else 1.

    Outlines are where the Sobel gradient of the [0, 1] image (summed over channels and both directions)
    exceeds ``threshold``. A plain pixel loss spends almost all its weight on flat areas, so a small
    shape's corners cost little; v1's tokenizer rounded them and the detector read squares and triangles
    as circles (docs/training.md). The band is a max-pool of the outline pixels.
    """
    x = images.float() * 0.5 + 0.5
    c = x.shape[1]
    kx = _SOBEL.to(x.device).view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    ky = _SOBEL.t().contiguous().to(x.device).view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")  # zero padding would make every image border an outline
    grad = F.conv2d(x, kx, groups=c).abs() + F.conv2d(x, ky, groups=c).abs()
    edges = (grad.sum(1, keepdim=True) > threshold).float()
    if band > 1:
        edges = F.max_pool2d(edges, band, stride=1, padding=band // 2)
    return 1.0 + weight * edges


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] measured on the [0, 1] scale, (B,)."""
    mse = ((a.float() - b.float()) * 0.5).square().flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming ``NLayerDiscriminator``): strided convs -> one logit per patch.

    GroupNorm rather than BatchNorm: batch statistics would couple real and fake batches and ranks.
    """

    def __init__(self, channels: int = 3, ndf: int = 32, layers: int = 3):
        super().__init__()
        ops: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < layers else 1
            ops += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, ndf * mult // 4), ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        ops.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*ops)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


# --- generator ------------------------------------------------------------------------------------


def arccos_mask(
    batch: int, length: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean mask (B, L), True = masked: per row u ~ U(0, 1), ratio = arccos(u) / (pi / 2) clamped to
    [1e-6, 1], round(L * ratio) positions (at least one) chosen uniformly at random.

    The ratio has density (pi/2) sin(pi x / 2): mean 2/pi, so most rows are heavily masked, which is what
    the first unmasking steps of the sampler see.
    """
    u = torch.rand(batch, generator=generator)
    ratio = (torch.arccos(u) / (math.pi * 0.5)).clamp(1e-6, 1.0)
    count = torch.round(length * ratio).long().clamp(min=1)  # (B,)
    scores = torch.rand(batch, length, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a uniformly random permutation per row
    return (ranks < count[:, None]).to(device)


def masked_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """1d-tokenizer ``MLMLoss``: label-smoothed CE at every position, weight 1 where masked and
    ``unmasked_weight`` elsewhere, normalised by the total weight. Logits (B, L, K), targets (B, L)."""
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none", label_smoothing=label_smoothing
    ).view_as(targets)
    weight = torch.where(masked, 1.0, unmasked_weight).to(ce.dtype)
    loss = (ce * weight).sum() / weight.sum()
    with torch.no_grad():
        hit = (logits.argmax(-1) == targets) & masked
        acc = hit.sum().float() / masked.sum().clamp(min=1)
        ce_masked = (ce * masked).sum() / masked.sum().clamp(min=1)
    return loss, {"ce_masked": ce_masked.item(), "acc_masked": acc.item()}
