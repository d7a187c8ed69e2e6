"""`minsnr <verb> ...`: each verb lives in its own module as `main(argv) -> int`, imported lazily."""

from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "train": ("minsnr.launch", "train a diffusion model from a YAML config"),
    "sample": ("minsnr.evaluate.sample", "generate class-balanced samples from a checkpoint"),
    "fid": ("minsnr.evaluate.fid", "FID (Inception) or fid_cls (small classifier) of samples"),
    "train-classifier": ("minsnr.evaluate.classifier", "train the small CNN behind fid_cls"),
    "losses": ("minsnr.evaluate.losses", "unweighted x0 MSE per timestep range (figure 6)"),
    "plot": ("minsnr.evaluate.plots", "FID against steps for several runs (figures 1 and 5)"),
    "compare": ("minsnr.compare.cli", "race weightings on common random numbers: speed-up table (figure 5)"),
    "encode": ("minsnr.data.latent", "encode an image dataset into SD-VAE latents"),
    "pareto": ("minsnr.pareto.cli", "Pareto objective of weightings on a model (figures 3 and 4)"),
    "conflict": ("minsnr.pareto.conflict", "fine-tune on timestep ranges, loss change heat map (figure 2)"),
    "export": ("minsnr.integrations.export", "a run's EMA weights as a diffusers pipeline or a .safetensors file"),
}


def usage() -> str:
    lines = ["usage: minsnr <verb> [options]", "", "verbs:"]
    lines += [f"  {name:<17} {help_}" for name, (_, help_) in VERBS.items()]
    lines += ["", "`minsnr <verb> --help` for the options of one verb."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"minsnr: unknown verb {verb!r}; valid verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(VERBS[verb][0])
        return int(module.main(rest) or 0)
    except ImportError as err:  # an extra the verb needs (minsnr.extras.MissingExtra), imported lazily
        print(f"minsnr {verb}: error: {err}", file=sys.stderr)
        return 1
