"""Hybrid vector quantizer of DC-HT.

Each latent vector is l2-normalised and matched by cosine similarity against an l2-normalised codebook.
The discrete part is the (normalised) codeword; the continuous part is the residual
``normalised latent - codeword``, so ``codeword + residual`` gives back the normalised latent exactly.
Distances are computed in fp32 whatever the model dtype (1d-tokenizer's ``VectorQuantizer`` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """All tensors NCHW except ``tokens`` (B, h*w) and ``residual`` (B, h*w, C), row-major over the grid."""

    normalized: torch.Tensor  # (B, C, h, w) the l2-normalised latent (continuous path input)
    codewords: torch.Tensor  # (B, C, h, w) normalised codebook rows of the chosen ids
    quantized: torch.Tensor  # (B, C, h, w) straight-through form: codewords forward, identity gradient
    indices: torch.Tensor  # (B, h, w) int64
    codebook_loss: torch.Tensor  # scalar: ||sg(z) - e||^2
    commitment_loss: torch.Tensor  # scalar: ||z - sg(e)||^2 (multiply by beta outside)

    @property
    def tokens(self) -> torch.Tensor:
        return self.indices.flatten(1)

    @property
    def residual(self) -> torch.Tensor:
        return (self.normalized - self.codewords).flatten(2).transpose(1, 2)


class HybridQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, l2_norm: bool = True):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        # Official init: uniform in +-1/N.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        """(N, C) fp32 codebook as used for lookup (normalised when l2_norm)."""
        e = self.embedding.weight.float()
        return F.normalize(e, dim=-1) if self.l2_norm else e

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return F.normalize(z, dim=1) if self.l2_norm else z

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise a latent map (B, C, h, w)."""
        zn = self.normalize(z)
        b, c, h, w = zn.shape
        flat = zn.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        codebook = self.codebook()
        # Squared Euclidean distance ||z||^2 + ||e||^2 - 2 z.e, the official form (argmin ties resolve alike).
        d = flat.square().sum(1, keepdim=True) + codebook.square().sum(1)[None] - 2.0 * flat @ codebook.t()
        indices = d.argmin(dim=1)
        codewords = codebook[indices].view(b, h, w, c).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(codewords, zn.detach())
        commitment_loss = F.mse_loss(zn, codewords.detach())
        quantized = zn + (codewords - zn).detach()
        return QuantizerOutput(
            normalized=zn,
            codewords=codewords,
            quantized=quantized,
            indices=indices.view(b, h, w),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    def lookup(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Ids (B, h*w) -> codeword latent (B, C, h, w), fp32."""
        h, w = grid
        e = self.codebook()[tokens]  # (B, h*w, C)
        return e.view(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
