"""The training loop: AdamW with warm-up, EMA, bf16, compile, DDP, exact resume (section 4.1).

One optimiser step consumes train.grad_accum micro-batches of train.batch_size per rank. The step's
timesteps, noise and label-dropout draws come from a generator seeded by (seed, step, micro-step) and
are drawn for the global batch, each rank taking its interleaved share (the data shards the same
way), so a run gives the same numbers whatever the number of ranks and continues bit-exactly after a
resume. Nothing in the step reads a tensor on the host; losses, per-bin MSE and non-finite checks are
read every log.every steps.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from minsnr import checkpoint as ck
from minsnr import resume
from minsnr.config import Config, ConfigError, dump_yaml
from minsnr.data import Batches, build_dataset
from minsnr.objective import diffusion_loss, drop_labels
from minsnr.runlog import BinStats, MetricsLog
from minsnr.schedule import Schedule, make_schedule


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or inf loss or gradient."""


@dataclass
class HookContext:
    step: int
    model: nn.Module  # the raw training weights (not DDP-wrapped, not compiled)
    ema: nn.Module
    cfg: Config
    schedule: Schedule
    device: torch.device
    run_dir: Path
    dataset: Any


@dataclass
class Hook:
    """Called on rank 0 every `every` steps (and after the last step); may return metrics to log."""

    every: int
    fn: Callable[[HookContext], Optional[dict[str, float]]]


def setup_distributed(device_opt: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for "auto", "cpu", "cuda" or "cuda:N"; torchrun's environment turns on
    DDP (NCCL on GPUs, gloo on CPU) and gives each rank the GPU of its LOCAL_RANK."""
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device_opt == "auto" else torch.device(device_opt)
    if want.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device_opt} asked for, but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if world > 1 else (want.index or 0))
        torch.cuda.set_device(want)
    return rank, world, want


def step_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def check_data_fits(cfg: Config, dataset: Any) -> None:
    m = cfg.model
    want = (m.in_channels, m.input_size, m.input_size)
    if tuple(dataset.shape) != want:
        raise ConfigError(f"data gives images of shape {tuple(dataset.shape)} (C, H, W) but the model expects {want}; "
                          f"set model.in_channels/model.input_size (or data.resolution)")
    if m.num_classes > 0 and dataset.num_classes == 0:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has no labels; set model.num_classes=0")
    if dataset.num_classes > m.num_classes > 0:
        raise ConfigError(f"data has {dataset.num_classes} classes but model.num_classes={m.num_classes}")


class Trainer:
    def __init__(self, cfg: Config, hooks: tuple[Hook, ...] = ()):
        self.cfg, self.hooks = cfg, hooks
        self.rank, self.world, self.device = setup_distributed(cfg.train.device)
        prec = cfg.train.precision
        self.bf16 = prec == "bf16" or (prec == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (and EMA copy)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        ck.resolve_model_args(cfg)
        self.dataset = build_dataset(cfg.data)
        check_data_fits(cfg, self.dataset)
        self.schedule = make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps).to(self.device)
        self.model = ck.build_model(cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        torch.manual_seed(cfg.train.seed + self.rank)  # each rank its own stream for dropout
        cuda = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),  # type: ignore[arg-type]
                                     eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                     fused=cuda, foreach=not cuda)
        self.batches = Batches(self.dataset, cfg.train.batch_size, seed=cfg.train.seed, rank=self.rank,
                               world_size=self.world, num_workers=cfg.data.num_workers,
                               pin_memory=self.device.type == "cuda")
        self.step = 0
        self._resume()
        net: nn.Module = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = net
        self.net = torch.compile(net) if cfg.train.compile else net
        self.gen = torch.Generator(device=self.device)
        self.stats = BinStats(cfg.schedule.num_timesteps, self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.stop_requested = False

    # ---- resume (minsnr.resume) -----------------------------------------------------------------
    def _resume(self) -> None:
        found = resume.find_checkpoint(self.cfg, self.ckpt_dir, self._print)
        if self.rank == 0:
            resume.clean_temporaries(self.run_dir, self._print)
        if found is None:
            return
        self.step = resume.restore(found, self.cfg, self.model, self.ema, self.opt, self.batches, self.rank)
        if self.rank == 0 and self.cfg.resume == "auto":
            resume.repair_latest(self.ckpt_dir, found.path, self._print)
        if self.rank == 0:
            resume.repair_export(self.run_dir, self.ema, self.cfg, self.step, self._print)
        self._print(f"resumed from {found.path} at step {self.step}")

    def _state(self) -> dict[str, Any]:
        return resume.training_state(self.model, self.ema, self.opt, self.step, self.cfg, self.batches,
                                     self.dataset.class_names, self.world)

    # ---- one optimiser step ---------------------------------------------------------------------
    def _lr(self) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * min(1.0, (self.step + 1) / warm) if warm > 0 else self.cfg.optim.lr

    def train_step(self) -> None:
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        for micro in range(accum):
            x, labels = next(self.batches)
            x = x.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            n, world, rank = x.shape[0], self.world, self.rank
            self.gen.manual_seed(step_seed(cfg.train.seed, self.step, micro))
            t = torch.randint(0, self.schedule.num_timesteps, (n * world,), device=self.device, generator=self.gen)[rank::world]
            noise = torch.randn((n * world, *x.shape[1:]), device=self.device, generator=self.gen)[rank::world]
            u = torch.rand(n * world, device=self.device, generator=self.gen)[rank::world]
            y = None
            if cfg.model.num_classes > 0:
                y = drop_labels(labels, cfg.loss.label_dropout, cfg.model.num_classes, uniform=u)
            sync = self.ddp.no_sync() if (world > 1 and micro < accum - 1) else contextlib.nullcontext()  # type: ignore[operator]
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = diffusion_loss(self.net, x, y, self.schedule, target=cfg.loss.target,
                                     weighting=cfg.loss.weighting, gamma=cfg.loss.gamma, t=t, noise=noise)
                (out.loss / accum).backward()
            self.stats.add(out.t, out.mse_x0, out.loss)
            self._flag_nonfinite(out.loss)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self._flag_nonfinite(self.grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._update_ema()

    def _flag_nonfinite(self, value: torch.Tensor) -> None:
        bad = ~torch.isfinite(value.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, self.step + 1), self.first_bad)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.ema.decay
        if self.cfg.ema.warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    def check_finite(self) -> None:
        """Host sync: stop if any step since the last check saw a NaN/inf loss or gradient."""
        bad = self.first_bad.clone()
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            where = resume.describe_last_good(self.ckpt_dir)
            raise NonFiniteLoss(f"non-finite loss or gradient at step {int(bad)}; training stopped, {where}. "
                                "Try a lower optim.lr, optim.grad_clip, or train.precision=fp32.")

    # ---- the run --------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg)

    def save(self) -> Path:
        self.check_finite()
        state = self._state()  # collective under DDP: every rank takes part
        if self.rank == 0:
            resume.save(state, self.ema, self.cfg, self.run_dir, self._print)
        self.saved_step = self.step
        return ck.step_path(self.ckpt_dir, self.step)

    def _run_hooks(self, final: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.rank != 0:
            return metrics
        ctx = HookContext(self.step, self.model, self.ema, self.cfg, self.schedule, self.device, self.run_dir, self.dataset)
        for hook in self.hooks:
            if hook.every > 0 and (self.step % hook.every == 0 or final):
                metrics.update(hook.fn(ctx) or {})
        return metrics

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested, self.stop_signal = True, signum
        self._print(f"signal {signum}: saving a checkpoint after this step, then stopping")

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        log: Optional[MetricsLog] = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            log = MetricsLog(self.run_dir, self.step, cfg.log.tensorboard, say=self._print)
        self.saved_step, self.stop_signal = self.step, 0  # the checkpoint resumed from needs no second save
        old = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        images_per_step = cfg.train.batch_size * cfg.train.grad_accum * self.world
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=self.rank != 0, unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), self.step
        try:
            while self.step < cfg.train.steps and not self.stop_requested:
                self.train_step()
                bar.update(1)
                final = self.step == cfg.train.steps
                metrics: dict[str, float] = {}
                if self.step % cfg.log.every == 0 or final:
                    self.check_finite()
                    metrics = self.stats.read_and_reset()
                    now = time.perf_counter()
                    metrics.update(lr=self._lr(), grad_norm=float(self.grad_norm), epoch=self.batches.epoch,
                                   bad_images=len(self.batches.bad_files),
                                   img_per_s=images_per_step * (self.step - tick_step) / max(now - tick, 1e-9))
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                    last = metrics
                metrics.update(self._run_hooks(final))
                if metrics and log is not None:
                    log.write(self.step, metrics)
                if "loss" in metrics:
                    tick, tick_step = time.perf_counter(), self.step  # hooks' time is not training time
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or final:
                    self.save()
            if self.stop_requested and self.saved_step != self.step:
                self.save()
            if self.world > 1:
                self._check_ranks_agree()
        finally:
            bar.close()
            for s, handler in old.items():
                signal.signal(s, handler)
            self.batches.close()
            if log is not None:
                log.close()
        stopped = self.stop_signal if self.step < cfg.train.steps else 0
        return {"step": self.step, "metrics": last, "run_dir": str(self.run_dir), "stopped_by_signal": stopped}

    def _check_ranks_agree(self) -> None:
        """DDP keeps replicas identical; verify it once at the end rather than trust it."""
        flat = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
        sums = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), device=flat.device) % 7).sum()])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError("model replicas differ across DDP ranks after training")


def train(cfg: Config, hooks: tuple[Hook, ...] = ()) -> dict[str, Any]:
    return Trainer(cfg, hooks).run()
