"""Issue 24, items 11-13: every verb given a file that is not what it reads (a text file, a truncated file, a
pickle) says so in one line naming the file, with no traceback and never the loaders' advice to load it
unsafely; a missing data.path says it does not exist; `--help` of every verb needs no optional extra."""

from __future__ import annotations

import datetime
import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_sample import make_checkpoint

from minsnr.checkpoint import export_safetensors, load_model
from minsnr.cli import main
from minsnr.evaluate.classifier import SmallCNN, save_classifier

FORBIDDEN = ("weights_only", "allow_pickle", "unsafe", "unpickl", "traceback")
KINDS = ("text", "truncated", "pickle", "objects")  # objects: what only an unrestricted loader would read


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good files ("ckpt", "npz", "cls") and bad ones ("KIND.pt", "KIND.npz", "KIND.safetensors")."""
    d = tmp_path_factory.mktemp("files")
    ckpt = make_checkpoint(d / "good.pt")
    model, cfg = load_model(ckpt)
    export_safetensors(d / "good.safetensors", model.state_dict(), cfg, 0)
    np.savez(d / "good.npz", x=np.zeros((4, 8, 8, 1), np.uint8), y=np.arange(4))
    meta = {"image_shape": [8, 8, 1], "num_classes": 10, "width": 16, "feature_dim": 128}
    save_classifier(SmallCNN(1, 10, 16, 128), d / "cls", meta)
    out = {"ckpt": ckpt, "npz": d / "good.npz", "cls": d / "cls"}
    for suffix in (".pt", ".npz", ".safetensors"):
        good = (d / "good").with_suffix(suffix).read_bytes()
        out[f"text{suffix}"] = d / f"text{suffix}"
        out[f"text{suffix}"].write_text("# minsnr\n\nA README, not data.\n")
        out[f"truncated{suffix}"] = d / f"truncated{suffix}"
        out[f"truncated{suffix}"].write_bytes(good[:100])
        out[f"pickle{suffix}"] = d / f"pickle{suffix}"
        out[f"pickle{suffix}"].write_bytes(pickle.dumps({"a": 1}))
    out["objects.pt"] = d / "objects.pt"  # weights_only=True refuses a date: torch would advise loading it unsafely
    torch.save({"config": {}, "when": datetime.date(2024, 1, 1)}, out["objects.pt"])
    out["objects.npz"] = d / "objects.npz"
    np.savez(out["objects.npz"], x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stderr, everything printed or warned) of `minsnr ARGV`, in this process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    out = capsys.readouterr()
    return code, out.err.strip(), out.out + out.err + "".join(str(w.message) for w in caught)


def assert_one_line(got: tuple[int, str, str], code: int, verb: str, path: Path, what: str) -> None:
    exit_code, err, everything = got
    assert exit_code == code, err
    assert len(err.splitlines()) == 1 and err.startswith(f"minsnr {verb}"), err
    assert str(path) in err and re.search(what, err), err
    assert not [w for w in FORBIDDEN if w in everything.lower()], everything


CHECKPOINT_WHAT = {
    ".pt": r"cannot read checkpoint .*: not a (complete )?minsnr checkpoint",
    ".safetensors": r"not a complete \.safetensors file",
}


CHECKPOINT_CASES = [
    (verb, f"{kind}{suffix}")
    for verb in ("sample", "losses", "pareto", "conflict", "train", "export")
    for suffix in (".pt", ".safetensors")
    for kind in KINDS
    if (kind != "objects" or suffix == ".pt") and (verb != "train" or suffix == ".pt")
]


@pytest.mark.parametrize("verb, name", CHECKPOINT_CASES)
def test_a_checkpoint_that_is_not_one(verb, name, files, tmp_path, capsys):
    bad = files[name]
    argv = {
        "sample": [str(bad), "--out", str(tmp_path / "s.npz"), "--device", "cpu"],
        "losses": [str(bad), "--out", str(tmp_path / "l"), "--device", "cpu"],
        "pareto": [str(bad), "--out", str(tmp_path / "p"), "--device", "cpu"],
        "conflict": [str(bad), "--out", str(tmp_path / "c"), "--device", "cpu"],
        "train": ["quickstart", f"resume={bad}", f"run_dir={tmp_path / 'run'}", "train.steps=1"],
        "export": [str(bad), "--to", "diffusers", str(tmp_path / "e")],
    }[verb]
    code = 2 if verb in ("pareto", "conflict") else 1
    assert_one_line(run([verb, *argv], capsys), code, verb, bad, CHECKPOINT_WHAT[bad.suffix])
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "e").exists()


NPZ_WHAT = {
    "text": r"is not an \.npz file",
    "truncated": r"is not a complete \.npz file \(truncated or damaged\)",
    "pickle": r"is not an \.npz file",
    "objects": r"array 'x' does not read \(damaged, or not an array of numbers\)",
}


NPZ_CASES = [
    (verb, kind)
    for verb in ("train", "fid", "fid --ref", "train-classifier", "losses", "encode", "pareto", "conflict")
    for kind in KINDS
    if not (verb.startswith("fid") and kind == "objects")  # fid reads only the header: "must be uint8, got object"
]


@pytest.mark.parametrize("verb, kind", NPZ_CASES)
def test_an_npz_that_is_not_one(verb, kind, files, tmp_path, capsys):
    bad, good, ckpt = files[f"{kind}.npz"], str(files["npz"]), str(files["ckpt"])
    data = ["data.source=npz", "--data", str(bad), "--device", "cpu", "--out", str(tmp_path / "o")]
    argv = {
        "train": ["quickstart", "data.source=npz", f"data.path={bad}", f"run_dir={tmp_path}", "train.steps=1"],
        "fid": [str(bad), "--ref", good],
        "fid --ref": [good, "--ref", str(bad), "--features", "classifier", "--classifier", str(files["cls"])],
        "train-classifier": [str(bad), "--out", str(tmp_path / "cls")],
        "losses": [ckpt, "--data", str(bad), "--split", "train", "--out", str(tmp_path / "l"), "--device", "cpu"],
        "encode": ["--data", str(bad), "--out", str(tmp_path / "lat"), "--workers", "0"],
        "pareto": [ckpt, *data],
        "conflict": [ckpt, *data],
    }[verb]
    verb = verb.split()[0]
    code = 2 if verb in ("pareto", "conflict") else 1
    assert_one_line(run([verb, *argv], capsys), code, verb, bad, NPZ_WHAT[kind])


@pytest.mark.parametrize("kind", ["text", "truncated", "pickle"])
def test_fid_weights_and_classifier_that_are_not_ones(kind, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    good, bad = str(files["npz"]), files[f"{kind}.pt"]
    got = run(["fid", good, "--ref", good, "--inception-weights", str(bad)], capsys)
    assert_one_line(got, 1, "fid", bad, "is not an Inception weights file")
    meta = json.loads(files["cls"].with_suffix(".json").read_text())
    (tmp_path / "c.json").write_text(json.dumps(meta))  # a good meta beside bad weights
    (tmp_path / "c.safetensors").write_bytes(files[f"{kind}.safetensors"].read_bytes())
    (tmp_path / "m.json").write_bytes(bad.read_bytes())  # bad meta beside good weights
    (tmp_path / "m.safetensors").write_bytes(files["cls"].with_suffix(".safetensors").read_bytes())
    for stem, path, what in [("c", "c.safetensors", "not a complete .safetensors"), ("m", "m.json", "not JSON")]:
        got = run(
            ["fid", good, "--ref", good, "--features", "classifier", "--classifier", str(tmp_path / stem)], capsys
        )
        assert_one_line(got, 1, "fid", tmp_path / path, f"is not a minsnr classifier \\({what}")


@pytest.mark.parametrize("kind", ["text", "truncated", "pickle"])
def test_folder_and_latent_sources_that_are_not_ones(kind, files, tmp_path, capsys):
    bad = files[f"{kind}.npz"]
    train = ["train", "quickstart", f"run_dir={tmp_path / 'run'}", "train.steps=1"]
    got = run([*train, "data.source=folder", f"data.path={bad}"], capsys)
    assert_one_line(got, 1, "train", bad, r"is not a folder of images$")  # nothing about checkpoints
    latents = tmp_path / "latents"
    latents.mkdir()
    meta = {"vae": "v", "scale_factor": 1.0, "shape": [4, 2, 2], "count": 4, "num_classes": 2, "class_names": []}
    for name, what in [("meta.json", "is not JSON"), ("labels.npy", "is not a complete .npy array")]:
        (latents / "meta.json").write_text(json.dumps({**meta, "size": 16, "crop": "none"}))
        (latents / name).write_bytes(bad.read_bytes())
        got = run([*train, "data.source=latent", f"data.path={latents}", "data.resolution=null"], capsys)
        assert_one_line(got, 1, "train", latents / name, what)


@pytest.mark.parametrize("source", ["npz", "latent"])  # folder said so already
def test_a_missing_data_path_says_it_does_not_exist(source, tmp_path, capsys):
    missing = tmp_path / ("nope.npz" if source == "npz" else "nope")
    argv = ["train", "quickstart", f"data.source={source}", f"data.path={missing}", f"run_dir={tmp_path / 'run'}"]
    got = run(argv, capsys)
    assert_one_line(got, 1, "train", missing, "does not exist$")


def test_help_of_every_verb_needs_no_optional_extra(capsys):
    """Every extra made unimportable (as if not installed), in a fresh process: each verb's --help still works."""
    assert main(["--help"]) == 0
    verbs = re.findall(r"^  (\S+) ", capsys.readouterr().out, re.M)  # the verbs `minsnr --help` lists
    script = (
        "import sys, contextlib, io, json\n"
        "from minsnr.extras import EXTRAS\n"
        "for name in EXTRAS: sys.modules[name] = None\n"
        "from minsnr.cli import main\n"
        "codes = {}\n"
        f"for verb in {verbs!r}:\n"
        "    text = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):\n"
        "            code = main([verb, '--help'])\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code\n"
        "    codes[verb] = [code, text.getvalue()[:200]]\n"
        "print(json.dumps(codes))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.splitlines()[-1])
    assert len(verbs) >= 10 and set(codes) == set(verbs), verbs
    assert {verb: text for verb, (code, text) in codes.items() if code != 0 or "usage: minsnr" not in text} == {}


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    from minsnr.config import ConfigError, load_config

    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x04\x95" + bytes(range(256)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [\n")
    for path, why in [(binary, "not a text file"), (broken, "while parsing")]:
        with pytest.raises(ConfigError, match=f"config file {path} is not a YAML config \\({why}"):
            load_config(path)


def test_a_stored_cuda_config_is_analysed_on_a_machine_without_cuda():
    import torch

    from minsnr.config import ConfigError, apply_overrides, load_config

    cfg = load_config("quickstart")
    stored = apply_overrides(cfg, ["train.device=cuda"])  # what pareto/conflict do with a run's config
    assert stored.train.device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            load_config("quickstart", ["train.device=cuda"])  # a run about to start here is refused
