"""DC-AR generator training, with a small byte-level T5 text encoder trained jointly (the paper's recipe).

Per step, on pre-tokenized scenes (training/pretokenize.py) with freshly drawn captions:

1. encode the captions with the T5 encoder; each row's caption becomes the null caption with probability
   ``text_dropout`` (the generator's ``y_embedding`` buffer, for classifier-free guidance);
2. mask round(L * arccos(u) / (pi/2)) random positions per row (u ~ U(0, 1), at least one) with [MASK];
3. one forward: logits -> label-smoothed CE, unmasked positions down-weighted (1d-tokenizer MLMLoss);
4. the pre-norm hidden states of every position condition the diffusion head, whose loss (MSE(eps) + VB,
   ``batch_mul`` repeats) is taken on that position's ground-truth residual divided by ``vae_scale``;
   ``vae_scale`` is the residual std measured on the pre-tokenized data;
5. loss = CE + ``diffusion_weight`` x diffusion; AdamW, warm-up + cosine, grad clip, EMA.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcar.model.config import GeneratorConfig
from dcar.model.images import tensor_to_pil
from dcar.model.knobs import knob_values
from dcar.model.params import SamplingParams
from dcar.model.sampler import Sampler
from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer
from dcar.training import distributed as dist_utils
from dcar.training.distributed import Dist
from dcar.training.lineage import DATA_META, write_lineage
from dcar.training.losses import arccos_mask, masked_token_loss
from dcar.training.presets import TrainPreset
from dcar.training.pretokenize import META, load_pretokenized, pretokenize, tokens_fingerprint
from dcar.training.runlog import (
    CheckpointTimer,
    CsvLog,
    RunOptions,
    autocast,
    check_resumable,
    is_done,
    load_checkpoint,
    lr_at,
    mark_done,
    progress,
    save_checkpoint,
    save_grid,
    set_lr,
)
from dcar.training.shapes_eval import PromptSpec, score
from dcar.training.streams import TokenData
from dcar.training.trained import is_weights_dir, load_trained_generator, load_trained_tokenizer

COLUMNS = ["step", "lr", "loss", "ce", "ce_masked", "acc_masked", "diffusion", "sec"]
VAL_COLUMNS = ["step", "quick_eval"]

# Held-out monitoring prompts (not ShapesEval's): a quick pass/fail signal in val.csv while training.
MONITOR = (
    ("single_object", "a green square"),
    ("single_object", "a large white triangle"),
    ("two_object", "a yellow circle and a blue triangle"),
    ("two_object", "a white square and a red circle"),
    ("counting", "three red squares"),
    ("counting", "two purple circles"),
    ("colors", "a black triangle"),
    ("colors", "a white square"),
    ("position", "a blue circle to the left of an orange square"),
    ("position", "a red triangle below a green square"),
    ("color_attr", "a purple circle and a green square"),
    ("color_attr", "an orange circle and a black square"),
)


class _Step(nn.Module):
    """Text encoder + generator as one module for DDP: one training forward -> (logits, hidden)."""

    def __init__(self, gen: DCARTransformer, text: TextEncoder):
        super().__init__()
        self.gen, self.text = gen, text

    def forward(self, ids: torch.Tensor, captions: list[str], drop: torch.Tensor, grid: tuple[int, int]):
        states, mask = self.text(captions)
        kv = self.gen.text_kv(states, mask, drop)
        return self.gen(ids, kv, grid)


def generator_config(preset: TrainPreset, residual_std: float) -> GeneratorConfig:
    g = preset.pipeline.generator
    return replace(g, head=replace(g.head, vae_scale=round(residual_std, 5)))


def _param_groups(gen: nn.Module, text: nn.Module, text_lr_scale: float, wd: float) -> list[dict]:
    """Weight decay on matrices only (not biases, norms or the position table); the text encoder may run
    at a scaled learning rate."""
    groups = []
    for module, scale in ((gen, 1.0), (text, text_lr_scale)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": wd, "lr_scale": scale})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale})
    return groups


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), live.buffers()):
        e.copy_(b)


class GeneratorTrainer:
    def __init__(
        self,
        preset: TrainPreset,
        tokenizer_dir: Path,
        data_dir: Path,
        run_dir: Path,
        d: Dist,
        opts: RunOptions,
    ):
        self.preset, self.recipe, self.run_dir, self.d, self.opts = preset, preset.generator, run_dir, d, opts
        r = self.recipe
        if r.needs_init:
            raise ValueError(
                "further: a further schedule for a trained generator has nothing to continue; "
                "give it one with init_from (--init-from RUN_OR_WEIGHTS_DIR)"
            )
        self.tok: DCHT = load_trained_tokenizer(tokenizer_dir, preset).to(
            d.device, memory_format=torch.channels_last
        )
        self.meta = pretokenize(
            self.tok,
            data_dir,
            r.num_images,
            r.image_size,
            r.shard_size,
            opts.seed,
            d,
            opts.progress_bar,
            workers=opts.draw_workers,
        )
        tokens, residuals, scenes, _ = load_pretokenized(data_dir)
        self.grid = tuple(self.meta["grid"])
        self.data = TokenData(tokens, residuals, scenes, opts.seed, d.rank, d.world)
        self.cfg = generator_config(preset, self.meta["residual_std"])
        init = (
            _initial_weights(Path(r.init_from), self.tok, tokenizer_dir, self.cfg, preset)
            if r.init_from
            else None
        )
        if init is not None:
            self.cfg = init[0]  # the head keeps the vae_scale it was trained with
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            self.gen = DCARTransformer(self.cfg)
            self.text = TextEncoder.from_config(preset.pipeline.text_encoder)
        if init is not None:
            self.gen.load_state_dict(init[1].state_dict())
            self.text.load_state_dict(init[2].state_dict())
        self.gen.to(d.device).train()
        self.text.to(d.device).train()
        self.ema_gen = copy.deepcopy(self.gen).eval().requires_grad_(False) if r.ema_decay > 0 else None
        self.ema_text = copy.deepcopy(self.text).eval().requires_grad_(False) if r.ema_decay > 0 else None
        self.opt = torch.optim.AdamW(
            _param_groups(self.gen, self.text, r.text_lr_scale, r.weight_decay), lr=r.lr, betas=r.betas
        )
        self.cpu_gen = torch.Generator().manual_seed(opts.seed * 1000 + d.rank)
        self.dev_gen = torch.Generator(device=d.device).manual_seed(opts.seed * 1000 + 500 + d.rank)
        self.step = 0
        self.elapsed_before, self.session_start = 0.0, time.monotonic()

    def elapsed(self) -> float:
        """Wall seconds spent training this run (pre-tokenizing excluded), over every session."""
        return self.elapsed_before + time.monotonic() - self.session_start

    # --- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        ranks = dist_utils.gather_objects(
            {
                "data": self.data.state(),
                "cpu": self.cpu_gen.get_state(),
                "dev": self.dev_gen.get_state().cpu(),
                "checksum": dist_utils.checksum(self.gen),
            }
        )
        state = {
            "kind": "generator",
            "preset": self.preset.to_dict(),
            "seed": self.opts.seed,
            "generator_config": self.cfg.to_dict(),
            "step": self.step,
            "generator": self.gen.state_dict(),
            "text": self.text.state_dict(),
            "optimizer": self.opt.state_dict(),
            "ranks": ranks,
            "meta": self.meta,
            "elapsed": self.elapsed(),
        }
        if self.ema_gen is not None:
            state["ema_generator"] = self.ema_gen.state_dict()
            state["ema_text"] = self.ema_text.state_dict()
        return state

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.gen.load_state_dict(ckpt["generator"])
        self.text.load_state_dict(ckpt["text"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.ema_gen is not None:
            self.ema_gen.load_state_dict(ckpt["ema_generator"])
            self.ema_text.load_state_dict(ckpt["ema_text"])
        self.step = ckpt["step"]
        self.elapsed_before = ckpt.get("elapsed", 0.0)
        if self.d.rank < len(ckpt["ranks"]):
            mine = ckpt["ranks"][self.d.rank]
            self.data.load_state(mine["data"])
            self.cpu_gen.set_state(mine["cpu"])
            self.dev_gen.set_state(mine["dev"])

    def save(self) -> None:
        state = self.state_dict()
        if self.d.main:
            save_checkpoint(self.run_dir, state)

    # --- loop ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        r, d, opts = self.recipe, self.d, self.opts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is not None:  # refused before data_meta.json is overwritten when the data are others
            check_resumable(self.run_dir, ckpt, "generator", self.preset, opts.seed, self.meta)
        if d.main:
            (self.run_dir / DATA_META).write_text(json.dumps(self.meta, indent=1) + "\n")
            write_lineage(self.run_dir, "generator", r.init_from)
        if ckpt is not None:
            self.load_state_dict(ckpt)
        resume = self.step if ckpt is not None else None
        log = CsvLog(self.run_dir / "losses.csv", COLUMNS, resume) if d.main else None
        val_log = CsvLog(self.run_dir / "val.csv", VAL_COLUMNS, resume) if d.main else None
        step_module: nn.Module = _Step(self.gen, self.text)
        if d.enabled:
            step_module = DDP(step_module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        bar = progress(r.steps, self.step, "generator", d.main and opts.progress_bar)
        timer, sample_timer = (
            CheckpointTimer(opts.checkpoint_minutes, opts.checkpoint_every),
            CheckpointTimer(opts.sample_minutes),
        )
        t_start = time.monotonic()
        while self.step < r.steps:
            if opts.stop_due(self.step, d.device):
                self.save()
                bar.close()
                return {"stopped_at": self.step}
            t0 = time.perf_counter()
            row = self._train_step(step_module)
            self.step += 1
            bar.update(1)
            if log is not None:
                log.write({"step": self.step, "sec": time.perf_counter() - t0, **row})
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc_masked']:.2f}")
            if sample_timer.due(self.step) or self.step == r.steps:
                self._sample(val_log)
                sample_timer.reset()
            if dist_utils.agree(timer.due(self.step), d.device) or self.step == r.steps:
                self.save()
                timer.reset()
        bar.close()
        summary = {
            "steps": r.steps,
            "seconds_this_session": time.monotonic() - t_start,
            "seconds": self.elapsed(),
            "vae_scale": self.cfg.head.vae_scale,
        }
        if d.main:
            mark_done(self.run_dir, summary)
        return summary

    def _train_step(self, model: nn.Module) -> dict[str, float]:
        r, d = self.recipe, self.d
        lr = lr_at(self.step, r.steps, r.lr, r.warmup, r.min_lr_ratio)
        set_lr(self.opt, lr)
        tokens, residuals, captions = self.data.next_batch(r.batch)
        tokens, residuals = tokens.to(d.device), residuals.to(d.device)
        b, length = tokens.shape
        masked = arccos_mask(b, length, self.cpu_gen, d.device)
        drop = (torch.rand(b, generator=self.cpu_gen) < r.text_dropout).to(d.device)
        ids = torch.where(masked, torch.full_like(tokens, self.cfg.mask_token_id), tokens)
        with autocast(d.device, self.opts.precision):
            logits, hidden = model(ids, captions, drop, self.grid)
            ce, parts = masked_token_loss(logits, tokens, masked, r.label_smoothing, r.unmasked_weight)
            diff = self.gen.diffloss.loss(
                residuals.reshape(b * length, -1), hidden.reshape(b * length, -1), generator=self.dev_gen
            )
        loss = ce + r.diffusion_weight * diff.float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        self.opt.step()
        if self.ema_gen is not None:
            decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
            ema_update(self.ema_gen, self.gen, decay)
            ema_update(self.ema_text, self.text, decay)
        row = {"lr": lr, "loss": loss.item(), "ce": ce.item(), "diffusion": diff.item(), **parts}
        return dist_utils.mean_scalars(row, d.device)

    @torch.no_grad()
    def _sample(self, val_log: CsvLog | None) -> None:
        """Generate the monitoring prompts (seed 0 with and without residuals, seed 1), save a grid and log
        the fraction that ShapesEval's verdict passes. Rank 0 only; uses the EMA weights when kept."""
        if not self.d.main:
            return
        gen, text = (self.ema_gen, self.ema_text) if self.ema_gen is not None else (self.gen, self.text)
        modes = {m: m.training for m in (gen, text, self.tok)}
        for m in modes:
            m.eval()
        sampler = Sampler(gen, self.tok, text)
        size = self.recipe.image_size
        d = self.preset.pipeline.sampling
        base = {**knob_values(d), "height": size, "width": size}  # every sampling default of the preset
        base.pop("use_residuals")  # set per monitor row below
        rows = []
        for seed, use_res in ((0, True), (0, False), (1, True)):
            params = [SamplingParams(prompt=p, seed=seed, use_residuals=use_res, **base) for _, p in MONITOR]
            rows.append(torch.stack([res.image for res in sampler.generate(params)]))
        for m, mode in modes.items():
            m.train(mode)
        specs = [PromptSpec.from_text(c, p) for c, p in MONITOR]
        passed = [
            score(tensor_to_pil(img), spec) for row in (rows[0], rows[2]) for img, spec in zip(row, specs)
        ]
        if val_log is not None:
            val_log.write({"step": self.step, "quick_eval": sum(passed) / len(passed)})
        save_grid(rows, self.run_dir / "samples" / f"generator-{self.step:06d}.png", signed=False)


def train_generator(
    preset: TrainPreset,
    tokenizer_dir: str | Path,
    data_dir: str | Path,
    run_dir: str | Path,
    d: Dist,
    opts: RunOptions,
) -> dict[str, Any]:
    """Pre-tokenize (once), then train or resume into ``run_dir``; a finished run is skipped.

    ``tokenizer_dir`` is a finished tokenizer run or a weights directory (its encoder and codebook).
    """
    run_dir, tokenizer_dir = Path(run_dir), Path(tokenizer_dir)
    usable = is_weights_dir(tokenizer_dir) or is_done(tokenizer_dir)
    # Refused before pre-tokenizing (minutes) when the recipe, the data or the tokenizer's ids say another
    # run, finished or not; the data are compared again once pre-tokenized (a dataset still to be written).
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None:
        meta = Path(data_dir) / META
        data = json.loads(meta.read_text()) if meta.is_file() else {}
        if usable:
            data["tokenizer"] = tokens_fingerprint(load_trained_tokenizer(tokenizer_dir, preset))
        check_resumable(run_dir, ckpt, "generator", preset, opts.seed, data)
        del ckpt  # the trainer loads it again after pre-tokenizing; no need to hold it meanwhile
    if is_done(run_dir):
        return {"skipped": "done"}
    if not usable:
        raise FileNotFoundError(
            f"{tokenizer_dir}: neither a finished tokenizer run (no 'done' file) nor a weights directory"
        )
    return GeneratorTrainer(preset, tokenizer_dir, Path(data_dir), run_dir, d, opts).run()


def _initial_weights(
    path: Path, tok: DCHT, tokenizer_dir: Path, cfg: GeneratorConfig, preset: TrainPreset
) -> tuple[GeneratorConfig, nn.Module, nn.Module]:
    """(config, generator, text encoder) of a weights directory or a generator run (EMA weights), checked
    against the architecture being trained and, for a weights directory, against the tokenizer: the
    generator learnt that tokenizer's ids, which must keep their meaning."""
    from dcar.model.loading import LoadError
    from dcar.model.pipeline import Pipeline
    from dcar.training.export import check_same_tokens, check_trained_on

    if is_weights_dir(path):
        pipe = Pipeline.from_pretrained(path, dtype=torch.float32)
        check_same_tokens(pipe.tokenizer, tok, path)
        init_cfg, gen, text = pipe.config.generator, pipe.generator, pipe.text_encoder
    else:
        try:
            gen, text, init_cfg = load_trained_generator(path, preset)
        except FileNotFoundError as e:
            raise LoadError(f"init_from {path}: neither a weights directory nor a generator run ({e})") from e
        check_trained_on(path, tok, tokenizer_dir)
    if replace(init_cfg, head=replace(init_cfg.head, vae_scale=cfg.head.vae_scale)) != cfg:
        raise LoadError(f"init_from {path}: its generator's architecture differs from the preset's")
    return init_cfg, gen, text
