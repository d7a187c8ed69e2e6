"""The parts of a training run, built from a config in one place (section 4.1): the device and process group,
the data and its batch iterator, the noise schedule, the model and its EMA copy, the training loss
(minsnr.loss), AdamW and the plan for the step (static, CUDA graph, or the general step). The loop that
uses them is minsnr.train; what a checkpoint holds of them is minsnr.state.

The config is resolved once (`with_model_args`) and every part reads that copy. Parts are built in a
fixed order so that the global torch stream gives every rank the same initial weights (seeded by
train.seed) and then its own stream for dropout (train.seed + rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from minsnr.config import Config, ConfigError, with_model_args
from minsnr.data import build_dataset
from minsnr.data.device import make_batches
from minsnr.distributed import CPU_ATTENTION, setup
from minsnr.ema import ema_copy
from minsnr.loss import TrainingLoss
from minsnr.models import build_model
from minsnr.schedule import Schedule, schedule_of
from minsnr.step import configure_threads, keep_run_settings, plan_step


@dataclass
class Run:
    cfg: Config  # resolved once: model.args complete
    rank: int
    world: int
    device: torch.device
    bf16: bool  # autocast to bfloat16 (train.precision)
    dataset: Any
    batches: Any  # the batch iterator (minsnr.data.loader.Batches or minsnr.data.device.DeviceBatches)
    schedule: Schedule
    model: nn.Module
    ema: nn.Module
    loss: TrainingLoss
    opt: torch.optim.Optimizer
    static: bool  # the static step (minsnr.step.StaticStep)
    capture: bool  # ... captured as a CUDA graph
    notes: list[str] = field(default_factory=list)  # what the run's first lines say about its set-up


def check_data_fits(cfg: Config, dataset: Any) -> None:
    """The model must take the data's image shape and have exactly one class row per data class (or none).
    More rows than classes is refused, not warned about: nothing in minsnr trains the extra rows (a resumed
    run keeps its data), yet sampling and evaluation would draw labels from them."""
    m = cfg.model
    want = (m.in_channels, m.input_size, m.input_size)
    if tuple(dataset.shape) != want:
        raise ConfigError(
            f"data gives images of shape {tuple(dataset.shape)} (C, H, W) but the model expects {want}; "
            f"set model.in_channels/model.input_size (or data.resolution)"
        )
    if m.num_classes > 0 and dataset.num_classes == 0:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has no labels; set model.num_classes=0")
    if m.num_classes > 0 and dataset.num_classes != m.num_classes:
        names = ", ".join(dataset.class_names[:10]) + (" ..." if len(dataset.class_names) > 10 else "")
        unused = (
            f"; {m.num_classes - dataset.num_classes} class rows would never be trained, yet sampling would draw them"
            if m.num_classes > dataset.num_classes
            else ""
        )
        raise ConfigError(
            f"data has {dataset.num_classes} classes ({names}) but model.num_classes={m.num_classes}"
            f"{unused}; set model.num_classes={dataset.num_classes}"
        )


def optimizer(
    cfg: Config, model: nn.Module, loss: TrainingLoss, device: torch.device, capturable: bool
) -> torch.optim.Optimizer:
    """AdamW (section 4.1): fused on CUDA with the learning rate in a device tensor (capturable when the step
    is captured), foreach on the CPU; the loss's own parameters (learned u(t)) in their group without weight
    decay; checkpoints stay portable between devices and step paths (`keep_run_settings`)."""
    o, cuda = cfg.optim, device.type == "cuda"
    lr = torch.tensor(o.lr, device=device) if cuda else o.lr
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}, *loss.param_groups()]
    opt = torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(o.betas),  # type: ignore[arg-type]
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=cuda,
        foreach=not cuda,
        capturable=capturable,
    )
    keep_run_settings(opt)
    return opt


def build_run(cfg: Config) -> Run:
    """Every part of the run `cfg` describes, on this process's device (torchrun: its rank's)."""
    cfg = with_model_args(cfg)
    t = cfg.train
    d = setup(t.device, timeout_min=t.dist_timeout_min)
    device = d.device
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    threads_note = configure_threads(t.threads, device.type)
    if device.type != "cuda" and t.attention not in CPU_ATTENTION:
        raise ConfigError(
            f"train.attention={t.attention} needs a CUDA device; on the CPU use one of {', '.join(CPU_ATTENTION)}"
        )
    dataset = build_dataset(cfg.data)
    check_data_fits(cfg, dataset)
    schedule = schedule_of(cfg.schedule).to(device)
    loss = TrainingLoss.from_config(cfg, schedule)  # target, weight table, timesteps, learned/pareto state
    torch.manual_seed(t.seed)  # the same initial weights on every rank (and EMA copy)
    model = build_model(cfg.model).to(device)
    ema = ema_copy(model)
    torch.manual_seed(t.seed + d.rank)  # each rank its own stream for dropout
    static, capture, step_note = plan_step(device.type, d.world, t.grad_accum, t.cuda_graph, t.compile, t.compile_mode)
    opt = optimizer(cfg, model, loss, device, capture)
    batches, data_note = make_batches(
        dataset,
        t.batch_size,
        seed=t.seed,
        rank=d.rank,
        world_size=d.world,
        device=device,
        num_workers=cfg.data.num_workers,
        setting=t.data_on_device,
    )
    notes = [f"speed: {data_note}; {step_note}; {threads_note}"]
    if loss.adaptive is not None and cfg.loss.gamma is not None:
        notes.append(
            f"note: loss.gamma={cfg.loss.gamma} does not apply to loss.weighting={cfg.loss.weighting}; it is unused"
        )
    return Run(
        cfg, d.rank, d.world, device, bf16, dataset, batches, schedule, model, ema, loss, opt, static, capture, notes
    )
