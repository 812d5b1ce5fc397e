"""The sampler's options (``SamplerOptions``): how model/sampler.py computes, never what it samples.

Apart from the algorithm because the pipeline, the server settings and the benchmarks pick them without
needing it; model/sampler.py re-exports the class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplerOptions:
    """How the sampler computes, never what: every combination gives the same tokens (tested).

    ``cache_text_kv``: caption keys/values once per row (False: recomputed at every step, as the official
    loop does). ``batch_cfg``: conditional and unconditional branches in one forward of 2B (False: two
    forwards of B). ``compile``: ``torch.compile(fullgraph=True)`` of the transformer step and the head's
    denoising step. ``cuda_graphs``: compile in "reduce-overhead" mode, which captures one CUDA graph per
    shape (needs ``pad_buckets``; only CUDA tensors are captured). ``pad_buckets``: pad the batch to
    1/2/4/.../64 rows and captions to 32/64/128/300 tokens, so only a few shapes ever run.
    ``channels_last_decoder``: run the DC-HT decoder in channels-last memory format (tensor cores on CUDA;
    on CPU, float16/bfloat16 convolutions were 8x faster in channels-last, float32 ones ~9%).
    ``None`` picks per device and dtype (``resolve``).
    """

    cache_text_kv: bool = True
    batch_cfg: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    pad_buckets: bool | None = None
    channels_last_decoder: bool | None = None

    def resolve(self, device: torch.device, dtype: torch.dtype) -> SamplerOptions:
        """These options with every ``None`` replaced by the default for ``device`` and ``dtype``.

        channels-last: on for CUDA and for half precision. Buckets: on for CUDA (fixed shapes for graphs and
        kernels' autotuning) and whenever CUDA graphs are asked for; off on CPU, where padding rows is pure
        extra work.
        """
        cl = self.channels_last_decoder
        if cl is None:
            cl = device.type == "cuda" or dtype in (torch.float16, torch.bfloat16)
        pad = self.pad_buckets
        if pad is None:
            pad = device.type == "cuda" or self.cuda_graphs
        if self.cuda_graphs and not pad:
            raise ValueError("cuda_graphs needs pad_buckets (one graph per padded shape)")
        return replace(self, channels_last_decoder=cl, pad_buckets=pad)
