"""`minsnr export` (minsnr.integrations.export): a diffusers_unet2d run as a diffusers pipeline folder that
DDPMPipeline and DDIMPipeline load offline and that predicts what our model predicts, on our schedule and
target; our ViT and UNet refused with --to diffusers; --to safetensors read back by load_model; OUT refused
when not empty; nothing left behind by a failed export; bad inputs in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_eval_sample import make_checkpoint

import minsnr
import minsnr.integrations.export as export_mod
from minsnr.checkpoint import EMA_EXPORT, load_model
from minsnr.cli import main
from minsnr.config import load_config
from minsnr.integrations.export import diffusers_scheduler
from minsnr.objective import make_target, q_sample
from minsnr.schedule import make_schedule
from minsnr.train import train

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=diffusers_unet2d",
    "model.args.block_out_channels=[8,16]",
    "model.args.attention_head_dim=4",
    "model.args.norm_num_groups=4",
    "train.batch_size=8",
    "train.steps=2",
    "train.threads=1",
    "log.preview_every=0",
    "checkpoint.every=2",
]
UNCONDITIONAL = ["model.num_classes=0", "loss.label_dropout=0", "loss.target=v", "schedule.name=linear"]


def quickstart(*extra: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", [*TINY, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two trained runs of 2 steps: class-conditional (x0, cosine) and unconditional (v, linear)."""
    root = tmp_path_factory.mktemp("runs")
    train(quickstart(f"run_dir={root / 'cond'}"))
    train(quickstart(f"run_dir={root / 'uncond'}", *UNCONDITIONAL))
    return {"cond": root / "cond", "uncond": root / "uncond"}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def export(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `minsnr export ARGV`."""
    code = main(["export", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def one_line_error(got: tuple[int, str, str], *says: str) -> None:
    code, _, err = got
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("minsnr export: error: "), err
    assert "Traceback" not in err and all(s in err for s in says), err


@pytest.mark.parametrize(
    "target, name, extra",
    [("eps", "cosine", []), ("x0", "cosine", []), ("v", "linear", ["schedule.num_timesteps=100"]),
     ("v", "cosine", ["schedule.zero_terminal_snr=true"])],
)  # fmt: skip
def test_the_scheduler_is_our_schedule_and_reads_our_target(target, name, extra):
    """diffusers' own scheduler step, given the exact target of x_t, recovers x0 (beyond [-1, 1]: no clipping),
    and its alphas_cumprod is ours: so schedule, prediction_type and clip_sample are all right."""
    cfg = quickstart(f"loss.target={target}", f"schedule.name={name}", *extra)
    ours = make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps, cfg.schedule.zero_terminal_snr)
    sched = diffusers_scheduler(cfg)
    assert (sched.alphas_cumprod.double() - ours.alphas_cumprod).abs().max() < 1e-6
    assert len(sched.alphas_cumprod) == cfg.schedule.num_timesteps
    g = torch.Generator().manual_seed(0)
    x0, eps = 2 * torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t in (1, cfg.schedule.num_timesteps // 2, cfg.schedule.num_timesteps - 5):
        a, s = ours.alpha(torch.tensor(t)).float(), ours.sigma(torch.tensor(t)).float()
        x_t = q_sample(x0, eps, a, s)
        step = sched.step(make_target(x0, eps, a, s, target), t, x_t, generator=g)
        torch.testing.assert_close(step.pred_original_sample, x0, atol=2e-4, rtol=1e-4)


def test_a_conditional_run_exports_a_pipeline_that_predicts_as_our_model(runs, offline, tmp_path, capsys):
    out = tmp_path / "pipe"
    code, said, _ = export(capsys, str(runs["cond"]), "--to", "diffusers", str(out))
    assert code == 0
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert "class_labels=" in said and "10 is the null label" in said  # how to condition, printed
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary left beside it

    ours, cfg = load_model(runs["cond"] / "checkpoints" / "latest.pt", ema=True)
    raw, _ = load_model(runs["cond"] / "checkpoints" / "latest.pt", ema=False)
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 17, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        want = ours(x, t, labels)
        for pipeline in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):
            pipe = pipeline.from_pretrained(out)
            abar = make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps).alphas_cumprod
            assert (pipe.scheduler.alphas_cumprod.double() - abar).abs().max() < 1e-6
            assert pipe.scheduler.config.prediction_type == "sample"  # diffusers' name for an x0 model
            got = pipe.unet(x, t, class_labels=labels).sample
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(raw(x, t, labels), want, atol=1e-5)  # so the pipeline holds the EMA weights


def test_an_unconditional_pipeline_samples(runs, offline, tmp_path, capsys):
    out = tmp_path / "pipe"
    assert export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out))[0] == 0
    ours, _ = load_model(runs["uncond"] / "checkpoints" / "latest.pt")
    for pipeline in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):
        pipe = pipeline.from_pretrained(out)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        abar = make_schedule("linear", 1000).alphas_cumprod
        assert (pipe.scheduler.alphas_cumprod.double() - abar).abs().max() < 1e-6
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(x, t).sample, ours(x, t, None), atol=1e-5, rtol=0)
        images = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        images = images.images
        assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()


@pytest.mark.parametrize("backbone", ["vit_tiny", "unet_tiny"])
def test_our_backbones_are_refused_with_to_diffusers(backbone, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "c.pt", 10, f"model.name={backbone}")
    got = export(capsys, str(ckpt), "--to", "diffusers", str(tmp_path / "out"))
    one_line_error(got, str(ckpt), f"backbone '{backbone}' has no diffusers class", "--to safetensors")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_to_safetensors_round_trips_through_load_model(runs, tmp_path, capsys):
    """The EMA weights, read back by load_model (and minsnr.load_model) unchanged; from a run folder the file
    is byte for byte the run's own ema.safetensors (same step, same config, same class names)."""
    out = tmp_path / "w" / "run.safetensors"
    assert export(capsys, str(runs["cond"]), "--to", "safetensors", str(out))[0] == 0
    assert out.read_bytes() == (runs["cond"] / EMA_EXPORT).read_bytes()
    ema, cfg = load_model(runs["cond"] / "checkpoints" / "latest.pt", ema=True)
    for load in (load_model, minsnr.load_model):
        back, back_cfg = load(out)
        assert back_cfg == cfg and back.state_dict().keys() == ema.state_dict().keys()
        assert all(torch.equal(v, ema.state_dict()[k]) for k, v in back.state_dict().items())
    vit = make_checkpoint(tmp_path / "vit.pt")  # a ViT: .pt -> .safetensors -> .safetensors gives the same file
    assert export(capsys, str(vit), "--to", "safetensors", str(tmp_path / "a.safetensors"))[0] == 0
    assert (
        export(capsys, str(tmp_path / "a.safetensors"), "--to", "safetensors", str(tmp_path / "b.safetensors"))[0] == 0
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    vit_ema, _ = load_model(vit, ema=True)
    assert all(
        torch.equal(v, vit_ema.state_dict()[k])
        for k, v in load_model(tmp_path / "b.safetensors")[0].state_dict().items()
    )


def test_an_out_that_is_not_empty_is_refused_unless_forced(runs, tmp_path, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    assert export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out))[0] == 0  # an empty folder is fine
    (out / "mine.txt").write_text("keep me")
    got = export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out))
    one_line_error(got, str(out), "exists and is not empty", "--force")
    assert (out / "mine.txt").read_text() == "keep me"
    assert export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out), "--force")[0] == 0
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # the replaced folder is gone too
    weights = tmp_path / "w.safetensors"
    weights.write_text("x")
    one_line_error(export(capsys, str(runs["uncond"]), "--to", "safetensors", str(weights)), "exists and is not empty")


def test_a_failed_export_leaves_no_folder_behind(runs, tmp_path, capsys, monkeypatch):
    def half_then_fail(model, cfg, step, class_names, folder, out):
        (folder / "model_index.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "write_diffusers", half_then_fail)
    out = tmp_path / "pipe"
    one_line_error(export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out)), "No space left")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary
    out.mkdir()
    (out / "old.txt").write_text("old")
    one_line_error(export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out), "--force"), "No space left")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_bad_inputs_are_one_line(runs, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    out = str(tmp_path / "out")
    one_line_error(export(capsys, str(tmp_path / "nope.pt"), "--to", "diffusers", out), "checkpoint not found")
    one_line_error(export(capsys, str(text), "--to", "diffusers", out), str(text), "not a minsnr checkpoint")
    one_line_error(export(capsys, str(tmp_path), "--to", "diffusers", out), "without checkpoints/latest.pt")
    one_line_error(
        export(capsys, str(runs["cond"]), "--to", "difusers", out), "'difusers' is not valid", "diffusers, safetensors"
    )
    one_line_error(export(capsys, str(runs["cond"]), "--to", "safetensors", out), "must end in .safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]


def test_a_forced_export_that_cannot_go_in_puts_the_old_folder_back(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = export_mod.os.replace

    def no_rename_into_out(src, dst):  # the new folder's rename fails (after the old one was moved aside)
        if Path(dst) == out and Path(src).name.endswith(".tmp"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", no_rename_into_out)
    got = export(capsys, str(runs["uncond"]), "--to", "diffusers", str(out), "--force")
    one_line_error(got, "Input/output error")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["pipe"]
