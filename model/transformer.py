"""The DC-AR generator transformer.

PixArt-alpha blocks without adaLN (self-attention with QK-norm, cross-attention to T5 states, MLP),
a token embedding whose last row is [MASK], a fixed 2-D sin-cos position table, the PixArt caption MLP
with its null-caption buffer for classifier-free guidance, and a final LayerNorm + Linear over the
codebook. ``forward`` computes one step and returns logits plus the pre-norm hidden state that
conditions the residual diffusion head; the sampling loop lives in model/sampler.py.

Text keys/values depend only on the caption, so ``text_kv`` computes them once per row and every
unmasking step reuses them (``TextKV``). Padded caption positions are excluded by an attention mask,
which is what the official block-diagonal xformers mask does for packed captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcar.model.config import GeneratorConfig
from dcar.model.diffusion_head import DiffusionHead


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], base_size: int) -> torch.Tensor:
    """PixArt's 2-D sin-cos table (1, h*w, dim); the first half of the channels encodes the column.

    Coordinates along each axis are ``index / (size / base_size)``: with base_size 16, a 16x16 grid uses
    0..15 and an 8x8 grid 0, 2, ..., 14 (PixArt's multi-resolution rule). Float64 numpy as the official code.
    """
    h, w = grid
    rows = np.arange(h, dtype=np.float32) / (h / base_size)
    cols = np.arange(w, dtype=np.float32) / (w / base_size)
    gw, gh = np.meshgrid(cols, rows)  # (h, w) each; gw varies along a row

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return torch.tensor(emb, dtype=torch.float32).unsqueeze(0)  # honours a torch.device("meta") context


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm ``Mlp`` key names)."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Bidirectional attention over image tokens; QK-norm is an affine LayerNorm over the full width."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, C)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Image tokens attend to the valid caption tokens of their own row only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption (B, L, C) -> keys, values (B, H, L, D)."""
        b, n, _ = y.shape
        k, v = self.kv_linear(y).view(b, n, 2, self.heads, -1).unbind(2)  # official layout: [k | v]
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, L) bool
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """x += SelfAttn(LN(x)); x += CrossAttn(x, text) (no norm, as PixArt); x += MLP(LN(x))."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, cfg.intermediate_size, d)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The residual stream ``x`` stays float32 whatever the weights' dtype; each sub-layer runs in the
        # weights' dtype. In bfloat16 the stream's own rounding (8-bit mantissa, added to 2L times) moved
        # 43% of the sampled tokens of the tiny model; with a float32 stream, see README "Precision".
        dt = k.dtype
        x = x + self.attn(self.norm1(x).to(dt))
        x = x + self.cross_attn(x.to(dt), k, v, mask)
        return x + self.mlp(self.norm2(x).to(dt))


class CaptionEmbedder(nn.Module):
    """PixArt caption MLP (context_dim -> hidden -> hidden) and the null caption ``y_embedding``."""

    y_embedding: torch.Tensor  # a registered buffer

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.y_proj = Mlp(cfg.context_dim, cfg.hidden_size, cfg.hidden_size)
        # A fixed random buffer, saved in the checkpoint; replaced wholesale by the official one on load.
        self.register_buffer(
            "y_embedding", torch.randn(cfg.text_token_length, cfg.context_dim) / cfg.context_dim**0.5
        )

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """caption (B, L, Cctx); rows where ``drop`` is True use the null caption (same mask kept)."""
        if drop is not None:
            null = self.y_embedding[: caption.shape[1]].to(caption.dtype)
            caption = torch.where(drop[:, None, None], null[None], caption)
        return self.y_proj(caption)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x).to(self.linear.weight.dtype))


@dataclass
class TextKV:
    """Per-block cross-attention keys/values of a batch of captions, plus the key mask.

    ``keys[i]``/``values[i]``: (B, H, L, D) for block i; ``mask``: (B, 1, 1, L) bool, True = attend.
    Rows can be selected and concatenated (``select``/``cat``) so a running batch can admit and drop rows.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[-1]

    def select(self, idx: torch.Tensor | list[int]) -> TextKV:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        return TextKV([k[idx] for k in self.keys], [v[idx] for v in self.values], self.mask[idx])

    def padded(self, length: int) -> TextKV:
        """Pad the key axis to ``length`` with masked-out zeros (so rows with other caption lengths concat)."""
        extra = length - self.length
        if extra <= 0:
            return self
        pad = (0, 0, 0, extra)
        return TextKV(
            [F.pad(k, pad) for k in self.keys],
            [F.pad(v, pad) for v in self.values],
            F.pad(self.mask, (0, extra), value=False),
        )

    @staticmethod
    def cat(parts: list[TextKV]) -> TextKV:
        n = max(p.length for p in parts)
        parts = [p.padded(n) for p in parts]
        blocks = range(len(parts[0].keys))
        return TextKV(
            [torch.cat([p.keys[i] for p in parts]) for i in blocks],
            [torch.cat([p.values[i] for p in parts]) for i in blocks],
            torch.cat([p.mask for p in parts]),
        )


class DCARTransformer(nn.Module):
    """The generator; attribute names match the official ``DCAR`` state dict (incl. ``diffloss.net``)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = nn.Embedding(cfg.codebook_size + 1, d)
        # Frozen but saved: official checkpoints store the table, and the model must use the stored one.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(d, (cfg.grid_size, cfg.grid_size), cfg.pos_embed_base_size),
            requires_grad=False,
        )
        self.y_embedder = CaptionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer = FinalLayer(d, cfg.codebook_size)
        self.diffloss = DiffusionHead(cfg.head, target_channels=cfg.token_size, cond_channels=d)
        self._pos_cache: dict = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: xavier-uniform linears with zero bias, N(0, .02) embeddings, zero final linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.x_embedder.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.diffloss.initialize_weights()

    def text_kv(self, caption: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None = None) -> TextKV:
        """Caption states (B, L, Cctx) and mask (B, L) -> per-block K/V, computed once per row."""
        y = self.y_embedder(caption.to(self.x_embedder.weight.dtype), drop)
        keys, values = [], []
        for blk in self.blocks:
            k, v = blk.cross_attn.kv(y)  # type: ignore[union-attr,operator]  # ModuleList items are typed Module
            keys.append(k)
            values.append(v)
        return TextKV(keys, values, mask.bool()[:, None, None, :])

    def pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for a token grid: the stored one at the native grid, else PixArt's rule.

        The stored table is used as is at the native size (checkpoints may differ from the formula); other
        grids get the sin-cos table of the same rule (coordinates rescaled to ``pos_embed_base_size``).
        """
        g = self.cfg.grid_size
        if tuple(grid) == (g, g):
            return self.pos_embed
        key = (tuple(grid), self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            table = sincos_pos_embed_2d(self.cfg.hidden_size, grid, self.cfg.pos_embed_base_size)
            self._pos_cache[key] = table.to(self.pos_embed.device, self.pos_embed.dtype)
        return self._pos_cache[key]

    def embed(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Ids (B, h*w) -> token embeddings + positions (B, h*w, C)."""
        if ids.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{ids.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} grid")
        return self.x_embedder(ids) + self.pos_table(grid)

    def forward(
        self, ids: torch.Tensor, text: TextKV, grid: tuple[int, int] | None = None, trace: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step. Ids (B, h*w) -> logits (B, h*w, codebook) in the weights' dtype and pre-norm hidden
        states (B, h*w, C) in float32 (the residual stream's dtype)."""
        x = self.embed(ids, grid or (self.cfg.grid_size, self.cfg.grid_size)).float()
        for i, blk in enumerate(self.blocks):
            x = blk(x, text.keys[i], text.values[i], text.mask)
            if trace is not None:
                trace[f"blocks.{i}"] = x
        return self.final_layer(x), x
