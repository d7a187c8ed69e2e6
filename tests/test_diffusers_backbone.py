"""The diffusers_unet2d backbone (minsnr.models.diffusers_unet2d): minsnr's model interface on a diffusers
UNet2DModel (shapes, class conditioning with the null label, fractional timesteps), its argument errors, its
lazy import of diffusers, and a quickstart run on it: training, exact and strict resume, `minsnr sample`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minsnr.checkpoint import CheckpointError, load_checkpoint
from minsnr.cli import main as cli
from minsnr.config import load_config
from minsnr.extras import MissingExtra
from minsnr.models import create_model
from minsnr.train import train

pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=4)


def unet(num_classes: int = 10, channels: int = 3, size: int = 8, **args) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "diffusers_unet2d", input_size=size, in_channels=channels, num_classes=num_classes, **{**TINY, **args}
    ).eval()


def inputs(batch: int = 4, channels: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 3), (8, 4)])
def test_output_shape_equals_input_shape(size, channels):
    x, t = inputs(2, channels, size)
    for num_classes, labels in [(10, torch.tensor([0, 10])), (10, None), (0, None)]:
        out = unet(num_classes, channels, size)(x, t, labels)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_the_class_conditions_the_output_and_the_last_row_is_the_null_label():
    model = unet(num_classes=10)
    x, t = inputs()
    real = model(x, t, torch.tensor([1, 2, 3, 4]))
    null = model(x, t, torch.full((4,), 10))
    assert model.unet.class_embedding.num_embeddings == 11  # num_classes + 1 rows: the null label is the last
    assert not torch.allclose(model(x, t, torch.tensor([5, 6, 7, 8])), real, atol=1e-4)
    assert not torch.allclose(null, real, atol=1e-4)  # the null row is a class of its own
    torch.testing.assert_close(model(x, t, None), null)  # labels=None means the null label, as the ViT
    # each sample sees only its own label: changing sample 0's label leaves samples 1..3 as they were
    torch.testing.assert_close(model(x, t, torch.tensor([9, 2, 3, 4]))[1:], real[1:])
    with pytest.raises(IndexError):
        model(x, t, torch.full((4,), 11))  # beyond the null row


def test_an_unconditional_model_has_no_class_table_and_ignores_labels():
    model = unet(num_classes=0)
    x, t = inputs()
    assert model.unet.class_embedding is None and not any("class" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x, t, torch.tensor([1, 2, 3, 4])), model(x, t, None))


def test_fractional_timesteps():
    """Samplers call the model between the integer steps it was trained on (minsnr.sampling.VPDenoiser): a float
    t equal to an integer gives the integer's output, t + 0.5 another one, and the output is continuous in t."""
    model = unet()
    x, _ = inputs()
    t = torch.tensor([3, 250, 500, 998])
    at_int = model(x, t, None)
    torch.testing.assert_close(model(x, t.float(), None), at_int)
    torch.testing.assert_close(model(x, t.double(), None), at_int)
    half = model(x, t + 0.5, None)
    assert not torch.allclose(half, at_int, atol=1e-5)
    near = model(x, t + 1e-3, None)
    assert (near - at_int).abs().max() < (half - at_int).abs().max() / 20


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    x, t = inputs()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = unet(dropout=0.0, grad_checkpointing=checkpointing).train()
        seen: list[int] = []
        model.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        model(x, t, torch.tensor([1, 2, 3, 10])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(len(seen))
    assert calls == [1, 2]  # with checkpointing the block runs again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_bad_arguments_are_one_line_errors():
    blocks = dict(block_out_channels=(8, 16, 16, 16), down_block_types=["DownBlock2D"] * 4)
    cases = [
        (dict(blocks=2), r"no argument\(s\) \['blocks'\]; valid arguments: block_out_channels, layers_per_block, "),
        (dict(size=12, **blocks, up_block_types=["UpBlock2D"] * 4), r"input_size=12 must be divisible by .* = 8"),
        (dict(block_out_channels=(8, 18)), r"\[8, 18\] must be multiples of norm_num_groups=4"),
        (dict(down_block_types=["DownBlock2D"]), r"down_block_types \(1\), up_block_types \(2\) and block_out_"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            unet(**args)
        assert "\n" not in str(err.value)


def test_a_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(
        MissingExtra, match=r"diffusers not installed: pip install 'minsnr\[latent\]' \(needed for model"
    ):
        unet()


def test_importing_the_model_registry_does_not_import_diffusers():
    code = "import sys, minsnr.models, minsnr.config; print('diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# ---- a quickstart run on the backbone ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "model.name=diffusers_unet2d",
    "model.args.block_out_channels=[8,16]",
    "model.args.attention_head_dim=4",
    "model.args.norm_num_groups=4",
    "train.batch_size=8",
    "train.threads=1",
    "log.every=1",
    "log.preview_every=0",
    "optim.warmup_steps=2",
    "checkpoint.every=2",
    "checkpoint.keep=10",
]


def quickstart(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", [*RUN, f"run_dir={run_dir}", *extra])


def test_quickstart_trains_resumes_exactly_and_strictly_and_samples(tmp_path, capsys):
    train(quickstart(tmp_path / "one", "train.steps=4"))
    train(quickstart(tmp_path / "two", "train.steps=2"))
    train(quickstart(tmp_path / "two", "train.steps=4"))  # resumes from step 2 (resume=auto)
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "latest.pt") for run in ("one", "two"))
    assert a["step"] == b["step"] == 4 and a["config"]["model"]["name"] == "diffusers_unet2d"
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and any(k.startswith("unet.class_embedding") for k in a[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}: resumed run differs"
    step2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "step_000000002.pt")
    assert not torch.equal(step2["model"]["unet.conv_out.weight"], a["model"]["unet.conv_out.weight"])  # it trained

    # strict: a checkpoint missing one weight of the UNet is refused, naming it
    del step2["model"]["unet.conv_out.bias"]
    torch.save(step2, tmp_path / "broken.pt")
    with pytest.raises(
        CheckpointError,
        match=r"broken.pt \(model\) does not fit the model DiffusersUNet2D:\s+Missing key.*unet.conv_out.bias",
    ):
        train(quickstart(tmp_path / "three", "train.steps=4", f"resume={tmp_path / 'broken.pt'}"))

    # minsnr sample draws from it (fractional timesteps, classifier-free guidance with the null label)
    out = tmp_path / "s.npz"
    argv = ["sample", str(tmp_path / "one" / "checkpoints" / "latest.pt"), "--num", "6", "--batch", "3"]
    assert cli([*argv, "--steps", "2", "--cfg-scale", "2", "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (6, 8, 8, 1) and z["arr_0"].dtype == np.uint8
        assert sorted(z["arr_1"].tolist()) == [0, 1, 2, 3, 4, 5]  # class-balanced labels
