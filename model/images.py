"""Conversions between PIL images and the model's tensors ([-1, 1] images, [0, 1] masks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1] (mean 0.5, std 0.5, as DC-HT was trained)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() * 2 - 1


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB image (rounded to the nearest 8-bit value)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


# Modes whose transparency may live outside an "A" band: a palette's tRNS entries, or a PNG colour key
# ("transparency" in the image's info); Pillow's conversion to RGBA turns either into the alpha channel.
_KEYED_MODES = ("1", "L", "I", "I;16", "P", "PA", "RGB")


def mask_alpha_bands(mask: Image.Image) -> Image.Image:
    """``mask`` with its transparency, wherever the file format keeps it, as an ``A`` band.

    Image editors often save a mask as a palette PNG (mode P, transparent entries in its tRNS chunk): its
    getbands() is ("P",) and the transparency is only in ``info``, so the alpha rules below would not see
    it. A palette image with transparency (or a PA one), and a bilevel, grey (8 or 16 bits) or RGB image
    with a colour key, become RGBA; anything else is left as is (a P image without transparency converts to
    L as it stands, and has no alpha).
    """
    if mask.mode in _KEYED_MODES and ("transparency" in mask.info or mask.mode == "PA"):
        return mask.convert("RGBA")
    return mask


def mask_to_tensor(mask: Image.Image, transparent_means_edit: bool = False) -> torch.Tensor:
    """Mask image -> (1, H, W) float {0, 1}, 1 = regenerate.

    Default convention: white pixels are regenerated (luminance above half), and where the mask has an
    alpha channel only opaque ones (alpha above half): white strokes on black or on transparency both
    work. With ``transparent_means_edit`` (OpenAI's convention) fully transparent pixels are regenerated.
    A palette's transparency (tRNS) and a PNG colour key count as alpha, as an A band does.
    """
    mask = mask_alpha_bands(mask)
    if transparent_means_edit:
        if "A" not in mask.getbands():
            raise ValueError("the mask has no alpha channel; transparent areas mark what to edit")
        alpha = np.asarray(mask.getchannel("A"))
        marked = alpha == 0
    else:
        marked = np.asarray(mask.convert("L")) > 127
        if "A" in mask.getbands():
            marked &= np.asarray(mask.getchannel("A")) > 127
    return torch.from_numpy(marked.astype(np.float32)).unsqueeze(0)
