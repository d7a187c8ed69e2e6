"""The top-level API: every public name resolves lazily (torch is not imported by `import minsnr`), and
the README's "Use Min-SNR in your own training loop" example runs and does what it says."""

import importlib
import math
import os
import re
import subprocess
import sys
from itertools import accumulate
from pathlib import Path

import pytest
import torch

import minsnr

ROOT = Path(__file__).resolve().parents[1]
# the names the README and issue 13 promise, with the module that defines each
PUBLIC = {
    "minsnr.schedule": ["make_schedule", "Schedule"],
    "minsnr.weighting": ["loss_weight", "x0_weight"],
    "minsnr.loss": ["diffusion_loss", "TrainingLoss"],
    "minsnr.objective": ["q_sample", "predict_x0", "predict_eps", "convert", "drop_labels"],
    "minsnr.sampling": [
        "karras_sigmas",
        "sample_heun",
        "sample_euler",
        "sample_ddim",
        "generate",
        "VPDenoiser",
        "CFGDenoiser",
    ],
    "minsnr.models": ["create_model", "MODELS"],
    "minsnr.checkpoint": ["load_model"],
    "minsnr.config": ["load_config", "Config"],
}
NAMES = [name for names in PUBLIC.values() for name in names]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    ).stdout


def test_dir_lists_exactly_the_public_api():
    assert sorted(minsnr.__all__) == sorted(NAMES)
    assert set(NAMES) <= set(dir(minsnr))
    assert [n for n in dir(minsnr) if not n.startswith("_")] == sorted(NAMES)


@pytest.mark.parametrize("module, name", [(m, n) for m, names in PUBLIC.items() for n in names])
def test_every_public_name_is_the_defining_modules_object(module, name):
    assert getattr(minsnr, name) is getattr(importlib.import_module(module), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'diffusion_losss'.*diffusion_loss"):
        minsnr.diffusion_losss  # noqa: B018
    assert not hasattr(minsnr, "train_loop")


def test_import_and_help_do_not_load_torch():
    out = _python("import sys, minsnr; print('torch' in sys.modules, len(dir(minsnr)))")
    assert out.split() == ["False", str(len(NAMES) + 1)]
    out = _python("import sys; from minsnr.cli import main; main(['--help']); print('torch' in sys.modules)")
    assert out.splitlines()[-1] == "False" and "usage: minsnr <verb>" in out
    out = _python("import sys, minsnr; minsnr.make_schedule; print('torch' in sys.modules)")
    assert out.strip() == "True"  # the first use imports what it needs


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use Min-SNR in your own training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README section 'Use Min-SNR in your own training loop' has no python block"
    return match.group(1)


def test_readme_training_loop_example_runs():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 16  # the promised short example
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    model, out, images = ns["model"], ns["out"], ns["images"]
    # the optimizer trained it: the zero-initialised output layer has moved
    assert model.head.weight.abs().sum() > 0
    # the loss is Min-SNR-5 for the x0 target: min(SNR, 5) with SNR from the cosine closed form (section 3.4)
    assert out.t.dtype == torch.int64
    f = [math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for u in range(1001)]
    alpha_bar = torch.tensor(
        list(accumulate((1 - min(1 - f[i + 1] / f[i], 0.999) for i in range(1000)), lambda a, b: a * b)),
        dtype=torch.float64,
    )
    snr = (alpha_bar / (1 - alpha_bar))[out.t]
    torch.testing.assert_close(out.weight.double(), snr.clamp(max=5.0), rtol=1e-3, atol=0)
    assert images.shape == (10, 1, 8, 8) and images.dtype == torch.float32 and torch.isfinite(images).all()
