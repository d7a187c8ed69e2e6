"""The training loop: AdamW with warm-up, EMA, bf16, compile, DDP, exact resume (section 4.1).

Each step minimises the weighted denoising loss of eq. 5 with the weight of section 3.4 (`minsnr.loss`),
over timesteps drawn from the configured distribution (uniform over {0..T-1} by default, as the paper).
One optimiser step consumes train.grad_accum micro-batches of train.batch_size per rank. The step's
timesteps, noise and label-dropout draws come from a generator seeded by (seed, step, micro-step) and
are drawn for the global batch, each rank taking its interleaved share (the data shards the same
way), so a run gives the same numbers whatever the number of ranks and continues bit-exactly after a
resume. Nothing in the step reads a tensor on the host; losses, per-bin MSE and non-finite checks are
read every log.every steps. With one process and grad_accum 1 the step runs on static buffers and, on
CUDA, as one CUDA graph (`minsnr.step`); array data then stays on the GPU (`minsnr.data.device`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import minsnr.checkpoint as ck
import minsnr.resume as resume
from minsnr.config import Config, dump_yaml
from minsnr.coupling import assign_noise
from minsnr.distributed import STOP_SIGNALS, StopVote, wait_for_rank0
from minsnr.ema import ema_decay, update_ema
from minsnr.objective import drop_labels
from minsnr.run import Run, build_run
from minsnr.runlog import BinStats, MetricsLog
from minsnr.schedule import Schedule
from minsnr.seeds import derive_seed
from minsnr.state import TrainState
from minsnr.step import StaticStep, attention, report_recompiles, set_lr

# Progress: tqdm's bar when stderr, where it draws, is a terminal; in a file (Slurm, nohup, CI) a bar is a wall of
# carriage returns, so there rank 0 prints one plain line (step, loss, img/s, ETA) to stdout at a metrics read
# (every log.every steps), at most one per PLAIN_EVERY_S seconds, and always at the last step.
PLAIN_EVERY_S = 30.0


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or inf loss or gradient, first at optimiser step `step`."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class StopTraining(Exception):
    """Raised by a hook to leave the loop at once, without a checkpoint (benchmarks); the caller catches it.
    Any other exception from a hook is reported and training goes on."""


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
    fn: Callable[[HookContext], dict[str, float] | None]


class Trainer:
    """`Trainer(build_run(cfg), hooks).run()`: resume, then loop `train_step` with logging, hooks and checkpoints
    until train.steps. The parts come from minsnr.run; what a checkpoint holds is minsnr.state."""

    def __init__(self, parts: Run | Config, hooks: tuple[Hook, ...] = ()):
        parts = build_run(parts) if isinstance(parts, Config) else parts
        self.parts, self.hooks = parts, hooks
        self.cfg = cfg = parts.cfg
        self.rank, self.world, self.device = parts.rank, parts.world, parts.device
        self.model, self.ema, self.opt, self.loss = parts.model, parts.ema, parts.opt, parts.loss
        self.dataset, self.batches, self.schedule = parts.dataset, parts.batches, parts.schedule
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState(
            cfg,
            self.model,
            self.ema,
            self.opt,
            self.loss,
            self.batches,
            self.dataset.class_names,
            self.rank,
            self.world,
        )
        self._resume()
        self.ddp = self._wrap_ddp(self.model)
        self.net = torch.compile(self.ddp, mode=cfg.train.compile_mode) if cfg.train.compile else self.ddp
        if cfg.train.compile:
            report_recompiles(self._print)
        self.gen = torch.Generator(device=self.device)  # reseeded from (seed, step, micro) every micro-step
        self.stats = BinStats(cfg.schedule.num_timesteps, self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.done = torch.full((), self.step, dtype=torch.long, device=self.device)  # steps taken, for the flag
        self.ema_weight = torch.zeros((), device=self.device)  # 1 - EMA decay of the coming step
        self.static = (
            StaticStep(self._static_body, self._zero_grad, capture=parts.capture, device=self.device, log=self._print)
            if parts.static
            else None
        )
        for note in parts.notes:
            self._print(note)
        self.stop_requested = False

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    # ---- resume (minsnr.resume finds the file, minsnr.state loads it) ---------------------------------
    def _resume(self) -> None:
        found = resume.find_checkpoint(self.cfg, self.ckpt_dir, self._print)
        if self.rank == 0:
            resume.clean_temporaries(self.run_dir, self._print)
        if found is None:
            return
        self.state.load_state_dict(found.state, found.path)
        if self.rank == 0 and self.cfg.resume == "auto":
            resume.repair_latest(self.ckpt_dir, found.path, self._print)
        if self.rank == 0:
            resume.repair_export(
                self.run_dir, self.ema, self.loss, self.cfg, self.step, self.dataset.class_names, self._print
            )
        self._print(f"resumed from {found.path} at step {self.step}")

    # ---- one optimiser step ---------------------------------------------------------------------
    def _lr(self) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * min(1.0, (self.step + 1) / warm) if warm > 0 else self.cfg.optim.lr

    def train_step(self) -> None:
        """One optimiser step: grad_accum micro-batches of the weighted loss (eq. 5, weight of section
        3.4), gradient clipping, AdamW, then the EMA update. No host sync. With one process and
        grad_accum 1, the static step (`minsnr.step`) runs the same body on static buffers."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        self.loss.adapt(self.step, self.model, self.dataset, cfg.train.seed)  # pareto: eq. 11 every loss.adapt_every
        set_lr(self.opt, self._lr())
        self.ema_weight.fill_(1.0 - ema_decay(cfg.ema.decay, cfg.ema.warmup, self.step + 1))
        if self.static is not None:
            self.grad_norm = self.static(*self._micro_batch(0))
        else:
            for micro in range(accum):
                x, y, t, noise = self._micro_batch(micro)
                last = micro == accum - 1
                sync = self.ddp.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()  # type: ignore[operator]
                with sync:
                    self._forward_backward(x, y, t, noise, accum)
            self.grad_norm = self._update()
            self._zero_grad()
        self.step += 1

    def _forward_backward(
        self, x: Tensor, y: Tensor | None, t: Tensor, noise: Tensor, accum: int, cache: bool = True
    ) -> None:
        """Backward of one micro-batch's weighted loss / accum; bin statistics and the non-finite flag."""
        with (
            attention(self.cfg.train.attention),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.parts.bf16, cache_enabled=cache),
        ):
            out = self.loss(self.net, x, y, t=t, noise=noise)
            (out.loss / accum).backward()
        self.stats.add(out.t, out.mse_x0, out.loss)
        self._flag_nonfinite(out.loss)

    def _update(self) -> Tensor:
        """Clipping, AdamW and the EMA update (weight `ema_weight`); returns the gradient norm before clipping."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        self.loss.average_gradients(self.world)  # learned u(t) is outside DDP
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self._flag_nonfinite(grad_norm)
        self.opt.step()
        self.done.add_(1)
        update_ema(self.ema, self.model, self.ema_weight)
        return grad_norm

    def _static_body(self, x: Tensor, y: Tensor | None, t: Tensor, noise: Tensor) -> Tensor:
        """The whole step on static buffers; captured as a CUDA graph (autocast's cast cache off, as
        capture needs)."""
        self._forward_backward(x, y, t, noise, 1, cache=False)
        return self._update()

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def _micro_batch(self, micro: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(x0, labels after dropout or None, t, noise) of this rank. The randomness is drawn for the
        global batch from a generator seeded by (seed, step, micro) and each rank keeps its interleaved
        share, as the data does: any number of ranks, and a resumed run, see the same numbers."""
        cfg, rank, world = self.cfg, self.rank, self.world
        x, labels = next(self.batches)
        x, labels = x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        n = x.shape[0] * world
        self.gen.manual_seed(derive_seed(cfg.train.seed, self.step, micro))
        t = self.loss.timesteps.draw(n, self.gen)[rank::world]
        noise = torch.randn((n, *x.shape[1:]), device=self.device, generator=self.gen)[rank::world]
        u = torch.rand(n, device=self.device, generator=self.gen)[rank::world]
        y = (
            drop_labels(labels, cfg.loss.label_dropout, cfg.model.num_classes, uniform=u)
            if cfg.model.num_classes > 0
            else None
        )
        if cfg.loss.noise_assignment != "independent":
            # within this rank's micro-batch only (x is the rank's share): the same noise rows, re-paired
            # to the images; outside the CUDA graph, so the solver's host sync is allowed here
            noise = assign_noise(cfg.loss.noise_assignment, x, noise)
        return x, y, t, noise

    def _flag_nonfinite(self, value: torch.Tensor) -> None:
        """first_bad <- the number of the step being taken, at its first NaN/inf (in place: graph-safe)."""
        bad = ~torch.isfinite(value.detach()) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self.done + 1, self.first_bad))

    def check_finite(self) -> None:
        """Host sync: stop if any step since the last check saw a NaN/inf loss or gradient."""
        bad = self.first_bad.clone()
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            where = resume.describe_last_good(self.ckpt_dir)
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {int(bad)}; training stopped, {where}. "
                "Try a lower optim.lr, optim.grad_clip, or train.precision=fp32.",
                int(bad),
            )

    # ---- the run --------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg)

    def save(self) -> Path:
        self.check_finite()
        state = self.state.state_dict()  # collective under DDP: every rank takes part
        if self.rank == 0:
            resume.save(state, self.ema, self.loss, self.cfg, self.run_dir, self._print)
        self.saved_step = self.step
        return ck.step_path(self.ckpt_dir, self.step)

    def _read_metrics(self, img_per_s: float) -> dict[str, float]:
        """Check for non-finite values, then the loss and per-bin x0 MSE (figure 6) since the last read."""
        self.check_finite()
        metrics = self.stats.read_and_reset()
        metrics.update(
            lr=self._lr(),
            grad_norm=float(self.grad_norm),
            epoch=self.batches.epoch,
            bad_images=len(self.batches.bad_files),
            img_per_s=img_per_s,
        )
        metrics.update(self.loss.metrics())
        return metrics

    def _run_hooks(self, final: bool) -> dict[str, float]:
        """The hooks due at this step, on rank 0; under DDP the other ranks wait for them without a timeout
        (`wait_for_rank0`), so every rank must be given the same hooks (`minsnr train` builds them on each)."""
        due = [hook for hook in self.hooks if hook.every > 0 and (self.step % hook.every == 0 or final)]
        if not due:
            return {}

        def run_due() -> dict[str, float]:
            metrics: dict[str, float] = {}
            ctx = HookContext(
                self.step, self.model, self.ema, self.cfg, self.schedule, self.device, self.run_dir, self.dataset
            )
            for hook in due:
                try:
                    metrics.update(hook.fn(ctx) or {})
                except StopTraining:
                    raise
                except Exception as err:  # a preview or evaluation must not cost the run its checkpoints
                    name = getattr(hook.fn, "__qualname__", repr(hook.fn)).replace(".<locals>", "")
                    self._print(
                        f"warning: {name} failed at step {self.step} ({type(err).__name__}: {err}); "
                        "training goes on without its output"
                    )
            return metrics

        return wait_for_rank0(run_due, self.rank, self.world, f"hooks/{self.step}") or {}

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested, self.stop_signal = True, signum
        self._print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def _agreed_stop(self) -> bool:
        """Stop now? Under DDP every rank stops after the same step (saving is a collective): see StopVote."""
        decided = self._vote(self.stop_signal)
        if decided and not self.stop_requested:  # another rank got the signal: stop with it
            self.stop_requested, self.stop_signal = True, decided
            self._print(f"{signal.Signals(decided).name} on another rank: saving a checkpoint, then stopping")
        return decided != 0

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        log: MetricsLog | None = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            log = MetricsLog(self.run_dir, self.step, cfg.log.tensorboard, say=self._print)
        self.saved_step, self.stop_signal = self.step, 0  # the checkpoint resumed from needs no second save
        self._vote = StopVote(self.world, self.device)
        old = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}
        images_per_step = cfg.train.batch_size * cfg.train.grad_accum * self.world
        plain = not (sys.stderr and sys.stderr.isatty())  # see PLAIN_EVERY_S
        bar = tqdm(
            total=cfg.train.steps, initial=self.step, disable=self.rank != 0 or plain, unit="step", dynamic_ncols=True
        )
        last: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), self.step
        start, start_step, said = tick, self.step, -float("inf")
        try:
            while self.step < cfg.train.steps and not self._agreed_stop():
                self.train_step()
                bar.update(1)
                final = self.step == cfg.train.steps
                metrics: dict[str, float] = {}
                if self.step % cfg.log.every == 0 or final:  # the only host syncs: every log.every steps
                    rate = images_per_step * (self.step - tick_step) / max(time.perf_counter() - tick, 1e-9)
                    metrics = last = self._read_metrics(rate)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                    now = time.perf_counter()
                    if plain and self.rank == 0 and (final or now - said >= PLAIN_EVERY_S):
                        print(self._progress_line(metrics, now - start, self.step - start_step), flush=True)
                        said = now
                metrics.update(self._run_hooks(final))
                if metrics and log is not None:
                    log.write(self.step, metrics)
                if "loss" in metrics:
                    tick, tick_step = time.perf_counter(), self.step  # hooks' time is not training time
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or final:
                    self.save()
            self._vote.close()  # no rank leaves a collective pending
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

    def _progress_line(self, metrics: dict[str, float], seconds: float, steps: int) -> str:
        """'step 200/2000 (10%)  loss 0.1234  1,520 img/s  ETA 00:41': the ETA at this session's pace so far."""
        total = self.cfg.train.steps
        eta = tqdm.format_interval(seconds / steps * (total - self.step)) if steps > 0 else "?"
        return (
            f"step {self.step}/{total} ({100 * self.step // total}%)  loss {metrics['loss']:.4f}  "
            f"{metrics['img_per_s']:,.0f} img/s  ETA {eta}"
        )

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
    """Build the run's parts from `cfg` (minsnr.run) and train it (resuming as cfg.resume says)."""
    return Trainer(build_run(cfg), hooks).run()
