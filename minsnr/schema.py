"""The run configuration's schema: one dataclass per config section, with the paper's defaults where the
paper gives one (section 4.1, appendix C). `minsnr.config` loads, overrides and validates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minsnr.coupling import DEFAULT_NOISE_ASSIGNMENT
from minsnr.sampling import DEFAULT_SAMPLER, DEFAULT_SPACING
from minsnr.timesteps import DEFAULT_TIMESTEPS
from minsnr.weighting import DEFAULT_TARGET, DEFAULT_WEIGHTING

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 autocast on CUDA, fp32 on the CPU
DEVICES = ("auto", "cpu", "cuda")
# log.eval_metric: auto = fid_cls with log.eval_classifier, else the Inception fid; bpd = the held-out
# variational bound in bits per dimension (minsnr.evaluate.likelihood: no labels, classifier or weights needed)
EVAL_METRICS = ("auto", "fid_cls", "fid", "bpd")


@dataclass
class ModelConfig:
    name: str = "vit_tiny"  # a key of minsnr.models.MODELS
    input_size: int = 8  # image (or latent) side length
    in_channels: int = 1
    num_classes: int = 10  # 0: unconditional; otherwise one extra embedding row is the null class
    args: dict[str, Any] = field(default_factory=dict)  # further constructor arguments (patch_size, dropout ...)


@dataclass
class DataConfig:
    source: str = "digits"  # a key of minsnr.data.SOURCES
    path: str | None = None  # npz file, image folder or latent folder the user supplies
    resolution: int | None = None  # output side length; None keeps the stored size
    crop: str = "none"  # a key of minsnr.data.transforms.CROPS
    hflip: bool = True
    conditional: bool = True  # use labels when the data has them
    num_workers: int = 0
    max_bad_fraction: float = 0.01  # stop when more than this share of images cannot be read


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # a key of minsnr.schedule.SCHEDULES
    num_timesteps: int = 1000
    # rescale to SNR(T-1) = 0 (Lin et al. 2024, Algorithm 1): needs loss.target v or x0; sampling starts from pure noise
    zero_terminal_snr: bool = False


@dataclass
class LossConfig:
    target: str = DEFAULT_TARGET  # one of minsnr.weighting.TARGETS
    weighting: str = DEFAULT_WEIGHTING  # one of minsnr.weighting.WEIGHTINGS (STRATEGIES, or ADAPTIVE: stateful)
    # the strategy's one parameter (gamma of min_snr/max_snr/soft_min_snr/p2, b of sigmoid, sigma_data of edm);
    # None: its default in STRATEGIES
    gamma: float | None = None
    timesteps: str = DEFAULT_TIMESTEPS  # distribution of t, a key of minsnr.timesteps.TIMESTEPS
    # its parameters over their defaults, e.g. {mean: -0.4, std: 1.0} for EDM2's lognormal
    timestep_args: dict[str, float] = field(default_factory=dict)
    label_dropout: float = 0.0  # probability of replacing the label by the null class (0.15 in the paper)
    noise_assignment: str = DEFAULT_NOISE_ASSIGNMENT  # a key of minsnr.coupling.NOISE_ASSIGNMENTS: independent (the paper) or immiscible (Li et al. 2024)
    adapt_every: int = 100  # weighting=pareto: steps between updates of the weights (minsnr.adaptive)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99])  # ViT; UNet uses 0.9, 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then constant
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = False  # decay min(decay, (1 + step) / (10 + step))


@dataclass
class TrainConfig:
    batch_size: int = 128  # per rank and micro-step; global = batch_size * ranks * grad_accum
    steps: int = 500_000
    grad_accum: int = 1
    precision: str = "auto"  # one of PRECISIONS
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # one of DEVICES
    threads: int = 0  # CPU threads for torch ops; 0: torch's default on the CPU, max(1, min(4, cores // 4)) on CUDA
    data_on_device: bool | None = None  # keep array data (digits, npz) on the device; null: on CUDA when it fits
    cuda_graph: bool = True  # replay the whole step as one CUDA graph where it applies (CUDA, 1 process, grad_accum 1)
    compile_mode: str = "default"  # torch.compile mode when compile=true; a key of minsnr.distributed.COMPILE_MODES
    attention: str = (
        "auto"  # scaled_dot_product_attention backend; auto = torch's choice (minsnr.distributed.ATTENTION)
    )
    pareto_every: int = 0  # log the equation-11 objective every N steps; 0 disables
    # minutes a collective waits for the other ranks before it fails the job (torchrun); rank 0's hooks
    # (previews, evaluations) are waited for without a timeout (minsnr.distributed.wait_for_rank0)
    dist_timeout_min: float = 30.0


@dataclass
class LogConfig:
    every: int = 100  # metrics to JSONL/TensorBoard every N steps
    preview_every: int = 5000  # EMA preview grid every N steps; 0 disables
    tensorboard: bool = True
    eval_every: int = 0  # periodic fid_cls / FID every N steps; 0 disables
    eval_num: int = 1000
    eval_classifier: str | None = None  # classifier checkpoint for fid_cls
    eval_metric: str = "auto"  # one of EVAL_METRICS


@dataclass
class CheckpointConfig:
    every: int = 5000
    keep: int = 3  # keep the last K step checkpoints


@dataclass
class SampleConfig:
    sampler: str = DEFAULT_SAMPLER  # a key of minsnr.sampling.SAMPLERS
    steps: int = 30
    cfg_scale: float = 1.0
    # VE sigma where sampling starts; None: the schedule's largest (sigma_ve_max, 20,291 for cosine),
    # a larger value is capped there with a warning; EDM uses 80
    sigma_max: float | None = None
    spacing: str = DEFAULT_SPACING  # a key of minsnr.sampling.SPACINGS: karras (EDM) or trailing (Lin et al. 2024)


@dataclass
class Config:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | path to a checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


class ConfigError(ValueError):
    """A configuration problem, found before any training starts."""
