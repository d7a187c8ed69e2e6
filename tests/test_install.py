"""Lean install: the core dependencies are what the demo needs, every optional package degrades with one
line naming its extra, the lock files match pyproject, and the wheel ships the configs."""

import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import minsnr.cli
from minsnr.config import load_config
from minsnr.evaluate import losses, plots
from minsnr.hooks import build_hooks
from minsnr.launch import main as train_main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TINY = [
    "model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}",
    "train.batch_size=8",
    "train.steps=2",
    "log.every=1",
    "log.preview_every=0",
    "checkpoint.every=2",
]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _lock(path: Path) -> dict[str, str]:
    pins = [line.split("==") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {_name(name): version for name, version in pins}


def _forget(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Drop MODULE and its submodules from sys.modules for this test, so the next import runs anew."""
    for module in modules:
        for cached in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, cached)


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import MODULE` fail as if the package were not installed (None in sys.modules)."""
    _forget(monkeypatch, *modules)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_tensorboard_missing_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    _block(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with caplog.at_level(logging.WARNING):
        code = train_main(["quickstart", *TINY, f"run_dir={tmp_path}", "log.tensorboard=true"])
    assert code == 0
    hints = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert hints == ["tensorboard not installed: pip install 'minsnr[tensorboard]'; logging to metrics.jsonl only"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_installed_gets_the_scalars(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert train_main(["quickstart", *TINY, f"run_dir={tmp_path}", "log.tensorboard=true"]) == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")) and not caplog.records


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "fid_cls": 3.0}) + "\n")
    _block(monkeypatch, "matplotlib")
    assert plots.main([str(run), "--out", str(tmp_path / "fig")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "minsnr plot: error: matplotlib not installed: pip install 'minsnr[plots]' (needed for minsnr plot)"
    assert not (tmp_path / "fig.json").exists()  # stopped before doing anything


def test_losses_without_matplotlib_stops_before_evaluating(tmp_path, monkeypatch, capsys):
    _block(monkeypatch, "matplotlib")
    assert losses.main([str(tmp_path / "never_read.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'minsnr[plots]'" in err[0] and "never_read" not in err[0]


@pytest.mark.parametrize("verb", ["pareto", "conflict"])
def test_figure_verbs_without_matplotlib_end_in_one_line(verb, monkeypatch, capsys):
    _block(monkeypatch, "matplotlib")
    _forget(monkeypatch, "minsnr.pareto.plots", "minsnr.pareto.cli", "minsnr.pareto.conflict")
    assert minsnr.cli.main([verb, "x.pt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"minsnr {verb}: error: matplotlib not installed: pip install 'minsnr[plots]' (needed for the Pareto figures)"
    ]


def test_periodic_inception_fid_without_torch_fidelity_stops_before_training(tmp_path, monkeypatch, capsys):
    _block(monkeypatch, "torch_fidelity")
    assert train_main(["quickstart", *TINY, f"run_dir={tmp_path}", "log.eval_every=1"]) == 1
    assert "pip install 'minsnr[fid]'" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_latent_run_without_diffusers_trains_without_previews(monkeypatch, caplog):
    cfg = load_config("quickstart", ["data.source=latent", "data.path=/latents", "model.in_channels=4"])
    assert len(build_hooks(cfg)) == 1  # with diffusers: the preview grid
    _block(monkeypatch, "diffusers")
    with caplog.at_level(logging.WARNING):
        assert build_hooks(cfg) == ()
    assert [r.getMessage() for r in caplog.records] == [
        "diffusers not installed: pip install 'minsnr[latent]'; no previews or samples.png (they decode latents with the SD-VAE)"
    ]


def test_core_dependencies_are_the_demos_and_the_locks_pin_them():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    assert core == {"torch", "numpy", "omegaconf", "pyyaml", "tqdm", "safetensors", "pillow", "scikit-learn", "scipy"}
    extras = PYPROJECT["optional-dependencies"]
    assert set(extras) == {"fid", "latent", "plots", "slurm", "tensorboard", "test", "all"}
    assert {"matplotlib", "tensorboard"} <= {_name(r) for e in ("plots", "tensorboard") for r in extras[e]}
    demo, full = _lock(ROOT / "requirements-demo.lock"), _lock(ROOT / "requirements.lock")
    assert core <= set(demo) and not [n for n in demo if n.startswith(("nvidia", "triton", "cuda"))]
    assert demo["torch"].endswith("+cpu")  # the CPU build: no CUDA wheels for the demo
    optional = {_name(r) for name, reqs in extras.items() if name != "all" for r in reqs}
    assert core | optional <= set(full)
    assert not {"matplotlib", "tensorboard", "torch-fidelity", "torchvision", "diffusers"} & set(demo)


def test_wheel_ships_the_configs_and_declares_the_extras(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT / "minsnr", src / "minsnr", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("minsnr-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = sorted(n.removeprefix("minsnr/configs/") for n in names if n.startswith("minsnr/configs/"))
    here = sorted(
        str(p.relative_to(ROOT / "minsnr" / "configs")) for p in (ROOT / "minsnr" / "configs").rglob("*.yaml")
    )
    assert shipped == here and "quickstart.yaml" in shipped and "compare/cpu.yaml" in shipped  # the compare presets too
    assert {"fid", "latent", "plots", "tensorboard", "test", "all"} <= set(
        re.findall(r"Provides-Extra: (\S+)", metadata)
    )
    unconditional = re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.M)
    assert {_name(r) for r in unconditional} == {_name(r) for r in PYPROJECT["dependencies"]}


BLOCKER = """
import sys, importlib.abc
OPTIONAL = {"matplotlib", "tensorboard", "torch_fidelity", "torchvision", "diffusers"}  # every extra's packages
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ImportError(f"No module named {name!r} (blocked: not in the core install)")
sys.meta_path.insert(0, Blocked())
from minsnr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_core_install_trains_and_samples_with_every_extra_missing(tmp_path):
    """What `make demo` installs (no extras) is enough to train, resume-ready checkpoint included, and sample:
    run in a subprocess whose imports of every optional package fail."""
    run = lambda *args: subprocess.run(
        [sys.executable, "-c", BLOCKER, *args],
        capture_output=True,
        text=True,  # noqa: E731
        cwd=tmp_path,
        timeout=300,
    )
    trained = run("train", "quickstart", *TINY, "log.tensorboard=true", f"run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "pip install 'minsnr[tensorboard]'" in trained.stdout + trained.stderr
    sampled = run(
        "sample",
        str(tmp_path / "run" / "ema.safetensors"),
        "--num",
        "20",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "s.npz"),
        "--grid",
        str(tmp_path / "g.png"),
        "--device",
        "cpu",
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert (tmp_path / "s.npz").is_file() and (tmp_path / "g.png").is_file()
