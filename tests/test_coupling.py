"""loss.noise_assignment: the immiscible assignment is the exact minimum-cost pairing, only permutes the noise
(common random numbers), is refused above its batch limit, and trains reproducibly through the Trainer."""

import itertools

import pytest
import torch

import minsnr.coupling as coupling
import minsnr.train as train_mod
from minsnr.checkpoint import load_checkpoint
from minsnr.config import ConfigError, load_config
from minsnr.coupling import MAX_ASSIGNMENT_BATCH, NOISE_ASSIGNMENTS, assign_noise, immiscible
from minsnr.loss import TrainingLoss


def cost(x0: torch.Tensor, noise: torch.Tensor) -> float:
    """sum_i ||x0_i - noise_i||^2 in float64."""
    return float((x0.double() - noise.double()).flatten(1).square().sum())


def sorted_rows(a: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(row) for row in a.flatten(1).tolist())


@pytest.mark.parametrize("seed", range(5))
def test_immiscible_is_the_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    best = min(cost(x0, noise[list(p)]) for p in itertools.permutations(range(6)))  # all 720 pairings
    out = immiscible(x0, noise)
    assert cost(x0, out) == pytest.approx(best, rel=1e-12)
    assert cost(x0, out) <= cost(x0, noise)
    assert out.shape == noise.shape and out.dtype == noise.dtype


def test_the_noise_rows_are_only_permuted():
    """Common random numbers: exactly the same set of noise vectors, each used once."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    out = immiscible(x0, noise)
    assert sorted_rows(out) == sorted_rows(noise)
    assert not torch.equal(out, noise)  # 64 random pairs: the identity is not the optimum
    matches = (out.flatten(1)[:, None] == noise.flatten(1)[None]).all(dim=2)  # [i, j]: row i is noise j
    assert torch.equal(matches.sum(dim=1), torch.ones(64, dtype=torch.long))
    assert torch.equal(matches.sum(dim=0), torch.ones(64, dtype=torch.long))


def test_independent_returns_the_noise_itself():
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert assign_noise("independent", x0, noise) is noise
    assert NOISE_ASSIGNMENTS["independent"](x0, noise) is noise
    assert coupling.DEFAULT_NOISE_ASSIGNMENT == "independent"


def test_immiscible_recovers_a_shuffled_matching():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(32, 3, 8, 8, generator=g)
    near = x0 + 0.01 * torch.randn(32, 3, 8, 8, generator=g)  # noise i sits next to image i
    shuffled = near[torch.randperm(32, generator=g)]
    assert torch.equal(immiscible(x0, shuffled), near)
    assert torch.equal(assign_noise("immiscible", x0, shuffled), near)


def test_a_batch_above_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(coupling, "MAX_ASSIGNMENT_BATCH", 4)
    x0, noise = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    with pytest.raises(ValueError, match=r"batch size 5 .*MAX_ASSIGNMENT_BATCH=4"):
        assign_noise("immiscible", x0, noise)
    assert assign_noise("immiscible", x0[:4], noise[:4]).shape == (4, 1, 2, 2)  # at the limit: allowed
    with pytest.raises(ValueError, match="loss.noise_assignment='immiscibel'.*independent, immiscible"):
        assign_noise("immiscibel", x0, noise)


def test_config_refuses_a_large_batch_and_unknown_names():
    too_big = f"train.batch_size={MAX_ASSIGNMENT_BATCH + 1}"
    with pytest.raises(ConfigError, match=r"loss.noise_assignment=immiscible.*train.batch_size=2049 must be <= 2048"):
        load_config("quickstart", ["loss.noise_assignment=immiscible", too_big])
    assert load_config("quickstart", [too_big]).loss.noise_assignment == "independent"  # the limit is immiscible's
    cfg = load_config("quickstart", ["loss.noise_assignment=immiscible", f"train.batch_size={MAX_ASSIGNMENT_BATCH}"])
    assert cfg.loss.noise_assignment == "immiscible"
    with pytest.raises(ConfigError, match=r"did you mean 'immiscible'.*choose one of: independent, immiscible"):
        load_config("quickstart", ["loss.noise_assignment=immiscibel"])


def short_run(tmp_path, name: str, assignment: str, monkeypatch) -> tuple[dict, list[tuple[torch.Tensor, ...]]]:
    """A 6-step quickstart run; its final checkpoint and the (x0, noise) of every loss call."""
    seen = []
    real = TrainingLoss.__call__

    def spy(self, model, x0, labels, t=None, noise=None, generator=None):
        seen.append((x0.clone(), noise.clone()))
        return real(self, model, x0, labels, t=t, noise=noise, generator=generator)

    monkeypatch.setattr(TrainingLoss, "__call__", spy)
    cfg = load_config(
        "quickstart",
        [
            f"run_dir={tmp_path}/{name}",
            "train.steps=6",
            "log.every=3",
            "checkpoint.every=3",
            "log.preview_every=0",
            "train.device=cpu",
            f"loss.noise_assignment={assignment}",
            "log.tensorboard=false",
        ],
    )
    out = train_mod.train(cfg)
    monkeypatch.setattr(TrainingLoss, "__call__", real)
    assert out["step"] == 6
    return load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt"), seen


def test_training_with_immiscible_noise(tmp_path, monkeypatch):
    a, seen_a = short_run(tmp_path, "a", "immiscible", monkeypatch)
    b, _ = short_run(tmp_path, "b", "immiscible", monkeypatch)

    def refuse(*args):
        raise AssertionError("the default path must not call assign_noise")

    monkeypatch.setattr(train_mod, "assign_noise", refuse)
    c, seen_c = short_run(tmp_path, "c", "independent", monkeypatch)
    monkeypatch.undo()

    metrics = [line for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert metrics and all("NaN" not in line and "Infinity" not in line for line in metrics)
    assert all(torch.isfinite(p).all() for p in a["model"].values())
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # reproducible
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # and not the default
    assert len(seen_a) == len(seen_c) == 6
    for (xa, na), (xc, nc) in zip(seen_a, seen_c, strict=True):
        assert torch.equal(xa, xc)  # the same images,
        assert sorted_rows(na) == sorted_rows(nc)  # the same noise vectors (CRN),
        assert cost(xa, na) < cost(xc, nc)  # re-paired closer to the images
        assert torch.equal(na, immiscible(xc, nc))
