"""Every shipped config loads, validates and builds its model (on the meta device: no memory); packaged
configs are found by name."""

from pathlib import Path

import pytest
import torch

from minsnr.config import (
    PACKAGED_CONFIGS,
    Config,
    ConfigError,
    load_config,
    packaged_configs,
    resolve_config,
    with_model_args,
)
from minsnr.launch import main as train_main
from minsnr.models import MODELS, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "minsnr" / "configs").glob("*.yaml"))
# paper table 6 and appendix C.1/C.2 settings each config must keep
PAPER = {
    "celeba64_vit_s": dict(name="vit_s", steps=500_000, warmup=5000, betas=[0.99, 0.99], classes=0),
    "celeba64_unet": dict(name="unet_adm_ablation", steps=500_000, warmup=5000, betas=[0.9, 0.999], classes=0),
    "imagenet64_vit_l": dict(name="vit_l", classes=1000, drop=0.15, cfg=1.5, sample_steps=20, betas=[0.99, 0.99]),
    "imagenet256_vit_b": dict(name="vit_b", classes=1000, sample_steps=30, betas=[0.99, 0.99], channels=4),
    "imagenet256_vit_xl": dict(name="vit_xl", classes=1000, sample_steps=50, betas=[0.99, 0.99], channels=4),
    "imagenet256_unet_ablation": dict(name="unet_adm_ablation", classes=1000, sample_steps=30, betas=[0.9, 0.999]),
}


def test_all_paper_configs_are_shipped():
    assert set(PAPER) | {"quickstart", "mnist"} == {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model)
    x = torch.empty(2, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size, device="meta")
    assert model(x, torch.zeros(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")).shape == x.shape
    want = PAPER.get(path.stem)
    if want is None:
        return
    assert cfg.model.name == want["name"] and cfg.model.num_classes == want["classes"]
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == want["betas"] and cfg.ema.decay == 0.9999
    assert cfg.schedule.name == "cosine" and cfg.schedule.num_timesteps == 1000 and cfg.sample.sampler == "heun"
    assert cfg.loss.weighting == "min_snr" and cfg.loss.gamma == 5.0
    for key, value in [
        ("steps", cfg.train.steps),
        ("warmup", cfg.optim.warmup_steps),
        ("drop", cfg.loss.label_dropout),
        ("cfg", cfg.sample.cfg_scale),
        ("sample_steps", cfg.sample.steps),
        ("channels", cfg.model.in_channels),
    ]:
        if key in want:
            assert value == want[key], (path.stem, key)


def test_override_types_are_checked():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(CONFIGS[0], ["train.batch_size=-4"])
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config(CONFIGS[0], ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIGS[0], ["train.steps"])


def test_switching_model_drops_the_files_architecture_args(caplog):
    quickstart = [p for p in CONFIGS if p.stem == "quickstart"][0]
    cfg = load_config(quickstart, ["model.name=unet_tiny", "model.args.dropout=0.1"])
    preset = {k: list(v) if isinstance(v, tuple) else v for k, v in MODELS["unet_tiny"][1].items()}
    assert cfg.model.args == {**preset, "dropout": 0.1}  # the new model's preset, completed; nothing of the ViT's
    assert "dropping the config file's arguments for vit_tiny" in caplog.text and "'width': 64" in caplog.text
    caplog.clear()
    assert load_config(quickstart, ["model.name=vit_tiny"]).model.args["width"] == 64  # same model: kept
    assert "dropping" not in caplog.text


def test_bad_values_are_blamed_on_their_source(tmp_path):
    quickstart = [p for p in CONFIGS if p.stem == "quickstart"][0]
    with pytest.raises(ConfigError, match=r"command-line override 'train.steps=abc': bad value for 'train.steps'"):
        load_config(quickstart, ["train.steps=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.stepz' \(did you mean 'steps'\?\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"sample.sampler='hune' is not valid \(did you mean 'heun'\?\)"):
        load_config(quickstart, ["sample.sampler=hune"])


def test_paths_expand_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    quickstart = [p for p in CONFIGS if p.stem == "quickstart"][0]
    cfg = load_config(
        quickstart, ["run_dir=~/runs/a", "data.source=npz", "data.path=~/d.npz", "log.eval_classifier=~/clf"]
    )
    assert (cfg.run_dir, cfg.data.path, cfg.log.eval_classifier) == (
        f"{tmp_path}/runs/a",
        f"{tmp_path}/d.npz",
        f"{tmp_path}/clf",
    )


def test_config_returns_a_new_object_and_never_edits_its_input():
    cfg = Config()
    args_before = dict(cfg.model.args)
    out = with_model_args(cfg)
    assert cfg.model.args == args_before == {} and out.model.args["width"] == 64 and out is not cfg


def test_the_choices_table_is_generated_from_the_registries():
    """Every list of valid names is written once, in its registry; docs/configuration.md's table is built from
    them (tests/test_architecture.py checks that the file is current)."""
    from minsnr.reference import choices_table
    from minsnr.sampling import SAMPLERS

    assert f"| `sample.sampler` | {', '.join(f'`{s}`' for s in SAMPLERS)} |" in choices_table()


def test_repo_configs_folder_is_the_packaged_one():
    assert PACKAGED_CONFIGS.resolve() == (ROOT / "minsnr" / "configs").resolve()
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == [p.name for p in CONFIGS]
    assert (ROOT / "configs" / "quickstart.yaml").resolve() == (PACKAGED_CONFIGS / "quickstart.yaml").resolve()


def test_packaged_config_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: only the package can supply the file
    assert set(packaged_configs()) == {p.stem for p in CONFIGS}
    assert resolve_config("quickstart") == PACKAGED_CONFIGS / "quickstart.yaml"
    by_name = load_config("quickstart", ["train.steps=7"])
    assert by_name == load_config(PACKAGED_CONFIGS / "quickstart.yaml", ["train.steps=7"])
    assert by_name.model.args["width"] == 64 and by_name.train.steps == 7


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("quickstart").write_text("train: {steps: 3}\n")
    assert resolve_config("quickstart") == Path("quickstart")
    assert load_config("quickstart").train.steps == 3


@pytest.mark.parametrize("arg", ["no_such_config", "quickstart.yaml", "elsewhere/quickstart"])
def test_unknown_config_lists_the_packaged_names(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(arg)
    assert arg in str(err.value) and all(name in str(err.value) for name in packaged_configs())


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_train_list_prints_every_packaged_config(capsys):
    assert train_main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in CONFIGS)
    assert "8x8 handwritten digits" in [line for line in lines if line.startswith("quickstart ")][0]


def test_train_without_config_says_how_to_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main([])
    assert exit_.value.code == 2 and "minsnr train --list" in capsys.readouterr().err
