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


def mask_to_tensor(mask: Image.Image, transparent_means_edit: bool = False) -> torch.Tensor:
    """Mask image -> (1, H, W) float {0, 1}, 1 = regenerate.

    Default convention: white pixels are regenerated (luminance above half), and where the mask has an
    alpha channel only opaque ones (alpha above half): white strokes on black or on transparency both
    work. With ``transparent_means_edit`` (OpenAI's convention) fully transparent pixels are regenerated.
    """
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
