"""DC-AR's hybrid sampler as a state machine: ``start`` -> ``step`` x N -> ``finish``.

The algorithm is the official ``generate()``, written per row:

1. encode the prompt once; the caption K/V of every block are cached for the conditional branch and for
   the null caption (unconditional branch), interleaved so row i is at 2i (cond) and 2i+1 (uncond);
2. start from all-[MASK] ids (an edit starts with its known ids in place);
3. each step: one forward over the 2B batch, CFG on the logits, softmax-temperature annealing, Gumbel
   sampling at temperature 1.5 (1 - r), confidence = sampled logit + Gumbel noise, re-mask the
   lowest-confidence positions down to the arccos schedule's count (the last step keeps everything);
4. after a row's last step, its final hidden states (both branches) condition the diffusion head, which
   samples the residuals with CFG on epsilon; codewords + residuals go through the DC-HT decoder.

Rows may sit at different steps, use different step counts and knobs, and be admitted or dropped
between steps (``merge``/``select``), so a server can batch at iteration level. Each row draws its
randomness from its own generator (model/noise.py), so an image does not depend on its batch mates.
How it computes (cached caption K/V, batched CFG, compilation, padded shapes) is ``SamplerOptions``
(model/sampler_options.py), which never changes a token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dcar.model.batch import (
    BATCH_BUCKETS,
    CAPTION_BUCKETS,
    BatchState,
    Caption,
    Row,
    RowKnobs,
    bucket,
)
from dcar.model.maskgit import guidance_on_device, gumbel, masked_after_step, softmax_temperature
from dcar.model.noise import OfficialOrderNoise, RowNoise
from dcar.model.params import EditSpec, RowResult, SamplingParams
from dcar.model.sampler_options import SamplerOptions
from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer, TextKV

__all__ = ["BatchState", "Caption", "Row", "Sampler", "SamplerOptions", "StepEvent"]


@contextmanager
def _restore_rng_on_error(state: BatchState):
    """Snapshot the rows' generators; put them back if the block raises (no half-consumed randomness)."""
    gens = state.noise.generators if isinstance(state.noise, RowNoise) else []
    saved = [g.get_state() for g in gens]
    try:
        yield
    except BaseException:
        for g, s in zip(gens, saved):
            g.set_state(s)
        raise


def _check_params(params: object) -> list[SamplingParams]:
    """``params`` as a list of SamplingParams, or an error saying what was passed instead."""
    if isinstance(params, (SamplingParams, str)) or not isinstance(params, Sequence):
        raise TypeError(
            f"params must be a list of SamplingParams (one per image), got {type(params).__name__}"
        )
    if not params:
        raise ValueError("params is empty: give at least one SamplingParams (one per image)")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(
                f"params[{i}] must be a SamplingParams (pipe.params(prompt, ...)), got {type(p).__name__}"
            )
    return list(params)


def _per_row(name: str, values: Sequence[Any], n: int) -> list[Any]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} rows: give one per row")
    return values


class _Clock:
    """Stage boundaries without a host sync: CUDA events on a GPU (read only after the caller's own sync),
    ``perf_counter`` elsewhere. The first mark is taken at construction."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        a, b = self.marks[i], self.marks[j]
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


@dataclass(frozen=True)
class StepEvent:
    """Progress of one row after a step: ``step`` of ``steps`` done, ``revealed`` tokens fixed so far."""

    tag: object
    step: int
    steps: int
    revealed: int
    tokens: int


class Sampler:
    def __init__(
        self,
        generator: DCARTransformer,
        tokenizer: DCHT,
        text_encoder: TextEncoder | None,
        options: SamplerOptions | None = None,
    ):
        self.generator = generator
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.options = (options or SamplerOptions()).resolve(self.device, next(tokenizer.parameters()).dtype)
        self._forward = generator.forward
        self._head_step = generator.diffloss.denoise_step
        tokenizer.decoder.to(
            memory_format=torch.channels_last
            if self.options.channels_last_decoder  # type: ignore[call-overload]
            else torch.contiguous_format
        )  # (Module.to takes memory_format; its stubs omit it)
        if self.options.compile or self.options.cuda_graphs:
            # fullgraph: a graph break would silently fall back to eager for part of every step. With buckets
            # the shapes are few and static; without them, one dynamic graph instead of one per shape.
            kw: dict[str, Any] = dict(fullgraph=True, dynamic=not self.options.pad_buckets)
            if self.options.cuda_graphs:
                kw["mode"] = "reduce-overhead"
            self._forward = torch.compile(generator.forward, **kw)
            self._head_step = torch.compile(generator.diffloss.denoise_step, **kw)

    @property
    def device(self) -> torch.device:
        return self.generator.x_embedder.weight.device

    def _sync(self) -> None:
        # Stage timings are wall-clock; on CUDA the host must wait for the kernels to mean anything.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        f = self.tokenizer.compression
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"size {width}x{height} must be positive multiples of {f}")
        return height // f, width // f

    # --- 1. admission ----------------------------------------------------------------------------

    @torch.inference_mode()
    def start(
        self,
        params: Sequence[SamplingParams],
        edits: Sequence[EditSpec | None] | None = None,
        tags: Sequence[object] | None = None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        noise: RowNoise | OfficialOrderNoise | None = None,
    ) -> BatchState:
        """Encode the prompts and set up rows at step 0. ``text`` = (states, mask) skips the T5 encoder.

        ``edits`` and ``tags``, when given, hold one entry per row (an edit of None: a plain generation).
        """
        params = _check_params(params)
        grids = {self.grid_for(p.height, p.width) for p in params}
        if len(grids) != 1:
            raise ValueError(f"rows of one batch must share a token grid, got {sorted(grids)}")
        grid = grids.pop()
        n, length, dev = len(params), grid[0] * grid[1], self.device
        # zip() below would silently drop the rows past the shorter list (2 params and 1 edit gave 1 image).
        edits = _per_row("edits", edits, n) if edits is not None else [None] * n
        tags = _per_row("tags", tags, n) if tags is not None else list(range(n))
        for i, (p, e) in enumerate(zip(params, edits)):
            if e is not None:
                self._check_edit(i, p, e, length)
        rows = [Row(p, e, t) for p, e, t in zip(params, edits, tags)]

        t0 = time.perf_counter()
        if text is None:
            if self.text_encoder is None:
                raise ValueError("this sampler has no text encoder; pass text=(states, mask)")
            text = self.text_encoder([p.prompt for p in params])
        states, mask = text[0].to(dev), text[1].to(dev)
        valid = int(mask.sum(1).max())  # padding beyond the longest prompt is dead weight
        if self.options.pad_buckets:  # ... but a few fixed lengths keep the shapes few (masked, so no effect)
            valid = min(bucket(valid, CAPTION_BUCKETS), self.generator.cfg.text_token_length)
            extra = valid - states.shape[1]
            if extra > 0:
                states = torch.nn.functional.pad(states, (0, 0, 0, extra))
                mask = torch.nn.functional.pad(mask, (0, extra))
        states, mask = states[:, :valid], mask[:, :valid]
        drop = torch.tensor([False, True], device=dev).repeat(n)
        caption = Caption(states.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), drop)
        kv = self._text_kv(caption) if self.options.cache_text_kv else caption
        self._sync()
        for r in rows:
            r.add_time("text_encode", time.perf_counter() - t0)

        mask_id = self.generator.cfg.mask_token_id
        ids = torch.full((n, length), mask_id, dtype=torch.long, device=dev)
        for i, e in enumerate(edits):
            if e is not None:
                tm = e.token_mask.to(dev).bool()
                ids[i] = torch.where(tm, torch.full_like(ids[i], mask_id), e.tokens.to(dev))
        if noise is None:
            noise = RowNoise([torch.Generator(device=dev).manual_seed(p.seed) for p in params])
        return BatchState(grid, rows, ids, kv, noise, ids.clone(), RowKnobs.of(params, dev))

    def _check_edit(self, i: int, p: SamplingParams, e: object, length: int) -> None:
        """Refuse, before any work, an edit that does not fit row ``i``.

        The token count alone let through an edit of a 64x96 image on a 96x64 row (same count, another
        grid): its tokens were laid out in the wrong grid, and the blend failed only after every step.
        """
        if not isinstance(e, EditSpec):
            raise TypeError(
                f"edits[{i}] must be an EditSpec (pipe.prepare_edit) or None, got {type(e).__name__}"
            )
        for name in ("image", "pixel_mask"):
            t = getattr(e, name)
            if t is not None and tuple(t.shape[-2:]) != (p.height, p.width):
                h, w = t.shape[-2:]
                raise ValueError(
                    f"edits[{i}] was prepared from a {w}x{h} {name.replace('_', ' ')}, but its row is "
                    f"{p.width}x{p.height} (width x height): an edit keeps its image's size"
                )
        c = self.generator.cfg.token_size
        for name, shape in (("tokens", (length,)), ("token_mask", (length,)), ("residual", (length, c))):
            got = tuple(getattr(e, name).shape)
            if got != shape:
                raise ValueError(
                    f"edits[{i}].{name} has shape {got}, expected {shape} for a {p.width}x{p.height} row"
                )

    # --- 2. one unmasking step -------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, state: BatchState) -> list[StepEvent]:
        """Advance every unfinished row by one unmasking step.

        Atomic: if it raises (e.g. CUDA out of memory), the batch and its random generators are as they were,
        so a retry (or the halves of a split batch) gives the same images.
        """
        with _restore_rng_on_error(state):
            return self._step(state)

    def _step(self, state: BatchState) -> list[StepEvent]:
        # Everything below stays on the device: the knobs were copied there at admission, and the only
        # device->host copy is the count of revealed tokens per row that the events carry.
        t0 = time.perf_counter()
        dev, rows, k = self.device, state.rows, state.knobs
        b, length = state.ids.shape
        mask_id = self.generator.cfg.mask_token_id

        ratio = (k.step + 1).double() / k.steps.double()  # float64, as the official loop's Python floats
        g = guidance_on_device(k.guidance_decay, k.guidance_scale, k.step, k.steps).float()
        temp = (k.randomize_temperature * (1 - ratio)).float()
        soft = torch.where(k.annealing, softmax_temperature(ratio), torch.ones_like(ratio)).float()
        last = k.step == k.steps - 1

        # Forward both branches (one batch of 2B); CFG on logits: cond + g (cond - uncond).
        state.noise.caption_dropout()
        lc, lu, hidden = self._forward_cfg(state)
        logits = lc + g.view(-1, 1, 1) * (lc - lu)
        logits = logits / soft.view(-1, 1, 1)

        # Sample every position; positions already decoded keep their ids.
        is_mask = state.ids == mask_id
        u = state.noise.uniform("token", (length, logits.shape[-1]), dev)
        sampled = (logits + temp.view(-1, 1, 1) * gumbel(u)).argmax(dim=-1)
        sampled_logits = logits.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where(is_mask, sampled, state.ids)
        sampled_logits = torch.where(is_mask, sampled_logits, torch.full_like(sampled_logits, float("inf")))

        # Re-mask the least confident positions down to the schedule's count.
        keep_masked = masked_after_step(length, ratio, is_mask.sum(dim=1))
        confidence = sampled_logits + temp.view(-1, 1) * gumbel(
            state.noise.uniform("confidence", (length,), dev)
        )
        cutoff = confidence.sort(dim=-1).values.gather(1, (keep_masked - 1).unsqueeze(1))
        remasked = torch.where(confidence <= cutoff, torch.full_like(sampled, mask_id), sampled)
        new_ids = torch.where(last.unsqueeze(1), sampled, remasked)
        # A row with nothing left to generate (an edit whose mask covers no token) keeps its ids.
        new_ids = torch.where(is_mask.any(dim=1, keepdim=True), new_ids, state.ids)
        finals = {
            i: (hidden[0][i].clone(), hidden[1][i].clone())
            for i, r in enumerate(rows)
            if r.step + 1 >= r.params.steps
        }
        revealed = (new_ids != mask_id).sum(dim=1).tolist()  # the step's one device->host copy (it syncs)
        dt = time.perf_counter() - t0

        # Commit: nothing above changed the batch, so a failure before this point leaves it as it was.
        state.ids, state.predicted = new_ids, sampled
        k.step += 1
        events = []
        for i, r in enumerate(rows):
            r.step += 1
            r.add_time("unmask", dt)
            if i in finals:
                r.final_hidden = finals[i]
            events.append(StepEvent(r.tag, r.step, r.params.steps, revealed[i], length))
        return events

    def _text_kv(self, caption: Caption) -> TextKV:
        return self.generator.text_kv(caption.states, caption.mask, caption.drop)

    def _forward_cfg(self, state: BatchState):
        """Cond and uncond logits (B, L, V) in fp32 and hidden states ((B, L, C), (B, L, C))."""
        text = state.text if isinstance(state.text, TextKV) else self._text_kv(state.text)
        if self.options.pad_buckets and isinstance(state.text, TextKV):
            return self._forward_cfg_padded(state)
        if self.options.batch_cfg:
            logits, hidden = self._forward(state.ids.repeat_interleave(2, 0), text, state.grid)
            return logits[0::2].float(), logits[1::2].float(), (hidden[0::2], hidden[1::2])
        b = len(state)
        lc, hc = self._forward(state.ids, text.select(list(range(0, 2 * b, 2))), state.grid)
        lu, hu = self._forward(state.ids, text.select(list(range(1, 2 * b, 2))), state.grid)
        return lc.float(), lu.float(), (hc, hu)

    def _forward_cfg_padded(self, state: BatchState):
        """``_forward_cfg`` on a batch padded to its bucket with [MASK]-only rows (rows never interact, so
        the real rows' outputs are those of the unpadded batch: tested)."""
        b = len(state)
        pad = bucket(b, BATCH_BUCKETS) - b
        if state.padded_text is None:  # once per batch composition, not per step
            fill = [2 * b - 2, 2 * b - 1] * pad  # copies of the last row's pair (any valid caption does)
            state.padded_text = state.text if not pad else state.text.select(list(range(2 * b)) + fill)  # type: ignore[assignment]  # cached TextKV
        ids = state.ids
        if pad:
            ids = torch.cat([ids, ids.new_full((pad, ids.shape[1]), self.generator.cfg.mask_token_id)])
        logits, hidden = self._forward(ids.repeat_interleave(2, 0), state.padded_text, state.grid)  # type: ignore[arg-type]  # set above
        logits, hidden = logits[: 2 * b], hidden[: 2 * b]
        return logits[0::2].float(), logits[1::2].float(), (hidden[0::2], hidden[1::2])

    # --- 3. residuals and decoding -----------------------------------------------------------------

    @torch.inference_mode()
    def finish(self, state: BatchState) -> tuple[list[RowResult], BatchState]:
        """Run the head and the decoder for rows that took their last step.

        Returns their results and the batch without them (the running rows keep going). Atomic like ``step``.
        """
        with _restore_rng_on_error(state):
            return self._finish(state)

    def _finish(self, state: BatchState) -> tuple[list[RowResult], BatchState]:
        done = [i for i, r in enumerate(state.rows) if r.done]
        if not done:
            return [], state
        results: dict[int, RowResult] = {}
        groups: dict[tuple[int, bool], list[int]] = {}
        for i in done:
            p = state.rows[i].params
            groups.setdefault((p.residual_steps, p.use_residuals), []).append(i)
        for (steps, use_res), idx in groups.items():
            for i, res in zip(idx, self._finish_group(state, idx, steps, use_res)):
                results[i] = res
        rest = [i for i in range(len(state)) if i not in results]
        return [results[i] for i in done], state.select(rest)

    def _finish_group(self, state: BatchState, idx: list[int], steps: int, use_res: bool) -> list[RowResult]:
        rows = [state.rows[i] for i in idx]
        ids = state.ids[idx]
        n, length = ids.shape
        dev = self.device
        residual = None
        clock = _Clock(dev)
        if use_res:
            # (every row that took its last step has final_hidden)
            cond = torch.stack([r.final_hidden[0] for r in rows]).reshape(n * length, -1)  # type: ignore[index]
            uncond = torch.stack([r.final_hidden[1] for r in rows]).reshape(n * length, -1)  # type: ignore[index]
            k = state.knobs.select(torch.tensor(idx, dtype=torch.long).to(dev))
            g = guidance_on_device(k.guidance_decay, k.guidance_scale, k.steps - 1, k.steps).float()
            noise = state.noise.subset(idx)
            c = self.generator.cfg.token_size

            def draw(kind: str) -> torch.Tensor:
                return noise.normal(f"head_{kind}", (length, c), dev).reshape(n * length, c)

            residual = (
                self.generator.diffloss.sample(
                    cond,
                    draw,
                    uncond=uncond,
                    guidance=g.repeat_interleave(length),
                    temperature=k.residual_temperature.repeat_interleave(length),
                    steps=steps,
                    forward=self._head_step,
                    pad_to=bucket(n, BATCH_BUCKETS) * length if self.options.pad_buckets else None,
                )
                .float()
                .view(n, length, c)
            )
            for j, r in enumerate(rows):
                if r.edit is not None:  # known positions keep the input image's own residuals
                    tm = r.edit.token_mask.to(dev).bool().unsqueeze(-1)
                    residual[j] = torch.where(tm, residual[j], r.edit.residual.to(dev).float())
        clock.mark()
        raw = self.tokenizer.decode_tokens(ids, state.grid, residual).float()
        images = (raw * 0.5 + 0.5).clamp(0, 1)
        for j, r in enumerate(rows):
            e = r.edit
            if e is not None and e.blend and e.image is not None and e.pixel_mask is not None:
                pm = e.pixel_mask.to(dev).float()
                images[j] = pm * images[j] + (1 - pm) * (e.image.to(dev).float() * 0.5 + 0.5).clamp(0, 1)
        # Checked before the clamp, which would turn inf into a valid-looking pixel (NaN stays NaN).
        finite = torch.isfinite(raw).flatten(1).all(1)
        if residual is not None:
            finite &= torch.isfinite(residual).flatten(1).all(1)
        clock.mark()
        images_cpu, finite_cpu = images.cpu(), finite.tolist()  # the device->host copy of a finish (syncs)
        residual_cpu = None if residual is None else residual.cpu()
        ids_cpu = ids.cpu()
        head_s, decode_s = clock.seconds(0, 1), clock.seconds(1, 2)
        out = []
        for j, r in enumerate(rows):
            r.add_time("residual", head_s)
            r.add_time("decode", decode_s)
            out.append(
                RowResult(
                    images_cpu[j],
                    ids_cpu[j],
                    r.params.seed,
                    dict(r.timings),
                    r.tag,
                    finite=bool(finite_cpu[j]),
                    residual=None if residual_cpu is None else residual_cpu[j],
                )
            )
        return out

    # --- the loop ----------------------------------------------------------------------------------

    def generate(
        self,
        params: Sequence[SamplingParams],
        edits: Sequence[EditSpec | None] | None = None,
        callback=None,
        **start_kwargs,
    ) -> list[RowResult]:
        """Sample a static batch to completion, results in input order; ``callback(events, state)`` per step."""
        params = _check_params(params)
        state = self.start(params, edits, tags=list(range(len(params))), **start_kwargs)
        results: list[RowResult] = []
        while len(state):
            events = self.step(state)
            if callback is not None:
                callback(events, state)
            done, state = self.finish(state)
            results.extend(done)
        return sorted(results, key=lambda r: r.tag)  # type: ignore[arg-type,return-value]  # tags: the callers' order keys

    @torch.inference_mode()
    def preview(self, state: BatchState, index: int, size: int | None = None) -> torch.Tensor:
        """A cheap look at a running row: its latest sampled ids decoded without residuals, [0, 1].

        ``size`` bounds the longer side: the image is downscaled on the device (antialiased) before the copy
        to the host, so a preview costs a small transfer and a small PNG.
        """
        img = self.tokenizer.decode_tokens(state.predicted[index : index + 1], state.grid).float()
        if size is not None and max(img.shape[-2:]) > size:
            h, w = img.shape[-2:]
            scale = size / max(h, w)
            img = torch.nn.functional.interpolate(
                img,
                size=(max(1, round(h * scale)), max(1, round(w * scale))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return (img[0] * 0.5 + 0.5).clamp(0, 1).cpu()
