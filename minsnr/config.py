"""Typed run configuration: the dataclasses of minsnr.schema, validated by OmegaConf, loaded from YAML with
dotted overrides.

Every field has the paper's default where the paper gives one (section 4.1, appendix C). An unknown key
or a value of the wrong type fails in `load_config` with a message naming it and listing valid keys;
choices (weighting, target, sampler ...) are checked by `validate`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from minsnr.coupling import MAX_ASSIGNMENT_BATCH, NOISE_ASSIGNMENTS
from minsnr.data import SOURCES
from minsnr.data.transforms import CROPS
from minsnr.distributed import ATTENTION, COMPILE_MODES
from minsnr.models import MODELS
from minsnr.registry import did_you_mean
from minsnr.sampling import SAMPLERS, SPACINGS
from minsnr.schedule import SCHEDULES
from minsnr.schema import (
    DEVICES,
    EVAL_METRICS,
    PRECISIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EMAConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from minsnr.timesteps import TIMESTEPS, check_weighting
from minsnr.weighting import STRATEGIES, TARGETS, WEIGHTINGS, check_parameter

log = logging.getLogger(__name__)


def _valid_keys(path: str) -> list[str]:
    """Field names of the section at dotted `path` ('' for the top level), [] if it is no section."""
    node: Any = Config()
    for part in [p for p in path.split(".") if p]:
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """An unknown key names the section's valid keys; a bad value names the key and the expected type."""
    key = getattr(err, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(parent)
        hint = f"; valid keys in {parent or 'the top level'}: {', '.join(valid)}" if valid else ""
        return ConfigError(f"{source}: unknown config key {key!r}{did_you_mean(key.rsplit('.', 1)[-1], valid)}{hint}")
    return ConfigError(f"{source}: bad value for {key!r}: {msg}")


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the wheel (package data)


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with minsnr, by name: {'quickstart': .../minsnr/configs/quickstart.yaml, ...}."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def resolve_config(path: str | Path) -> Path:
    """A YAML file (`~` expanded), or the bare name of a packaged config ('quickstart'); an existing file wins."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    packaged = packaged_configs()
    if p.suffix == "" and len(p.parts) == 1 and p.name in packaged:
        return packaged[p.name]
    what = "is a folder, not a YAML file" if p.is_dir() else "not found"
    raise ConfigError(f"config file {p} {what}; give a YAML path or a packaged config name: {', '.join(packaged)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (a path, or a packaged config's name) <- `key=value` overrides; typed and validated,
    `~` expanded in paths, and model.args completed with the model's preset (see `with_model_args`)."""
    base = OmegaConf.structured(Config)
    if path is not None:
        p = resolve_config(path)
        try:
            base = OmegaConf.merge(base, OmegaConf.load(p))
        except OmegaConfBaseException as err:
            raise _explain(err, str(p)) from None
        except (UnicodeDecodeError, yaml.YAMLError) as err:  # a binary file, or YAML that does not parse
            why = "not a text file" if isinstance(err, UnicodeDecodeError) else str(err).splitlines()[0]
            raise ConfigError(f"config file {p} is not a YAML config ({why})") from None
    cfg = _finish(_merge(base, overrides or [], None))
    check_machine(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str], only: str | None = None) -> Config:
    """`cfg` with `key=value` overrides, validated; `only` (e.g. "data."): every key must start with it. The
    one override parser: load_config, and the verbs that change a stored config (pareto, conflict)."""
    return _finish(_merge(OmegaConf.structured(cfg), overrides, only))


def _merge(base: Any, overrides: list[str], only: str | None) -> Any:
    for item in overrides:
        if "=" not in item or (only is not None and not item.startswith(only)):
            raise ConfigError(f"override {item!r} is not of the form {only or ''}key=value")
        try:
            override = OmegaConf.from_dotlist([item])
            if item.startswith("model.name=") and override.model.name != base.model.name and base.model.args:
                log.warning(
                    "model.name=%s: dropping the config file's arguments for %s: %s",
                    override.model.name,
                    base.model.name,
                    dict(base.model.args),
                )
                base.model.args = {}  # the file's architecture arguments belong to its own model
            if (
                item.startswith("loss.weighting=")
                and override.loss.weighting != base.loss.weighting
                and base.loss.gamma is not None
                and not any(i.startswith("loss.gamma=") for i in overrides)
            ):
                log.warning(
                    "loss.weighting=%s: dropping the config file's loss.gamma=%g (%s's); %s takes its default "
                    "unless loss.gamma is given",
                    override.loss.weighting,
                    base.loss.gamma,
                    base.loss.weighting,
                    override.loss.weighting,
                )
                base.loss.gamma = None  # the file's parameter belongs to its own weighting
            base = OmegaConf.merge(base, override)
        except OmegaConfBaseException as err:
            raise _explain(err, f"command-line override {item!r}") from None
    return base


def _finish(merged: Any) -> Config:
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg = _expand_paths(cfg)
    validate(cfg)
    return with_model_args(cfg)


def _expand_paths(cfg: Config) -> Config:
    """`~` in the path-valued keys the user gives (run_dir, resume, data.path, log.eval_classifier)."""

    def home(value: str | None) -> str | None:
        return os.path.expanduser(value) if value else value

    return dataclasses.replace(
        cfg,
        run_dir=home(cfg.run_dir),
        resume=home(cfg.resume),  # type: ignore[arg-type]
        data=dataclasses.replace(cfg.data, path=home(cfg.data.path)),
        log=dataclasses.replace(cfg.log, eval_classifier=home(cfg.log.eval_classifier)),
    )


def with_model_args(cfg: Config) -> Config:
    """A copy of cfg whose model.args name every architecture argument (the preset's, then the user's),
    so the run's config and checkpoints stay loadable if a preset changes later."""
    from minsnr.models import resolved_args

    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, args=resolved_args(cfg.model.name, cfg.model.args))
    )


def _choice(name: str, value: object, valid: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(
            f"{name}={value!r} is not valid{did_you_mean(value, valid)}; choose one of: {', '.join(map(str, valid))}"
        )


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def choices() -> dict[str, Mapping[str, Any] | tuple[str, ...]]:
    """Every config key with a fixed set of valid values -> that set (the registries themselves)."""
    return {
        "model.name": MODELS,
        "data.source": SOURCES,
        "data.crop": CROPS,
        "schedule.name": SCHEDULES,
        "loss.target": TARGETS,
        "loss.weighting": WEIGHTINGS,
        "loss.timesteps": TIMESTEPS,
        "loss.noise_assignment": NOISE_ASSIGNMENTS,
        "train.precision": PRECISIONS,
        "train.device": DEVICES,
        "train.compile_mode": COMPILE_MODES,
        "train.attention": ATTENTION,
        "sample.sampler": SAMPLERS,
        "sample.spacing": SPACINGS,
        "log.eval_metric": EVAL_METRICS,
    }


def validate(cfg: Config) -> None:
    if "(" in cfg.loss.timesteps:
        raise ConfigError(
            f"loss.timesteps={cfg.loss.timesteps!r}: name the distribution there and give its parameters as "
            "loss.timestep_args, e.g. loss.timesteps=lognormal loss.timestep_args.mean=-0.4 "
            "loss.timestep_args.std=1.0 (the NAME(a,b) form is for `minsnr compare --weightings`)"
        )
    for key, valid in choices().items():
        section, name = key.split(".")
        _choice(key, getattr(getattr(cfg, section), name), valid)
    if cfg.sample.sigma_max is not None:
        _positive("sample.sigma_max", cfg.sample.sigma_max)
    if cfg.schedule.zero_terminal_snr and cfg.loss.target == "eps":  # Lin et al. 2024, sec. 3.2
        raise ConfigError(
            "loss.target=eps with schedule.zero_terminal_snr=true: at SNR 0 the input is pure noise, so an eps "
            "prediction cannot give x0; use loss.target=v or x0 (as Lin et al. do)"
        )
    if cfg.schedule.zero_terminal_snr and (cfg.loss.weighting == "learned" or cfg.log.eval_metric == "bpd"):
        key = "loss.weighting=learned" if cfg.loss.weighting == "learned" else "log.eval_metric=bpd"
        raise ConfigError(
            f"{key} with schedule.zero_terminal_snr=true: not supported yet (it reads ln SNR(T-1) = -inf)"
        )
    if cfg.sample.spacing == "trailing" and cfg.sample.sigma_max is not None:
        raise ConfigError("sample.sigma_max with sample.spacing=trailing: trailing steps start at t = T-1; unset one")
    if cfg.loss.gamma is not None and cfg.loss.weighting in STRATEGIES:
        try:
            check_parameter(cfg.loss.weighting, cfg.loss.gamma)
        except ValueError as err:
            raise ConfigError(f"loss.gamma={cfg.loss.gamma:g}: {err}") from None
    try:
        TIMESTEPS[cfg.loss.timesteps].resolve(cfg.loss.timesteps, cfg.loss.timestep_args)
    except ValueError as err:
        raise ConfigError(f"loss.timestep_args={dict(cfg.loss.timestep_args)}: {err}") from None
    if cfg.log.eval_metric == "fid_cls" and not cfg.log.eval_classifier:
        raise ConfigError("log.eval_metric=fid_cls needs log.eval_classifier (a file from `minsnr train-classifier`)")
    _positive("loss.adapt_every", cfg.loss.adapt_every)
    if cfg.loss.noise_assignment == "immiscible" and cfg.train.batch_size > MAX_ASSIGNMENT_BATCH:
        raise ConfigError(
            "loss.noise_assignment=immiscible pairs noise within each batch by a linear assignment (O(B^3)); "
            f"train.batch_size={cfg.train.batch_size} must be <= {MAX_ASSIGNMENT_BATCH} for it "
            "(lower train.batch_size and raise train.grad_accum)"
        )
    try:
        check_weighting(cfg.loss.timesteps, cfg.loss.weighting)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not 0.0 <= cfg.loss.label_dropout < 1.0:
        raise ConfigError(f"loss.label_dropout={cfg.loss.label_dropout} must be in [0, 1)")
    if cfg.loss.label_dropout > 0 and cfg.model.num_classes == 0:
        raise ConfigError("loss.label_dropout > 0 needs a class-conditional model (model.num_classes > 0)")
    for name in (
        "train.batch_size",
        "train.steps",
        "train.grad_accum",
        "train.dist_timeout_min",
        "schedule.num_timesteps",
        "model.input_size",
        "model.in_channels",
        "sample.steps",
        "log.every",
        "checkpoint.keep",
    ):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key))
    for name in ("optim.lr", "optim.eps"):
        _positive(name, getattr(cfg.optim, name.split(".")[1]))
    for name in (
        "optim.weight_decay",
        "optim.warmup_steps",
        "optim.grad_clip",
        "model.num_classes",
        "log.preview_every",
        "log.eval_every",
        "checkpoint.every",
        "train.pareto_every",
        "sample.cfg_scale",
        "data.num_workers",
        "train.threads",
    ):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key), allow_zero=True)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers in [0, 1)")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay={cfg.ema.decay} must be in [0, 1)")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")


def check_machine(cfg: Config) -> None:
    """Settings this machine or the step can never honour, refused before training with the keys named (rather
    than a kernel error, or a silent fallback, later). Only for a run about to start here (`load_config`): a
    stored config analysed on another machine (`apply_overrides`) is not refused for its device."""
    # The whole-step CUDA graph is planned only on CUDA with one process and train.grad_accum 1
    # (minsnr.step.plan_step), so the cuda_graph checks apply only there and the default
    # train.cuda_graph=true stays valid on the CPU, under torchrun and with grad_accum.
    import torch

    from minsnr.distributed import GRAPHING_MODES, world_size

    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but this machine has no CUDA device; use train.device=auto or cpu")
    on_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if on_cuda and t.attention in ("flash", "cudnn") and t.precision == "fp32":
        raise ConfigError(
            f"train.attention={t.attention} with train.precision=fp32: the CUDA {t.attention} kernels take only "
            "half precision; use train.precision=auto (bf16), or train.attention=efficient, math or auto"
        )
    graphed = on_cuda and t.cuda_graph and t.grad_accum == 1 and world_size() == 1
    if graphed and t.compile and t.compile_mode in GRAPHING_MODES:
        raise ConfigError(
            f"train.cuda_graph=true with train.compile=true and train.compile_mode={t.compile_mode}: that mode "
            "captures CUDA graphs of its own; set train.cuda_graph=false, or train.compile_mode=default or "
            "max-autotune-no-cudagraphs"
        )
    if graphed and not t.compile and cfg.model.args.get("grad_checkpointing"):
        raise ConfigError(  # torch.utils.checkpoint saves the CUDA RNG state, which a graph capture forbids
            "train.cuda_graph=true with model.args.grad_checkpointing=true: a checkpointed forward cannot be "
            "captured as a CUDA graph; set train.cuda_graph=false or model.args.grad_checkpointing=false"
        )


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


__all__ = [
    "Config",
    "ConfigError",
    "CheckpointConfig",
    "DataConfig",
    "EMAConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "ScheduleConfig",
    "TrainConfig",
    "DEVICES",
    "EVAL_METRICS",
    "PRECISIONS",
    "load_config",
    "apply_overrides",
    "packaged_configs",
    "resolve_config",
    "validate",
    "with_model_args",
    "choices",
    "to_dict",
    "from_dict",
    "dump_yaml",
]
