"""DC-AE f32 encoder and decoder, as DC-HT builds them.

Reference: mit-han-lab/efficientvit ``efficientvit/models/efficientvit/dc_ae.py`` and its ``ops.py``
(Chen et al., "Deep Compression Autoencoder", 2024), with DC-HT's norms (ln2d in the encoder and in
the decoder's EfficientViT stages, bn2d in the decoder's ResBlock stages). Module attribute names follow
the official ones exactly, so official checkpoints load with ``strict=True`` and no key renaming.

Shapes: images (B, 3, H, W) in [-1, 1]; latents (B, C_lat, H/32, W/32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from dcar.model.config import DecoderConfig, EncoderConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every pixel of an NCHW map (efficientvit ``LayerNorm2d``, eps 1e-5).

    Statistics in float32 whatever the input dtype: in the decoder's last norm |x - mean| reaches ~900 at
    256 px, whose square overflows float16 (those pixels would normalise to 0). The result is cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf - xf.mean(dim=1, keepdim=True)
        out = out / torch.sqrt(out.square().mean(dim=1, keepdim=True) + self.eps)
        out = out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return out.to(x.dtype)


@overload
def build_norm(name: str, channels: int) -> nn.Module: ...
@overload
def build_norm(name: None, channels: int) -> None: ...
@overload
def build_norm(name: str | None, channels: int) -> nn.Module | None: ...
def build_norm(name: str | None, channels: int) -> nn.Module | None:
    if name is None:
        return None
    if name == "ln2d":
        return LayerNorm2d(channels)
    if name == "bn2d":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {name!r}; expected 'ln2d', 'bn2d' or None")


@overload
def build_act(name: str) -> nn.Module: ...
@overload
def build_act(name: None) -> None: ...
@overload
def build_act(name: str | None) -> nn.Module | None: ...
def build_act(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; expected 'relu', 'silu' or None")


class ConvLayer(nn.Module):
    """conv -> norm -> act, 'same' padding. Submodule names ``conv``/``norm`` match the checkpoints."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        groups: int = 1,
        bias: bool = False,
        norm: str | None = None,
        act: str | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = build_norm(norm, cout)
        self.act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """Sequential whose children live under ``op_list`` (the official key prefix)."""

    def __init__(self, ops: Sequence[nn.Module | None]):
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """``main(x) + shortcut(x)``; the shortcut is identity or a parameter-free resampler."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ResBlock(nn.Module):
    """conv3x3(+bias) -> act -> conv3x3(no bias) -> norm; the identity skip is added by ResidualBlock."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """ReLU linear attention, head dim 32, no multi-scale branches (``scales=()``).

    Computed in fp32 whatever the input dtype: the normaliser ``1^T K^T Q`` overflows fp16 at 512 px.
    qkv channels are laid out per head as [q(32), k(32), v(32)], as the official reshape reads them.
    """

    def __init__(self, channels: int, norm: str, dim: int = 32, eps: float = 1e-15):
        super().__init__()
        self.dim = dim
        self.eps = eps
        heads = channels // dim
        self.qkv = ConvLayer(channels, 3 * heads * dim, 1, bias=False)
        self.proj = ConvLayer(heads * dim, channels, 1, bias=False, norm=norm)

    def _qkv(self, qkv: torch.Tensor):
        b, _, h, w = qkv.shape
        qkv = qkv.float().reshape(b, -1, 3 * self.dim, h * w)  # (B, heads, 3*dim, N)
        q, k, v = qkv[:, :, : self.dim], qkv[:, :, self.dim : 2 * self.dim], qkv[:, :, 2 * self.dim :]
        return F.relu(q), F.relu(k), v

    def linear_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, h, w = qkv.shape
        q, k, v = self._qkv(qkv)
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # extra row of ones gives the normaliser
        out = (v @ k.transpose(-1, -2)) @ q  # (B, heads, dim+1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, h, w)

    def quadratic_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, h, w = qkv.shape
        q, k, v = self._qkv(qkv)
        att = k.transpose(-1, -2) @ q  # (B, heads, N, N)
        att = att / (att.sum(dim=2, keepdim=True) + self.eps)
        return (v @ att).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        h, w = qkv.shape[-2:]
        # The official switch: the quadratic form for maps of at most `dim` positions. Both are the same
        # attention; they differ only in where eps sits, which the goldens resolve at tiny sizes.
        if h * w > self.dim:
            out = self.linear_attention(qkv)
        else:
            out = self.quadratic_attention(qkv)
        return self.proj(out.to(x.dtype))


class GLUMBConv(nn.Module):
    """1x1 expand to 8C (+bias, act) -> depthwise 3x3 (+bias) -> GLU gate (act) -> 1x1 to C -> norm."""

    def __init__(self, channels: int, norm: str, act: str, expand_ratio: int = 4):
        super().__init__()
        mid = channels * expand_ratio
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True)
        self.glu_act = build_act(act)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depth_conv(self.inverted_conv(x))
        x, gate = torch.chunk(x, 2, dim=1)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    """Global context (LiteMLA) then local mixing (GLUMBConv), each a residual sub-block."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, norm), Identity())
        self.local_module = ResidualBlock(GLUMBConv(channels, norm, act), Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def build_block(block_type: str, channels: int, norm: str, act: str) -> nn.Module:
    if block_type == "ResBlock":
        return ResidualBlock(ResBlock(channels, norm, act), Identity())
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, norm, act)
    raise ValueError(f"unknown block type {block_type!r}; expected 'ResBlock' or 'EViT_GLU'")


class ConvPixelUnshuffleDownsample(nn.Module):
    """conv to cout/4 channels, then pixel-unshuffle x2."""

    def __init__(self, cin: int, cout: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(cin, cout // factor**2, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), self.factor)


class ChannelAveragingDownsample(nn.Module):
    """Parameter-free shortcut: pixel-unshuffle, then average consecutive channel groups down to cout."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        self.factor, self.cout = factor, cout
        self.group = cin * factor**2 // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x
        b, _, h, w = x.shape
        return x.view(b, self.cout, self.group, h, w).mean(dim=2)


class ConvPixelShuffleUpsample(nn.Module):
    """conv to cout*4 channels, then pixel-shuffle x2."""

    def __init__(self, cin: int, cout: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(cin, cout * factor**2, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), self.factor)


class ChannelDuplicatingUpsample(nn.Module):
    """Parameter-free shortcut: repeat each channel, then pixel-shuffle, so the result has cout channels."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        self.factor = factor
        self.repeats = cout * factor**2 // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.repeats, dim=1)
        return F.pixel_shuffle(x, self.factor) if self.factor > 1 else x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, C_lat, H/32, W/32)."""

    def __init__(self, cfg: EncoderConfig, in_channels: int, latent_channels: int):
        super().__init__()
        widths, depths = cfg.width_list, cfg.depth_list
        # Stage 0 has depth 0, so the stem itself downsamples x2 into width[1] (no shortcut).
        self.project_in = ConvPixelUnshuffleDownsample(in_channels, widths[1])
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            ops: list[nn.Module] = [
                build_block(cfg.block_type[i], width, cfg.norm, cfg.act) for _ in range(depth)
            ]
            if i < len(widths) - 1 and depth > 0:
                ops.append(
                    ResidualBlock(
                        ConvPixelUnshuffleDownsample(width, widths[i + 1]),
                        ChannelAveragingDownsample(width, widths[i + 1], factor=2),
                    )
                )
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = ResidualBlock(
            OpSequential([ConvLayer(widths[-1], latent_channels, 3, bias=True)]),
            ChannelAveragingDownsample(widths[-1], latent_channels, factor=1),
        )

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        x = self.project_in(x)
        if trace is not None:
            trace["encoder.project_in"] = x
        for i, stage in enumerate(self.stages):
            if len(stage.op_list) == 0:  # type: ignore[arg-type]  # ModuleList items are typed Module
                continue
            x = stage(x)
            if trace is not None:
                trace[f"encoder.stages.{i}"] = x
        x = self.project_out(x)
        if trace is not None:
            trace["encoder.project_out"] = x
        return x


class Decoder(nn.Module):
    """Latent (B, C_lat, h, w) -> image (B, 3, 32h, 32w), unclamped (about [-1, 1])."""

    def __init__(self, cfg: DecoderConfig, out_channels: int, latent_channels: int):
        super().__init__()
        widths, depths = cfg.width_list, cfg.depth_list
        self.project_in = ResidualBlock(
            ConvLayer(latent_channels, widths[-1], 3, bias=True),
            ChannelDuplicatingUpsample(latent_channels, widths[-1], factor=1),
        )
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            ops: list[nn.Module] = []
            if i < len(widths) - 1 and depth > 0:
                ops.append(
                    ResidualBlock(
                        ConvPixelShuffleUpsample(widths[i + 1], width),
                        ChannelDuplicatingUpsample(widths[i + 1], width, factor=2),
                    )
                )
            ops += [build_block(cfg.block_type[i], width, cfg.norm[i], cfg.act[i]) for _ in range(depth)]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        # Stage 0 has depth 0, so the head upsamples the last x2 itself: LN, ReLU, conv + pixel-shuffle.
        self.project_out = OpSequential(
            [
                build_norm(cfg.out_norm, widths[1]),
                build_act(cfg.out_act),
                ConvPixelShuffleUpsample(widths[1], out_channels),
            ]
        )

    def forward(self, z: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        x = self.project_in(z)
        if trace is not None:
            trace["decoder.project_in"] = x
        for i in reversed(range(len(self.stages))):
            stage = self.stages[i]
            if len(stage.op_list) == 0:  # type: ignore[arg-type]  # ModuleList items are typed Module
                continue
            x = stage(x)
            if trace is not None:
                trace[f"decoder.stages.{i}"] = x
        return self.project_out(x)
