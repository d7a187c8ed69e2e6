"""`minsnr export RUN_OR_CHECKPOINT --to diffusers OUT/` (or `--to safetensors OUT.safetensors`): a run's EMA
weights in a form other tools read.

    minsnr train quickstart model.name=diffusers_unet2d run_dir=runs/digits_unet2d
    minsnr export runs/digits_unet2d --to diffusers out/digits_unet2d      # DDPMPipeline.from_pretrained
    minsnr export runs/quickstart --to safetensors digits_vit.safetensors   # minsnr.load_model

RUN_OR_CHECKPOINT is a run folder (its checkpoints/latest.pt), a .pt checkpoint, or an exported .safetensors.

--to diffusers (backbone diffusers_unet2d only) writes a pipeline folder: model_index.json, unet/ (the EMA
weights, saved by diffusers itself) and scheduler/, a DDPMScheduler whose betas are the run's own schedule
(trained_betas, so alphas_cumprod agrees to float32 rounding) with prediction_type from loss.target and no
clipping (minsnr's samplers never clip x0). DDIMPipeline loads the same folder. A class-conditional UNet
takes `class_labels`; the classifier-free-guidance null label is index num_classes. Our ViT and UNet have no
diffusers class: `--to safetensors` writes their EMA weights with the run's config in the metadata.

Nothing half-written is ever found under OUT: the output is written to a hidden temporary sibling
(.OUT.*.tmp) and renamed into place at the end; a killed export leaves at most that temporary. With --force
an existing OUT is first renamed aside (.OUT.PID.old) and removed once the new one is in place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minsnr.checkpoint import CheckpointError, export_safetensors, export_step, load_checkpoint, load_model
from minsnr.config import Config
from minsnr.evaluate.sample import trained_class_names
from minsnr.evaluate.util import HelpFormatter, run_verb
from minsnr.extras import require
from minsnr.files import fsync_dir
from minsnr.integrations.diffusers import PREDICTION_TYPES as FROM_DIFFUSERS
from minsnr.registry import check
from minsnr.schedule import schedule_of

# --to NAME -> what it writes
FORMATS: dict[str, str] = {
    "diffusers": "a diffusers pipeline folder (DDPMPipeline.from_pretrained); backbone diffusers_unet2d only",
    "safetensors": "one .safetensors file: EMA weights + the run's config (minsnr.load_model)",
}
# loss.target -> diffusers' prediction_type: the inverse of minsnr.integrations.diffusers' table
PREDICTION_TYPES: dict[str, str] = {target: kind for kind, target in FROM_DIFFUSERS.items()}
DIFFUSERS_BACKBONES = ("diffusers_unet2d",)  # model.name -> a diffusers class exists


def checkpoint_of(source: str | Path) -> Path:
    """The file a RUN_OR_CHECKPOINT argument names: a run folder's checkpoints/latest.pt, else the path."""
    p = Path(source)
    if not p.is_dir():
        return p  # a missing file is reported by the loader, in its words
    latest = p / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise CheckpointError(f"{p} is a folder without checkpoints/latest.pt (not a minsnr run folder)")
    return latest


def read_source(path: Path) -> tuple[nn.Module, Config, int, list[str]]:
    """(model with the EMA weights, config, step, class names) of a .pt checkpoint or a .safetensors export;
    CheckpointError naming the file when it is neither (the loaders' one-line errors)."""
    model, cfg = load_model(path, ema=True)
    if path.suffix == ".safetensors":
        return model, cfg, export_step(path) or 0, trained_class_names(path)
    state = load_checkpoint(path, mmap=True)  # mapped: only the small entries are read
    if "ema" not in state:
        print(f"note: {path} holds no EMA weights; exporting its training weights", file=sys.stderr)
    return model, cfg, int(state.get("step", 0)), list(state.get("class_names", []))


def diffusers_scheduler(cfg: Config) -> Any:
    """A diffusers DDPMScheduler for the run's schedule and target. betas_t = 1 - abar_t / abar_{t-1} (abar_-1 = 1)
    from our float64 alphas_cumprod, given as trained_betas: exact for cosine and linear at any T (diffusers'
    own "linear" does not rescale by 1000/T as ours does), to diffusers' float32 cumprod, and for a zero
    terminal SNR schedule too (last beta 1; sampling starts at the last step, "trailing", Lin et al. sec. 3.3)."""
    diffusers = require("diffusers", "minsnr export --to diffusers")
    s = cfg.schedule
    T = s.num_timesteps
    abar = schedule_of(s).alphas_cumprod
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    # the named diffusers schedule closest to ours, for a reader of scheduler_config.json; trained_betas rule
    named = {
        "cosine": dict(beta_schedule="squaredcos_cap_v2"),
        "linear": dict(beta_schedule="linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T),
    }.get(cfg.schedule.name, {})
    return diffusers.DDPMScheduler(
        num_train_timesteps=T,
        trained_betas=betas.tolist(),
        **named,
        timestep_spacing="trailing" if s.zero_terminal_snr else "leading",  # "leading": diffusers' DDPM default
        prediction_type=PREDICTION_TYPES[cfg.loss.target],
        clip_sample=False,  # minsnr's samplers never clip x0, and latents are not in [-1, 1]
    )


def usage_note(cfg: Config, out: Path) -> str:
    """How to use the pipeline folder, printed and written to OUT/README.md."""
    m = cfg.model
    lines = [
        f"from diffusers import DDPMPipeline; pipe = DDPMPipeline.from_pretrained({str(out)!r})",
        f"scheduler: {cfg.schedule.name}, T={cfg.schedule.num_timesteps}, "
        f"prediction_type={PREDICTION_TYPES[cfg.loss.target]} (minsnr loss.target={cfg.loss.target})",
    ]
    if m.num_classes > 0:
        lines += [
            f"class-conditional ({m.num_classes} classes): DDPMPipeline draws unconditional samples only; call the "
            "UNet yourself: pipe.unet(x, t, class_labels=labels).sample",
            f"labels are 0..{m.num_classes - 1}; {m.num_classes} is the null label of classifier-free guidance",
        ]
    if cfg.data.source == "latent":
        lines.append("the model works on SD-VAE latents: decode the pipeline's output (output_type='pt') with the VAE")
    return "\n".join(lines)


def write_diffusers(model: nn.Module, cfg: Config, step: int, class_names: list[str], folder: Path, out: Path) -> None:
    """The pipeline folder, through diffusers' own save_pretrained (unet/ and scheduler/ configs, model_index.json)."""
    diffusers = require("diffusers", "minsnr export --to diffusers")
    pipe = diffusers.DDPMPipeline(unet=model.unet, scheduler=diffusers_scheduler(cfg))
    pipe.save_pretrained(folder, safe_serialization=True)
    names = f"\nclass names (label i is the i-th): {', '.join(class_names)}" if class_names else ""
    readme = f"# minsnr export (step {step})\n\n```\n{usage_note(cfg, out)}\n```\n{names}\n"
    (folder / "README.md").write_text(readme)


def install_folder(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling folder, then rename it to `out` (a non-empty `out`, allowed by --force,
    is renamed aside first and removed after). A failure removes the temporary and leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old, done = None, False
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)  # also replaces an empty folder
        done = True
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and done:
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            os.replace(old, out)  # the new folder did not go in: the old one comes back


def check_out(out: Path, to: str, force: bool) -> None:
    """Refuse an OUT that would be overwritten without --force, or that is the wrong kind of path."""
    if to == "safetensors" and out.suffix != ".safetensors":
        raise ValueError(f"--to safetensors writes a file: OUT {out} must end in .safetensors")
    if to == "safetensors" and out.is_dir():
        raise ValueError(f"OUT {out} is a folder; --to safetensors writes a file")
    if to == "diffusers" and out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; --to diffusers writes a folder")
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"OUT {out} exists and is not empty; choose another path or pass --force to replace it")


def export(source: str | Path, to: str, out: str | Path, force: bool = False) -> Path:
    """Export RUN_OR_CHECKPOINT `source` `to` a format of FORMATS at `out`; returns `out`."""
    check(to, FORMATS, "--to")
    out = Path(out)
    check_out(out, to, force)
    path = checkpoint_of(source)
    model, cfg, step, class_names = read_source(path)
    if to == "safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        export_safetensors(out, model.state_dict(), cfg, step, class_names)  # atomic: temporary + rename
        print(f"wrote the EMA weights of {path} (step {step}, {cfg.model.name}) to {out}")
        print(f"read with: minsnr.load_model({str(out)!r}) or minsnr sample {out}")
        return out
    if cfg.model.name not in DIFFUSERS_BACKBONES:
        raise ValueError(
            f"{path}: backbone {cfg.model.name!r} has no diffusers class (only {', '.join(DIFFUSERS_BACKBONES)} "
            "has); export its weights with --to safetensors"
        )
    install_folder(out, lambda folder: write_diffusers(model, cfg, step, class_names, folder, out))
    print(f"wrote a diffusers pipeline of {path} (step {step}, EMA weights) to {out}/")
    print(usage_note(cfg, out))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minsnr export", description=__doc__, formatter_class=HelpFormatter)
    path = os.path.expanduser
    p.add_argument("source", type=path, help="a run folder, a .pt checkpoint or an exported .safetensors")
    p.add_argument("out", type=path, help="the pipeline folder (--to diffusers) or the .safetensors file to write")
    p.add_argument("--to", required=True, help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--force", action="store_true", help="replace an OUT that exists and is not empty")
    args = p.parse_args(argv)

    def body() -> int:
        export(args.source, args.to, args.out, args.force)
        return 0

    return run_verb("minsnr export", body)
