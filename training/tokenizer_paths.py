"""The tokenizer's paths as training runs them: stages 1-2 as one module (for DDP), and the fixed
validation scenes with their fp32 reconstructions through both paths (the run's sample grid and val.csv)."""

from __future__ import annotations

import torch
from torch import nn

from dcar.model.tokenizer import DCHT
from dcar.training.dataset import EVAL_STREAM, captioned_scene, image_to_tensor, stream_rng
from dcar.training.render import render
from dcar.training.runlog import autocast


class Autoencode(nn.Module):
    """Stages 1-2 as one module for DDP: image -> (reconstruction, codebook loss, commitment loss, ids)."""

    def __init__(self, tok: DCHT, precision: str):
        super().__init__()
        self.tok, self.precision = tok, precision

    def forward(self, x: torch.Tensor, discrete: bool):
        with autocast(x.device, self.precision):
            z = self.tok.encoder(x)
        with torch.autocast(x.device.type, enabled=False):  # the lookup runs in fp32, as at inference
            if discrete:
                q = self.tok.quantize(z.float())
                latent, cb, commit, ids = q.quantized, q.codebook_loss, q.commitment_loss, q.indices
            else:
                latent = self.tok.quantize.normalize(z)
                cb = commit = torch.zeros((), device=x.device)
                ids = None
        with autocast(x.device, self.precision):
            rec = self.tok.decoder(latent.contiguous(memory_format=torch.channels_last))
        return rec.float(), cb, commit, ids, latent


def val_images(seed: int, n: int, size: int) -> torch.Tensor:
    """The first ``n`` scenes of the evaluation stream (the same as ``write_eval_split``'s first n)."""
    rng = stream_rng(seed, EVAL_STREAM)
    out = []
    for _ in range(n):
        scene, _ = captioned_scene(rng)
        out.append(image_to_tensor(render(scene, size)))
    return torch.stack(out)


@torch.no_grad()
def reconstruct(tok: DCHT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32, eval-mode reconstructions of the continuous and discrete paths."""
    modes = {m: m.training for m in tok.modules()}
    tok.eval()
    q = tok.encode(images)
    out = {"continuous": tok.decode(q.normalized).float(), "discrete": tok.decode(q.codewords).float()}
    for m, mode in modes.items():
        m.training = mode
    return out
