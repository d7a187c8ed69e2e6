"""Typed run configuration: dataclasses validated by OmegaConf, loaded from YAML with dotted overrides.

Every field has the paper's default where the paper gives one (section 4.1, appendix C). An unknown key
or a value of the wrong type fails in `load_config` with a message naming it and listing valid keys;
choices (weighting, target, sampler ...) are checked by `validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    name: str = "vit_tiny"  # registry name, see minsnr.models.MODELS
    input_size: int = 8  # image (or latent) side length
    in_channels: int = 1
    num_classes: int = 10  # 0: unconditional; otherwise one extra embedding row is the null class
    args: dict[str, Any] = field(default_factory=dict)  # further constructor arguments (patch_size, dropout ...)


@dataclass
class DataConfig:
    source: str = "digits"  # digits | npz | folder | latent
    path: Optional[str] = None  # npz file, image folder or latent folder the user supplies
    resolution: Optional[int] = None  # output side length; None keeps the stored size
    crop: str = "none"  # none | adm (ADM center_crop_arr) | celeba (ScoreSDE: center 140, resize)
    hflip: bool = True
    conditional: bool = True  # use labels when the data has them
    num_workers: int = 0
    max_bad_fraction: float = 0.01  # stop when more than this share of images cannot be read


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear
    num_timesteps: int = 1000


@dataclass
class LossConfig:
    target: str = "x0"  # x0 | eps | v
    weighting: str = "min_snr"  # const | snr | max_snr | min_snr | soft_min_snr | plain
    gamma: Optional[float] = None  # None: the strategy's default (min_snr 5, max_snr 1)
    label_dropout: float = 0.0  # probability of replacing the label by the null class (0.15 in the paper)


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
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch ops; 0 keeps torch's default
    pareto_every: int = 0  # log the equation-11 objective every N steps; 0 disables


@dataclass
class LogConfig:
    every: int = 100  # metrics to JSONL/TensorBoard every N steps
    preview_every: int = 5000  # EMA preview grid every N steps; 0 disables
    tensorboard: bool = True
    eval_every: int = 0  # periodic fid_cls / FID every N steps; 0 disables
    eval_num: int = 1000
    eval_classifier: Optional[str] = None  # classifier checkpoint for fid_cls


@dataclass
class CheckpointConfig:
    every: int = 5000
    keep: int = 3  # keep the last K step checkpoints


@dataclass
class SampleConfig:
    sampler: str = "heun"  # heun | euler | ddim
    steps: int = 30
    cfg_scale: float = 1.0
    sigma_max: Optional[float] = None  # None: the schedule's sigma at t = T-1; EDM uses 80


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


def _valid_keys(path: str) -> list[str]:
    """Field names of the section at dotted `path` ('' for the top level), [] if it is no section."""
    node: Any = Config()
    for part in [p for p in path.split(".") if p]:
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    msg = str(err).splitlines()[0]
    valid = _valid_keys(parent)
    hint = f"; valid keys in {parent or 'the top level'}: {', '.join(valid)}" if valid else ""
    return ConfigError(f"{source}: bad config key {key!r}: {msg}{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; typed and validated."""
    base = OmegaConf.structured(Config)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            base = OmegaConf.merge(base, OmegaConf.load(p))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            override = OmegaConf.from_dotlist([item])
            if item.startswith("model.name=") and override.model.name != base.model.name:
                base.model.args = {}  # the file's architecture arguments belong to its own model
            base = OmegaConf.merge(base, override)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path or "overrides")) from None
    cfg: Config = OmegaConf.to_object(base)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _choice(name: str, value: object, valid: tuple[object, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> None:
    from minsnr.weighting import NAMES, TARGETS

    _choice("loss.target", cfg.loss.target, TARGETS)
    _choice("loss.weighting", cfg.loss.weighting, NAMES)
    _choice("schedule.name", cfg.schedule.name, ("cosine", "linear"))
    _choice("data.source", cfg.data.source, ("digits", "npz", "folder", "latent"))
    _choice("data.crop", cfg.data.crop, ("none", "adm", "celeba"))
    _choice("train.precision", cfg.train.precision, ("auto", "bf16", "fp32"))
    _choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    _choice("sample.sampler", cfg.sample.sampler, ("heun", "euler", "ddim"))
    if cfg.sample.sigma_max is not None:
        _positive("sample.sigma_max", cfg.sample.sigma_max)
    if cfg.loss.gamma is not None:
        _positive("loss.gamma", cfg.loss.gamma)
    if not 0.0 <= cfg.loss.label_dropout < 1.0:
        raise ConfigError(f"loss.label_dropout={cfg.loss.label_dropout} must be in [0, 1)")
    if cfg.loss.label_dropout > 0 and cfg.model.num_classes == 0:
        raise ConfigError("loss.label_dropout > 0 needs a class-conditional model (model.num_classes > 0)")
    for name in ("train.batch_size", "train.steps", "train.grad_accum", "schedule.num_timesteps",
                 "model.input_size", "model.in_channels", "sample.steps", "log.every", "checkpoint.keep"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key))
    for name in ("optim.lr", "optim.eps"):
        _positive(name, getattr(cfg.optim, name.split(".")[1]))
    for name in ("optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "model.num_classes",
                 "log.preview_every", "log.eval_every", "checkpoint.every", "train.pareto_every",
                 "sample.cfg_scale", "data.num_workers", "train.threads"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key), allow_zero=True)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers in [0, 1)")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay={cfg.ema.decay} must be in [0, 1)")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. stored in a checkpoint); unknown keys are errors."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, "checkpoint config") from None


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


__all__ = ["Config", "ConfigError", "load_config", "validate", "to_dict", "from_dict", "dump_yaml", "DictConfig"]
