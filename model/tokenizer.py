"""DC-HT: the 32x hybrid tokenizer (Wu et al., DC-AR, ICCV 2025).

A DC-AE-f32 encoder, the hybrid quantizer and the decoder. The decoder accepts three kinds of input,
all of the same form (B, C, h, w): the normalised continuous latent, codewords (discrete), or
codewords plus residuals (hybrid, the generation path). Images are in [-1, 1].
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from dcar.model.autoencoder import Decoder, Encoder
from dcar.model.config import TokenizerConfig
from dcar.model.quantizer import HybridQuantizer, QuantizerOutput


class DCHT(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.in_channels, cfg.latent_channels)
        self.decoder = Decoder(cfg.decoder, cfg.in_channels, cfg.latent_channels)
        self.quantize = HybridQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.codebook_l2_norm)

    @property
    def compression(self) -> int:
        return self.cfg.spatial_compression

    def encode(self, images: torch.Tensor) -> QuantizerOutput:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 32 -> quantizer output (ids, residuals, ...)."""
        f = self.compression
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f} on both sides")
        return self.quantize(self.encoder(images))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Any decoder input (B, C, h, w) -> images (B, 3, 32h, 32w), not clamped."""
        weight = cast(torch.Tensor, self.decoder.project_in.main.conv.weight)  # type: ignore[union-attr]
        # Follow the decoder's memory format (channels-last when the sampler asked for it).
        fmt = (
            torch.channels_last
            if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            else torch.contiguous_format
        )
        return self.decoder(latent.to(weight.dtype).contiguous(memory_format=fmt)).contiguous()

    def decode_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int], residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ids (B, h*w) [+ residual (B, h*w, C)] -> images. Without residual this is the discrete path."""
        z = self.quantize.lookup(tokens, grid)
        if residual is not None:
            h, w = grid
            z = z + residual.float().transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return self.decode(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The official module forward: encode, then decode the quantized (straight-through) feature."""
        return self.decode(self.encode(images).quantized)
