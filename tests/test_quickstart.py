"""The quickstart, shortened for CI: a class-conditional digits model must draw the digit it is asked for.

Threshold: at least 50% of samples classified as their conditioning digit. An untrained model (or one
that ignores its label) cannot pass: its samples do not depend on the label, so the expected share is
the chance level of 10% whatever it draws; the test also measures that on the freshly initialised model.
"""

from pathlib import Path

import pytest

from minsnr.config import load_config
from minsnr.quickcheck import check
from minsnr.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    common = ["log.preview_every=0", "log.tensorboard=false"]
    untrained = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [f"run_dir={base / 'untrained'}", "train.steps=1", "optim.lr=1e-12", *common],
    )
    trained = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [f"run_dir={base / 'trained'}", "train.steps=1400", "checkpoint.every=1400", *common],
    )
    train(untrained)
    train(trained)
    return base


def test_quickstart_draws_the_requested_digit(short_runs):
    result = check(short_runs / "trained" / "checkpoints" / "latest.pt", per_class=20)
    assert result["classifier_test_accuracy"] >= 0.9  # the judge itself must be good
    assert result["sample_accuracy"] >= 0.5, result["per_class"]


def test_untrained_model_is_at_chance(short_runs):
    result = check(short_runs / "untrained" / "checkpoints" / "latest.pt", per_class=20)
    assert result["sample_accuracy"] <= 0.2
