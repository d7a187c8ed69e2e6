"""Each choice is one registry entry: registering a new timestep distribution, sampler, data source or
schedule makes config validation accept it and the code paths dispatch to it, with nothing else edited."""

from pathlib import Path

import numpy as np
import pytest
import torch

from minsnr import sampling, schedule, timesteps
from minsnr.config import ConfigError, load_config
from minsnr.data import SOURCES, ArrayDataset, build_dataset
from minsnr.loss import TrainingLoss, diffusion_loss
from minsnr.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.args={patch_size: 2, depth: 1, width: 16, num_heads: 2}",
    "train.batch_size=8",
    "train.steps=2",
    "log.every=1",
    "log.preview_every=0",
    "log.tensorboard=false",
    "checkpoint.every=0",
]


def test_a_new_timestep_distribution_is_one_registry_entry(tmp_path, monkeypatch):
    only_seven = timesteps.Distribution(lambda sched, w: (torch.arange(sched.num_timesteps) == 7).double())

    with pytest.raises(ConfigError, match="loss.timesteps='seven'"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["loss.timesteps=seven"])
    monkeypatch.setitem(timesteps.TIMESTEPS, "seven", only_seven)
    seen = []
    real = TrainingLoss.__call__

    def spy(*args, **kwargs):  # the trainer's calls: it draws t itself, from the loss's distribution
        seen.append(kwargs["t"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(TrainingLoss, "__call__", spy)
    train(load_config(ROOT / "configs" / "quickstart.yaml", [*TINY, "loss.timesteps=seven", f"run_dir={tmp_path}"]))
    assert len(seen) == 2 and all(torch.equal(t, torch.full((8,), 7)) for t in seen)
    monkeypatch.setattr(TrainingLoss, "__call__", real)
    # and diffusion_loss on its own draws from the same registry
    out = diffusion_loss(
        lambda x, t, y: x, torch.zeros(3, 1, 2, 2), None, schedule.make_schedule("cosine"), timesteps="seven"
    )
    assert torch.equal(out.t, torch.full((3,), 7))


def test_a_new_sampler_is_one_registry_entry(monkeypatch):
    calls = []

    def sample_identity(denoiser, x, sigmas, cond=None, progress=False):
        calls.append(len(sigmas))
        return denoiser(x, x.new_full((x.shape[0],), float(sigmas[-2])), **(cond or {}))

    with pytest.raises(ConfigError, match="sample.sampler='identity'"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["sample.sampler=identity"])
    monkeypatch.setitem(sampling.SAMPLERS, "identity", sample_identity)
    assert load_config(ROOT / "configs" / "quickstart.yaml", ["sample.sampler=identity"]).sample.sampler == "identity"
    net = torch.nn.Module()
    net.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    net.forward = lambda x, t, y: x  # type: ignore[method-assign]
    sampling.generate(net, schedule.make_schedule("cosine"), "x0", None, shape=(2, 1), sampler="identity", steps=5)
    assert calls == [6]


def test_a_new_data_source_is_one_registry_entry(monkeypatch):
    def ramp(cfg, split, images):
        x = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
        return ArrayDataset(x, np.arange(4) % 2, num_classes=2, class_names=["a", "b"], **images)

    monkeypatch.setitem(SOURCES, "ramp", ramp)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["data.source=ramp"])
    data = build_dataset(cfg.data)
    assert len(data) == 4 and data.num_classes == 2 and data.shape == (1, 8, 8)


def test_a_new_schedule_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(schedule.SCHEDULES, "flat", lambda n: torch.linspace(0.99, 0.01, n, dtype=torch.float64))
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["schedule.name=flat", "schedule.num_timesteps=10"])
    s = schedule.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
    assert s.num_timesteps == 10 and s.alphas_cumprod[0].item() == pytest.approx(0.99)


def test_sigma_max_above_the_schedule_is_capped_with_a_warning(caplog):
    sched = schedule.make_schedule("cosine")
    seen = []
    net = torch.nn.Module()
    net.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    net.forward = lambda x, t, y: seen.append(float(t[0])) or x  # type: ignore[method-assign]
    sampling.generate(net, sched, "x0", None, shape=(1, 1), sampler="euler", steps=3, sigma_max=1e9)
    assert "above the schedule's largest sigma" in caplog.text
    assert seen[0] == pytest.approx(sched.num_timesteps - 1, abs=1e-3)  # started at the schedule's top, t = T-1
    caplog.clear()
    sampling.generate(net, sched, "x0", None, shape=(1, 1), sampler="euler", steps=3, sigma_max=1e9)
    assert caplog.text == ""  # said once
    caplog.clear()
    sampling.generate(net, sched, "x0", None, shape=(1, 1), sampler="euler", steps=3, sigma_max=80.0)
    assert caplog.text == ""  # below the top: no cap, nothing to say
