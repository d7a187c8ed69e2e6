"""The compare presets load, pass the comparison's checks and say what their comments say."""

import pytest

from minsnr.compare.presets import check_base, resolve, run_matrix
from minsnr.config import PACKAGED_CONFIGS, ConfigError, load_config, with_model_args
from minsnr.models import build_model


@pytest.mark.parametrize("name", ["cpu", "cifar10", "mnist"])
def test_presets_run_each_target_with_its_baseline_and_min_snr(name):
    path, settings = resolve(name)
    cfg = load_config(path)
    assert check_base(cfg) == (cfg, [])  # nothing to adjust
    runs = [(s.name, s.reference, s.gamma) for s in run_matrix(settings, cfg.loss.gamma)]
    assert runs == [
        ("x0_const", True, None),
        ("x0_min_snr", False, 5.0),
        ("eps_snr", True, None),
        ("eps_min_snr", False, 5.0),
        ("v_plain", True, None),
        ("v_min_snr", False, 5.0),
    ]
    assert cfg.train.steps % cfg.log.eval_every == 0 and cfg.checkpoint.every <= cfg.log.eval_every


def test_cifar10_preset_is_the_15m_pixel_vit():
    cfg = with_model_args(load_config(resolve("cifar10")[0]))
    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert 14e6 < n < 16e6 and cfg.model.input_size == 32 and cfg.train.batch_size == 128
    assert cfg.train.steps >= 20_000


def test_mnist_preset_is_the_mnist_recipe_model_with_its_race_settings():
    race = load_config(resolve("mnist")[0])
    recipe = load_config(PACKAGED_CONFIGS / "mnist.yaml")
    assert race.model == recipe.model and race.optim == recipe.optim and race.ema == recipe.ema
    assert race.data.source == "npz" and race.model.input_size == 28
    assert race.log.eval_num == 500 and race.train.steps // race.log.eval_every == 10  # ten evaluations
    assert race.sample.cfg_scale == 1.0  # no guidance: an evaluation costs one network call per step


def test_unknown_preset_or_weighting_is_named():
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve("cpuu")
    _, settings = resolve("cpu")
    settings.weightings = ["min_snr:-1"]
    with pytest.raises(ConfigError, match="gamma must be > 0"):
        run_matrix(settings, None)
    settings.weightings = ["minsnr"]
    with pytest.raises(ConfigError, match="did you mean 'min_snr'.*choose from const, snr.*or baseline"):
        run_matrix(settings, None)
