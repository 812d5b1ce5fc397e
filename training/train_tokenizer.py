"""DC-HT tokenizer training: the DC-AR paper's three-stage adaptation.

1. continuous warm-up: encoder + decoder as a plain autoencoder on the l2-normalised latent;
2. discrete learning: the decoder sees only the straight-through codewords; codebook loss
   ||sg(z) - e||^2 and commitment beta ||z - sg(e)||^2 (beta = 0.25) train the codebook and encoder;
3. alternate fine-tuning: encoder and codebook frozen, the decoder trained on the continuous path with
   probability ``continuous_prob`` and on the codewords otherwise, with a PatchGAN (hinge) added in the
   second part of the stage.

Every stage uses L1 + L2 pixel losses on random crops (``SceneCrops``), optionally weighted up around shape
outlines (``outline_weight``). A run may start from a trained tokenizer (``init_from``) and skip stages
with 0 steps: ``tiny-shapes-v2`` refines v1's decoder that way. Each stage has its own AdamW
and warm-up + cosine schedule; the checkpoint records the stage and step, so an interrupted run resumes
inside the stage it was in.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcar.model.tokenizer import DCHT
from dcar.training import distributed as dist_utils
from dcar.training.distributed import Dist
from dcar.training.lineage import write_lineage
from dcar.training.losses import (
    PatchDiscriminator,
    hinge_d_loss,
    hinge_g_loss,
    outline_weights,
    psnr,
    reconstruction_loss,
)
from dcar.training.presets import TrainPreset
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
from dcar.training.streams import SceneCrops
from dcar.training.tokenizer_paths import Autoencode, reconstruct, val_images
from dcar.training.trained import load_tokenizer_weights

STAGES = ("continuous", "discrete", "alternate")
COLUMNS = [
    "step",
    "stage",
    "lr",
    "loss",
    "l1",
    "l2",
    "psnr",
    "codebook",
    "commit",
    "usage",
    "restarted",
    "path",
    "g_loss",
    "d_loss",
    "sec",
]
VAL_COLUMNS = ["step", "stage", "psnr_continuous", "psnr_discrete"]


class TokenizerTrainer:
    def __init__(self, preset: TrainPreset, run_dir: Path, d: Dist, opts: RunOptions):
        self.preset, self.recipe, self.run_dir, self.d, self.opts = preset, preset.tokenizer, run_dir, d, opts
        cfg = preset.pipeline.tokenizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)  # module initialisers only know the global generator
            self.tok = DCHT(cfg)
            self.disc = PatchDiscriminator(cfg.in_channels, self.recipe.disc_ndf)
        self.tok.to(d.device, memory_format=torch.channels_last)
        self.disc.to(d.device)
        r = self.recipe
        if r.needs_init:
            raise ValueError(
                "stage_steps: stages 1 and 2 have no steps, so the encoder and codebook would stay random; "
                "start from a trained tokenizer with init_from (--init-from RUN_OR_WEIGHTS_DIR)"
            )
        self.data = SceneCrops(opts.seed, d.rank, r.render_size, r.crop, r.crops_per_image, opts.draw_workers)
        self.gen = torch.Generator().manual_seed(opts.seed * 1000 + d.rank)
        self.stage, self.step = 0, 0  # step within the stage
        self.opt: torch.optim.Optimizer | None = None
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=r.disc_lr, betas=(0.5, 0.9))
        self.usage = torch.zeros(cfg.codebook_size, dtype=torch.long, device=d.device)
        self.val = val_images(opts.seed, r.val_images, r.render_size).to(d.device)
        self.elapsed_before, self.session_start = 0.0, time.monotonic()

    def elapsed(self) -> float:
        """Wall seconds spent training this run, over every session."""
        return self.elapsed_before + time.monotonic() - self.session_start

    # --- bookkeeping --------------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return sum(self.recipe.stage_steps[: self.stage]) + self.step

    def _make_optimizer(self, stage: int) -> torch.optim.Optimizer:
        tok, r = self.tok, self.recipe
        if stage == 0:
            params = list(tok.encoder.parameters()) + list(tok.decoder.parameters())
        elif stage == 1:
            params = list(tok.parameters())
        else:
            params = list(tok.decoder.parameters())
        train = {id(p) for p in params}
        for p in tok.parameters():
            p.requires_grad_(id(p) in train)
        return torch.optim.AdamW(params, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        ranks = dist_utils.gather_objects(
            {
                "data": self.data.state(),
                "torch": self.gen.get_state(),
                "usage": self.usage.cpu(),
                "checksum": dist_utils.checksum(self.tok),
            }
        )
        return {
            "kind": "tokenizer",
            "preset": self.preset.to_dict(),
            "seed": self.opts.seed,
            "stage": self.stage,
            "step": self.step,
            "model": self.tok.state_dict(),
            "optimizer": self.opt.state_dict(),
            "disc": self.disc.state_dict(),
            "disc_optimizer": self.disc_opt.state_dict(),
            "ranks": ranks,
            "elapsed": self.elapsed(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.tok.load_state_dict(ckpt["model"])
        self.disc.load_state_dict(ckpt["disc"])
        self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
        self.stage, self.step = ckpt["stage"], ckpt["step"]
        self.elapsed_before = ckpt.get("elapsed", 0.0)
        self.opt = self._make_optimizer(self.stage)
        self.opt.load_state_dict(ckpt["optimizer"])
        ranks = ckpt["ranks"]
        if self.d.rank < len(ranks):
            mine = ranks[self.d.rank]
            self.data.load_state(mine["data"])
            self.gen.set_state(mine["torch"])
            self.usage.copy_(mine["usage"].to(self.usage.device))

    def save(self) -> None:
        state = self.state_dict()  # every rank takes part in gathering the random states
        if self.d.main:
            save_checkpoint(self.run_dir, state)

    # --- stage-2 codebook care ----------------------------------------------------------------------

    @torch.no_grad()
    def _latents(self, batches: int) -> torch.Tensor:
        """Normalised encoder latents of a few training batches, (N, C)."""
        zs = []
        for _ in range(batches):
            x = self.data.next_batch(self.recipe.batch).to(self.d.device, memory_format=torch.channels_last)
            with autocast(self.d.device, self.opts.precision):
                z = self.tok.encoder(x)
            zs.append(self.tok.quantize.normalize(z).permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        return torch.cat(zs)

    @torch.no_grad()
    def _seed_codes(self, which: torch.Tensor, latents: torch.Tensor) -> None:
        """Set codebook rows ``which`` to random latents (rank 0's draw, broadcast), and forget their moments."""
        pick = torch.randint(0, latents.shape[0], (len(which),), generator=self.gen).to(latents.device)
        noise = 0.01 * torch.randn(len(which), latents.shape[1], generator=self.gen).to(latents.device)
        weight = self.tok.quantize.embedding.weight
        weight[which] = F.normalize(latents[pick] + noise, dim=-1).to(weight.dtype)
        dist_utils.broadcast_module(self.tok.quantize)
        state = self.opt.state.get(weight, {}) if self.opt is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][which] = 0

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        r, d, opts = self.recipe, self.d, self.opts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is not None:  # refused before anything is written when the recipe is another
            check_resumable(self.run_dir, ckpt, "tokenizer", self.preset, opts.seed)
        if d.main:
            write_lineage(self.run_dir, "tokenizer", r.init_from)
        if ckpt is not None:
            self.load_state_dict(ckpt)
        elif self.opt is None:
            if r.init_from:
                self._init_from(Path(r.init_from))
            self.stage = self._next_stage(0)
            self.opt = self._make_optimizer(self.stage)
        log = (
            CsvLog(self.run_dir / "losses.csv", COLUMNS, self.global_step if ckpt else None)
            if d.main
            else None
        )
        val_log = (
            CsvLog(self.run_dir / "val.csv", VAL_COLUMNS, self.global_step if ckpt else None)
            if d.main
            else None
        )
        bar = progress(r.total_steps, self.global_step, "tokenizer", d.main and opts.progress_bar)
        timer, sampler_timer = (
            CheckpointTimer(opts.checkpoint_minutes, opts.checkpoint_every),
            CheckpointTimer(opts.sample_minutes),
        )
        t_start = time.monotonic()
        while self.stage < len(STAGES):
            model = self._wrap()
            steps = r.stage_steps[self.stage]
            while self.step < steps:
                if opts.stop_due(self.global_step, d.device):
                    self.save()
                    bar.close()
                    return {"stopped_at": self.global_step}
                t0 = time.perf_counter()
                row = self._train_step(model)
                self.step += 1
                bar.update(1)
                if log is not None:
                    log.write(
                        {
                            "step": self.global_step,
                            "stage": self.stage + 1,
                            "sec": time.perf_counter() - t0,
                            **row,
                        }
                    )
                    bar.set_postfix(
                        stage=self.stage + 1, loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}"
                    )
                if sampler_timer.due(self.global_step) or self.step == steps:
                    self._sample(val_log)
                    sampler_timer.reset()
                if dist_utils.agree(timer.due(self.global_step), d.device) and self.step < steps:
                    self.save()
                    timer.reset()
            self._ceiling()
            last = self.stage
            self.stage, self.step = self._next_stage(self.stage + 1), 0
            if self.stage < len(STAGES):
                self.opt = self._make_optimizer(self.stage)
                if self.stage == 1 and not r.init_from:  # codebook from encoder latents, not uniform +-1/N
                    per_batch = r.batch * (r.crop // self.tok.compression) ** 2
                    latents = self._latents(-(-self.tok.cfg.codebook_size // per_batch) + 1)
                    self._seed_codes(torch.arange(self.tok.cfg.codebook_size, device=d.device), latents)
            else:
                self.stage, self.step = last, steps  # the final checkpoint is "last stage done"
                self.save()
                break
            self.save()
            timer.reset()
        bar.close()
        summary = {
            "steps": r.total_steps,
            "seconds_this_session": time.monotonic() - t_start,
            "seconds": self.elapsed(),
        }
        if d.main:
            mark_done(self.run_dir, summary)
        return summary

    def _next_stage(self, stage: int) -> int:
        """The first stage from ``stage`` on that has steps (len(STAGES) when none has)."""
        while stage < len(STAGES) and self.recipe.stage_steps[stage] == 0:
            stage += 1
        return stage

    def _init_from(self, path: Path) -> None:
        """Start from a tokenizer run's checkpoint or a weights directory's tokenizer (keys and shapes checked)."""
        from dcar.model.loading import LoadError

        try:
            load_tokenizer_weights(self.tok, path)
        except LoadError as e:
            raise LoadError(f"init_from {e}") from None

    def _gan_on(self) -> bool:
        r = self.recipe
        return self.stage == 2 and r.disc_weight > 0 and self.step >= r.disc_start * r.stage_steps[2]

    def _wrap(self) -> nn.Module:
        if self.stage < 2:
            self.tok.train()
            module: nn.Module = Autoencode(self.tok, self.opts.precision)
        else:
            self.tok.encoder.eval()
            self.tok.decoder.train()
            module = self.tok.decoder
        if self.d.enabled:
            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            module = DDP(module, device_ids=ids)
        return module

    def _train_step(self, model: nn.Module) -> dict[str, float]:
        r, d, stage = self.recipe, self.d, self.stage
        lr = lr_at(self.step, r.stage_steps[stage], r.lr * r.stage_lr[stage], r.warmup, r.min_lr_ratio)
        set_lr(self.opt, lr)
        x = self.data.next_batch(r.batch).to(d.device, memory_format=torch.channels_last)
        row: dict[str, float] = {"lr": lr}
        ids = None
        if stage < 2:
            rec, cb, commit, ids, _ = model(x, stage == 1)
            loss, parts = reconstruction_loss(rec, x, r.l1_weight, r.l2_weight)
            if stage == 1:
                loss = loss + r.codebook_weight * cb + self.tok.cfg.commit_loss_beta * commit
            row.update(codebook=cb.item(), commit=commit.item())
        else:
            continuous = bool(torch.rand((), generator=self.gen) < r.continuous_prob)
            with torch.no_grad():
                with autocast(d.device, self.opts.precision):
                    z = self.tok.encoder(x)
                q = self.tok.quantize(z.float())
                latent = q.normalized if continuous else q.codewords
            with autocast(d.device, self.opts.precision):
                rec = model(latent.contiguous(memory_format=torch.channels_last)).float()
            weight = outline_weights(x, r.outline_weight, r.outline_band) if r.outline_weight else None
            loss, parts = reconstruction_loss(rec, x, r.l1_weight, r.l2_weight, weight)
            row["path"] = 0.0 if continuous else 1.0
            if self._gan_on():
                self.disc.requires_grad_(False)
                g_loss = hinge_g_loss(self._disc(rec))
                loss = loss + r.disc_weight * g_loss
                row["g_loss"] = g_loss.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        self.opt.step()
        if ids is not None:
            self._track_usage(ids, row)  # after the step: a restart rewrites codebook rows in place
        if self._gan_on():
            row["d_loss"] = self._disc_step(x, rec.detach())
        row.update(loss=loss.item(), psnr=psnr(rec.detach(), x).mean().item(), **parts)
        return dist_utils.mean_scalars(row, d.device)

    def _disc(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.d.device, self.opts.precision):
            return self.disc(images).float()

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        self.disc.requires_grad_(True)
        d_loss = hinge_d_loss(self._disc(real.contiguous()), self._disc(fake.contiguous()))
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if self.d.enabled:  # the discriminator is small: average its gradients by hand, no second DDP
            for p in self.disc.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.d.world
        self.disc_opt.step()
        return d_loss.item()

    def _track_usage(self, ids: torch.Tensor, row: dict[str, float]) -> None:
        r = self.recipe
        self.usage += torch.bincount(ids.flatten(), minlength=self.usage.numel())
        row["usage"] = float((self.usage > 0).float().mean())
        row["restarted"] = 0.0
        if r.restart_every and (self.step + 1) % r.restart_every == 0:
            usage = self.usage.clone()
            if self.d.enabled:
                torch.distributed.all_reduce(usage)
            dead = torch.nonzero(usage == 0).flatten()
            if len(dead) and self.step < r.restart_until * r.stage_steps[1]:
                self._seed_codes(dead, self._latents(1))
                row["restarted"] = float(len(dead))
            self.usage.zero_()

    def _ceiling(self) -> None:
        """The tokenizer ceiling after the stage that just ended (rank 0; rerun if interrupted before the
        stage's checkpoint, so each stage's file is written whole)."""
        r = self.recipe
        if not r.ceiling_seeds or not self.d.main:
            return
        from dcar.training.ceiling import tokenizer_ceiling

        result = tokenizer_ceiling(self.tok, r.render_size, r.ceiling_seeds)
        result.update(stage=self.stage + 1, step=self.global_step)
        path = self.run_dir / f"ceiling-stage{self.stage + 1}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        overall = ", ".join(f"{p} {v['overall']:.3f}" for p, v in result["paths"].items())
        print(f"tokenizer ceiling after stage {self.stage + 1}: {overall}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def _sample(self, val_log: CsvLog | None) -> None:
        """Reconstructions of the fixed images (rows: input, continuous, discrete) and their PSNR (rank 0)."""
        if val_log is None:
            return
        rec = reconstruct(self.tok, self.val)
        row = {
            "step": self.global_step,
            "stage": self.stage + 1,
            "psnr_continuous": psnr(rec["continuous"], self.val).mean().item(),
            "psnr_discrete": psnr(rec["discrete"], self.val).mean().item(),
        }
        val_log.write(row)
        save_grid(
            [self.val, rec["continuous"], rec["discrete"]],
            self.run_dir / "samples" / f"tokenizer-{self.global_step:06d}.png",
        )


def train_tokenizer(preset: TrainPreset, run_dir: str | Path, d: Dist, opts: RunOptions) -> dict[str, Any]:
    """Run (or resume, or skip when already done) the three stages into ``run_dir``."""
    run_dir = Path(run_dir)
    if is_done(run_dir):
        ckpt = load_checkpoint(run_dir)
        if ckpt is not None:  # finished with these flags, or refused: not skipped as if it were their run
            check_resumable(run_dir, ckpt, "tokenizer", preset, opts.seed)
        return {"skipped": "done"}
    trainer = TokenizerTrainer(preset, run_dir, d, opts)
    try:
        return trainer.run()
    finally:
        trainer.data.close()  # the drawing processes, if any
