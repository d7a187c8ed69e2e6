"""What a comparison runs: a training config (any YAML `minsnr train` takes) plus compare settings, and
the run matrix of targets x weightings.

Baselines per target follow section 4.2 / figure 5: const for x0, the plain eps MSE (`snr`) for eps,
the plain v MSE (`plain`, (SNR + 1) in x0 terms) for v. A weighting is a strategy name, optionally with
its gamma (`min_snr:3`) and a timestep distribution (`const@logit_normal`, `min_snr@importance`; a key of
minsnr.timesteps.TIMESTEPS, default the config's loss.timesteps), or `baseline` for the target's baseline.
Speed-ups are read against the `reference` run of each target: the baseline by default, any weighting
token otherwise (`--reference min_snr` asks "what beats Min-SNR-5?").

Presets are configs/compare/<name>.yaml (plain training configs, which `minsnr train` also runs) plus
the Settings below; every config key can be overridden with key=value and every setting with its flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from minsnr.config import PACKAGED_CONFIGS, Config, ConfigError
from minsnr.coupling import NOISE_ASSIGNMENTS
from minsnr.timesteps import TIMESTEPS, parse_spec, parse_timesteps
from minsnr.weighting import STRATEGIES, TARGETS

BASELINES = {"x0": "const", "eps": "snr", "v": "plain"}
PROPOSAL = "min_snr"


@dataclass
class Settings:
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    weightings: list[str] = field(default_factory=lambda: ["baseline", PROPOSAL])
    classifier: str = "auto"  # auto: trained on the config's data, cached in RUN_DIR/classifier | PATH | inception
    classifier_epochs: int = 8
    jobs: int = 0  # concurrent runs; 0: one per CPU core on the CPU, every run at once on a GPU
    pin: bool = True  # give each concurrent run its own CPU cores (os.sched_setaffinity)
    bin_images: int = 1000  # held-out images for the final per-bin x0 MSE (figure 6)
    reference: str = "baseline"  # the weighting token every run of a target is timed against
    # seeds per run: None = 1 for a new comparison, as many as it already has for an existing one. Seed k of
    # N trains with train.seed + k (init, data order, timesteps, noise, sampler noise all follow it); within
    # one seed every weighting shares them (common random numbers).
    seeds: int | None = None
    metric: str = "auto"  # auto: fid_cls on labelled data, bpd on unlabelled | fid_cls | fid | bpd
    # --search: the candidate weightings (None: every registered one, with its grid) and timestep laws (None:
    # every one, plus minsnr.timesteps.SEARCH_VARIANTS); per_target: the final race's weightings per target
    candidates: list[str] | None = None
    search_timesteps: list[str] | None = None
    per_target: dict[str, list[str]] | None = None
    # where the runs train (minsnr.compare.slurm.EXECUTORS): local subprocesses, one Slurm job per run through
    # submitit, or those jobs on this machine (submitit-local); slurm_*: each job's resources (None: Slurm's
    # default), its time limit in minutes, and the folder of submitit's logs (None: RUN_DIR/slurm)
    executor: str = "local"
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: int = 1440
    slurm_gpus: int = 1
    slurm_cpus: int | None = None
    slurm_mem: str | None = None
    slurm_folder: str | None = None


PRESETS: dict[str, Settings] = {
    # configs/compare/cpu.yaml: digits, 0.22M ViT, 6 runs of 3,000 steps, fid_cls every 250 steps on 500
    # samples; two runs at a time on 2 cores.
    "cpu": Settings(),
    # configs/compare/cifar10.yaml: 15M pixel ViT on CIFAR-10 (20k), for one GPU; the runs share it.
    "cifar10": Settings(classifier_epochs=15),
    # configs/compare/mnist.yaml: 28x28 MNIST, the MNIST recipe's 1.26M ViT, 2,000 steps per run; a 3-seed
    # x0 + eps race in about an hour on 2 CPU cores.
    "mnist": Settings(classifier_epochs=2),
}


def resolve(source: str) -> tuple[Path, Settings]:
    """A preset name (cpu, cifar10) or a YAML config path -> (config file, default settings)."""
    if source in PRESETS:
        path = PACKAGED_CONFIGS / "compare" / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"preset {source!r} expects {path}, which is missing (minsnr installed without its "
                "configs/ folder?); pass a config YAML instead"
            )
        return path, dataclasses.replace(PRESETS[source])
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    return path, Settings()


@dataclass(frozen=True)
class RunSpec:
    target: str
    weighting: str
    gamma: float | None  # None: the strategy's default (or the config's loss.gamma)
    explicit_gamma: bool = False
    timesteps: str | None = None  # a canonical spec ('lognormal(-0.4,1)'); None: the config's loss.timesteps
    reference: bool = False  # the run the target's other runs are timed against (run_matrix sets it)
    noise: str | None = None  # a key of minsnr.coupling.NOISE_ASSIGNMENTS; None: the config's

    @property
    def name(self) -> str:
        suffix = f"_g{self.gamma:g}" if self.explicit_gamma and self.gamma is not None else ""
        timesteps = f"@{self.timesteps}" if self.timesteps else ""
        return f"{self.target}_{self.weighting}{suffix}{timesteps}" + (f"+{self.noise}" if self.noise else "")


def parse_weighting(token: str, target: str, config_gamma: float | None, config_weighting: str = PROPOSAL) -> RunSpec:
    """NAME[:P][@TIMESTEPS[(ARGS)]][+NOISE] (minsnr.timesteps.parse_spec; NAME may be `baseline`; NOISE a
    key of minsnr.coupling.NOISE_ASSIGNMENTS, e.g. min_snr+immiscible) -> the run of `target`. The config's
    loss.gamma is the parameter of its own loss.weighting only (`config_weighting`)."""
    token, plus, noise = token.partition("+")
    head, at, rest = token.partition("@")
    name, colon, gamma_text = head.partition(":")
    name = BASELINES[target] if name == "baseline" else name
    try:
        if plus and noise not in NOISE_ASSIGNMENTS:
            raise ValueError(f"+{noise} is not a noise assignment; choose one of: {', '.join(NOISE_ASSIGNMENTS)}")
        weighting, gamma, timesteps = parse_spec(name + colon + gamma_text + at + rest)
    except ValueError as err:
        raise ConfigError(
            f"weighting {token + plus + noise!r}: {err}; or baseline, the target's own (optionally NAME:P, e.g. "
            "min_snr:3, @TIMESTEPS, e.g. const@logit_normal or min_snr@lognormal(-0.4,1), and +immiscible)"
        ) from None
    extra = {"timesteps": timesteps, "noise": noise or None}
    if gamma is not None:
        return RunSpec(target, weighting, gamma, explicit_gamma=True, **extra)  # type: ignore[arg-type]
    default = STRATEGIES[weighting].default if weighting in STRATEGIES else None
    if default is not None and config_gamma is not None and weighting == config_weighting:
        default = config_gamma
    return RunSpec(target, weighting, default, **extra)  # type: ignore[arg-type]


def run_matrix(settings: Settings, config_gamma: float | None, config_weighting: str = PROPOSAL) -> list[RunSpec]:
    """Every (target, weighting) pair, in order, without duplicates; each target's reference run is marked
    (and added first when --weightings does not name it). config_gamma: the parameter of config_weighting."""
    if not settings.targets or not settings.weightings:
        raise ConfigError("give at least one target (--targets) and one weighting (--weightings)")
    specs: list[RunSpec] = []
    for target in settings.targets:
        if target not in TARGETS:
            raise ConfigError(f"target {target!r} is not valid; choose from {', '.join(TARGETS)}")
        reference = parse_weighting(settings.reference, target, config_gamma, config_weighting).name
        tokens = (settings.per_target or {}).get(target, settings.weightings)
        runs = [parse_weighting(token, target, config_gamma, config_weighting) for token in tokens]
        if reference not in [s.name for s in runs]:
            runs.insert(0, parse_weighting(settings.reference, target, config_gamma, config_weighting))
        for spec in runs:
            if spec.name not in [s.name for s in specs]:
                specs.append(dataclasses.replace(spec, reference=spec.name == reference))
    return specs


def seed_values(base: Config, count: int) -> list[int]:
    """The train.seed of each of `count` seeds: the config's own, then the next ones (seed k: train.seed + k),
    so the same command gives the same runs and seed 0 of a race is the run `minsnr train` would make."""
    return [base.train.seed + k for k in range(count)]


def run_folder(run_dir: Path, seed: int, name: str) -> Path:
    return run_dir / f"seed{seed}" / name


def run_config(
    base: Config,
    spec: RunSpec,
    run_dir: Path,
    classifier: str | None,
    threads: int,
    seed: int | None = None,
    metric: str = "auto",
) -> Config:
    """The ordinary training config of one run: the base config with only the loss, the run folder, the
    evaluation classifier, the thread count and the seed changed (data, schedule and model stay shared).
    seed None: the base config's seed."""
    seed = base.train.seed if seed is None else seed
    timesteps, timestep_args = base.loss.timesteps, base.loss.timestep_args
    if spec.timesteps:  # only the parameters off their defaults, as a user would write them
        timesteps, values = parse_timesteps(spec.timesteps)
        timestep_args = {k: v for k, v in values.items() if v != dict(TIMESTEPS[timesteps].params)[k]}
    cfg = dataclasses.replace(
        base,
        run_dir=str(run_folder(run_dir, seed, spec.name)),
        resume="auto",
        loss=dataclasses.replace(
            base.loss,
            target=spec.target,
            weighting=spec.weighting,
            gamma=spec.gamma,
            timesteps=timesteps,
            timestep_args=timestep_args,
            noise_assignment=spec.noise or base.loss.noise_assignment,
        ),
        log=dataclasses.replace(base.log, eval_classifier=classifier, eval_metric=metric),
        train=dataclasses.replace(base.train, threads=threads, seed=seed),
    )
    return cfg


def check_base(base: Config) -> tuple[Config, list[str]]:
    """Settings that would make the comparison unfair or unreadable fail here, before any run starts.
    -> (the base config, with log.every lowered where it must be, and one line per such change)."""
    log, notes = base.log, []
    if log.eval_every <= 0:
        raise ConfigError("log.eval_every must be > 0 for a comparison (e.g. --eval-every 250)")
    if log.eval_every % log.every:
        every = math.gcd(log.eval_every, log.every)
        notes.append(
            f"log.every={log.every} -> {every}: an evaluation every {log.eval_every} steps must fall on a "
            "logged step, so that a non-finite loss is caught before the evaluation that would sample from it"
        )
        base = dataclasses.replace(base, log=dataclasses.replace(log, every=every))
    if base.data.source == "latent":
        raise ConfigError("data.source=latent: compare scores pixel-space runs only (fid_cls or FID during training)")
    if base.resume not in ("auto", "never"):
        raise ConfigError(f"resume={base.resume!r}: every compare run resumes from its own folder; drop the key")
    return base, notes
