"""Crash safety (issue 12): what a kill, a torn or poisoned file, or a full disk leaves behind must never
lose a finished checkpoint, restart silently, leave garbage, or end in a raw traceback."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import ROOT, TINY, states_equal, tiny_cfg

import minsnr.launch as launch
from minsnr.checkpoint import CheckpointError, load_checkpoint, load_model
from minsnr.train import Hook, train

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def ckpts(run: Path) -> Path:
    return run / "checkpoints"


def step_file(run: Path, step: int) -> Path:
    return ckpts(run) / f"step_{step:09d}.pt"


def point_latest_at(run: Path, step: int) -> None:
    """What a kill between installing a step file and swapping latest.pt leaves: latest.pt one save behind."""
    tmp = ckpts(run) / "relink.tmp"
    os.link(step_file(run, step), tmp)
    os.replace(tmp, ckpts(run) / "latest.pt")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # in place: latest.pt, a hard link to it, is torn too


def poison(path: Path) -> None:
    """A pickle that weights_only=True rightly refuses (it would call a function on load), in place."""
    with path.open("r+b") as f:
        f.truncate(0)
        torch.save({"step": 2, "payload": os.getcwd}, f)


def test_resume_takes_newest_complete_checkpoint_not_latest(tmp_path, capsys):
    """Defect 1: killed after step_4.pt was installed but before latest.pt moved on from step 2."""
    train(tiny_cfg(tmp_path, "train.steps=4"))
    point_latest_at(tmp_path, 2)
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.steps=4"))  # the run is complete: it only has to notice
    out = capsys.readouterr().out
    assert f"resumed from {step_file(tmp_path, 4)} at step 4" in out
    assert f"latest.pt was behind; it now points at {step_file(tmp_path, 4).name}" in out
    assert (ckpts(tmp_path) / "latest.pt").samefile(step_file(tmp_path, 4))


@pytest.mark.parametrize("damage", ["behind", "missing"])
def test_resume_repairs_an_export_behind_the_checkpoint(tmp_path, capsys, damage):
    """Defect 2: a kill during the final export leaves the previous export (or none); the resumed run, already
    at its last step, must still rewrite ema.safetensors from the checkpoint and say so."""
    train(tiny_cfg(tmp_path, "train.steps=2"))
    old_export = (tmp_path / "ema.safetensors").read_bytes()
    train(tiny_cfg(tmp_path, "train.steps=4"))
    export = tmp_path / "ema.safetensors"
    if damage == "behind":
        export.write_bytes(old_export)
    else:
        export.unlink()
    capsys.readouterr()
    out = train(tiny_cfg(tmp_path, "train.steps=4"))
    assert out["step"] == 4 and "rewrote it with the EMA weights of step 4" in capsys.readouterr().out
    ema = load_checkpoint(step_file(tmp_path, 4))["ema"]
    weights = load_file(export)
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    with safe_open(str(export), framework="pt") as f:
        assert f.metadata()["step"] == "4"


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    """Defect 3: a kill (or full disk) in the middle of a metrics write must not block the resume."""
    train(tiny_cfg(tmp_path, "train.steps=4"))
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 6, "loss": 0.1')
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.steps=6"))
    assert f"{metrics}: dropped its torn last line 3" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4, 6]


def test_bad_metrics_line_before_the_end_names_file_and_line(tmp_path, capsys):
    train(tiny_cfg(tmp_path, "train.steps=4"))
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    code = launch.main([QUICKSTART, *TINY, f"run_dir={tmp_path}", "train.steps=6"])
    err = capsys.readouterr().err
    assert code == 1 and f"{metrics} line 2 is not JSON" in err, err
    assert "not json" in metrics.read_text()  # left as it was for the user to repair


@pytest.mark.parametrize("damage", [truncate, poison], ids=["truncated", "poisoned_pickle"])
def test_no_readable_checkpoint_refuses_and_deletes_nothing(tmp_path, damage):
    """Defect 4: every checkpoint unreadable must not mean a silent restart at step 0."""
    train(tiny_cfg(tmp_path, "train.steps=2"))
    damage(step_file(tmp_path, 2))
    (ckpts(tmp_path) / ".step_000000004.pt.1.ab.tmp").write_bytes(b"maybe the user's last copy")
    before = {p: p.read_bytes() for p in [*ckpts(tmp_path).iterdir(), tmp_path / "metrics.jsonl"]}
    with pytest.raises(
        CheckpointError, match=r"no checkpoint in .* can be read: cannot read checkpoint .*step_000000002\.pt"
    ):
        train(tiny_cfg(tmp_path, "train.steps=4"))
    assert {p: p.read_bytes() for p in [*ckpts(tmp_path).iterdir(), tmp_path / "metrics.jsonl"]} == before


def test_unreadable_newest_falls_back_with_a_warning_and_stays_exact(tmp_path, capsys):
    train(tiny_cfg(tmp_path / "one", "train.steps=6"))
    run = tmp_path / "two"
    train(tiny_cfg(run, "train.steps=4"))
    truncate(step_file(run, 4))  # latest.pt is the same file
    capsys.readouterr()
    train(tiny_cfg(run, "train.steps=6"))
    out = capsys.readouterr().out
    assert f"warning: skipped {step_file(run, 4)}: cannot read checkpoint" in out
    assert f"resumed from {step_file(run, 2)} at step 2" in out
    states_equal(load_checkpoint(step_file(tmp_path / "one", 6)), load_checkpoint(ckpts(run) / "latest.pt"))


def test_pruning_never_keeps_an_unreadable_checkpoint_over_a_readable_one(tmp_path, capsys):
    train(tiny_cfg(tmp_path, "train.steps=4"))
    step_file(tmp_path, 8).write_bytes(b"PK\x03\x04 torn")  # an unreadable checkpoint of a later step
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.steps=6", "checkpoint.keep=2"))
    out = capsys.readouterr().out
    assert f"warning: skipped {step_file(tmp_path, 8)}" in out and f"deleted {step_file(tmp_path, 8)}" in out
    assert sorted(p.name for p in ckpts(tmp_path).glob("step_*.pt")) == ["step_000000004.pt", "step_000000006.pt"]


def test_unreadable_older_checkpoint_is_named_then_pruned(tmp_path, capsys):
    train(tiny_cfg(tmp_path, "train.steps=4"))
    truncate(step_file(tmp_path, 2))
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.steps=6"))
    out = capsys.readouterr().out
    assert f"warning: older checkpoint {step_file(tmp_path, 2)} cannot be read" in out
    assert f"warning: deleted {step_file(tmp_path, 2)}, which cannot be read" in out
    assert sorted(p.name for p in ckpts(tmp_path).glob("step_*.pt")) == ["step_000000004.pt", "step_000000006.pt"]


def test_stale_temporaries_are_removed_at_start_and_said(tmp_path, capsys):
    """Defect 5: every kill during a save leaves a temporary; the next start of the run cleans them."""
    train(tiny_cfg(tmp_path, "train.steps=2"))
    stale = [
        ckpts(tmp_path) / ".step_000000004.pt.tmp",
        ckpts(tmp_path) / ".latest.77.tmp",
        tmp_path / ".ema.safetensors.7.1f2e.tmp",
    ]  # names of this version and of earlier ones
    for p in stale:
        p.write_bytes(step_file(tmp_path, 2).read_bytes())
    elsewhere = tmp_path / "previews"
    elsewhere.mkdir()
    (elsewhere / ".mine.tmp").write_text("not a save of this run")
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.steps=4"))
    assert "removed 3 temporary file(s) left by interrupted saves" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and (elsewhere / ".mine.tmp").exists()


class FullDisk:
    """Makes the n-th write of one kind fail with ENOSPC, where a real full disk would report it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: str, nth: int = 2):
        self.count, self.nth = 0, nth
        if target == "checkpoint":  # inside torch's native writer, which turns it into a RuntimeError
            real_save = torch.save
            monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, self.wrap(f), **kw))
        elif target == "export":  # at fsync, where a filesystem that delays allocation reports it
            real_fsync = os.fsync
            monkeypatch.setattr(
                os, "fsync", lambda fd: self.check(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
            )
        else:  # the metrics append: half the line goes out first
            real_open = Path.open
            monkeypatch.setattr(
                Path,
                "open",
                lambda p, mode="r", *a, **k: (
                    self.wrap(real_open(p, mode, *a, **k))
                    if p.name == "metrics.jsonl" and mode == "a"
                    else real_open(p, mode, *a, **k)
                ),
            )

    def check(self, name: str) -> None:
        if "ema.safetensors" in name:
            self.count += 1
            if self.count == self.nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def wrap(self, f):
        outer = self
        outer.count += 1
        if outer.count != outer.nth:
            return f

        class Full:
            def write(self, data):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Full()


@pytest.mark.parametrize(
    "target,file,last_step",
    [
        ("checkpoint", "checkpoints/step_000000004.pt", 2),
        ("export", "ema.safetensors", 4),
        ("metrics", "metrics.jsonl", 2),
    ],
)
def test_full_disk_is_one_line_naming_file_and_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, target, file, last_step
):
    """Defect 5: a full disk while writing a checkpoint, the export or the metrics ends in one clear line;
    after room is made, the same command resumes to the end."""
    cmd = [QUICKSTART, *TINY, f"run_dir={tmp_path}", "train.steps=4"]
    with monkeypatch.context() as patch:
        FullDisk(patch, target)
        code = launch.main(cmd)
    err = capsys.readouterr().err  # the progress bar, then one line
    assert (
        code == 1
        and "Traceback" not in err
        and err.strip().splitlines()[-1]
        == (
            f"minsnr train: error: disk full writing {tmp_path / file} (No space left on device); "
            f"the last good checkpoint {step_file(tmp_path, last_step)} (step {last_step}) is intact"
        )
    ), err
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert launch.main(cmd) == 0
    assert load_checkpoint(ckpts(tmp_path) / "latest.pt")["step"] == 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_interrupted_run_saves_and_exits_with_the_signal_status(tmp_path, capsys, monkeypatch, signum):
    """Issue 13 item 5: a stopped run is not a finished one: exit 128 + signal number, and say how to go on."""
    stop = Hook(1, lambda ctx: signal.raise_signal(signum) if ctx.step == 3 else None)
    monkeypatch.setattr(launch, "build_hooks", lambda cfg: (stop,))
    code = launch.main([QUICKSTART, *TINY, f"run_dir={tmp_path}", "train.steps=10", "checkpoint.every=100"])
    out = capsys.readouterr().out
    assert code == 128 + signum and "stopped at step 3; run the same command to resume" in out
    assert "trained to step" not in out
    assert load_checkpoint(ckpts(tmp_path) / "latest.pt")["step"] == 3


def test_identical_runs_in_different_folders_write_identical_bytes(tmp_path):
    """Where a run lives is no part of its weights: byte-level checks compare runs across folders."""
    for name in ("a", "bb/deeper"):
        train(tiny_cfg(tmp_path / name, "train.steps=2"))
    a, b = tmp_path / "a" / "ema.safetensors", tmp_path / "bb" / "deeper" / "ema.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert load_checkpoint(step_file(tmp_path / "a", 2))["config"]["run_dir"] == ""
    model, cfg = load_model(a)
    reference, _ = load_model(step_file(tmp_path / "bb" / "deeper", 2))
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), reference.state_dict().values()))
    assert cfg.model.name == "vit_tiny"
