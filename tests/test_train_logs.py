"""Progress for files: in a file (Slurm, nohup, CI) `minsnr train` writes plain lines, never tqdm's carriage
returns; on a terminal it keeps the bar."""

import re
import subprocess
import sys

import pytest
from test_train import ROOT, TINY, tiny_cfg

import minsnr.train as train_mod
from minsnr.train import train

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+)%\)  loss \d+\.\d{4}  [\d,]+ img/s  ETA (\S+)$")


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


class BarSpy:
    """Records the arguments of every tqdm bar the loop makes, and makes it."""

    def __init__(self, monkeypatch):
        self.made: list[dict] = []
        real = train_mod.tqdm

        def make(*args, **kwargs):
            self.made.append(kwargs)
            return real(*args, **kwargs)

        make.write = real.write  # type: ignore[attr-defined]
        make.format_interval = real.format_interval  # type: ignore[attr-defined]
        monkeypatch.setattr(train_mod, "tqdm", make)


@pytest.mark.parametrize("every_s,steps", [(0.0, [2, 4, 6]), (1e9, [2, 6])], ids=["every_read", "rate_limited"])
def test_a_file_gets_plain_lines(tmp_path, capfd, monkeypatch, every_s, steps):
    """Not a terminal: a line at each metrics read (log.every=2), at most one per PLAIN_EVERY_S, the last always."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(train_mod, "PLAIN_EVERY_S", every_s, raising=False)
    spy = BarSpy(monkeypatch)
    train(tiny_cfg(tmp_path, "train.steps=6"))
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    found = progress_lines(out)
    assert [int(m[1]) for m in found] == steps, out
    assert all(int(m[2]) == 6 and int(m[3]) == 100 * int(m[1]) // 6 for m in found)
    assert found[-1][4] == "00:00"  # nothing left at the last step
    assert [bar["disable"] for bar in spy.made] == [True]


def test_a_terminal_keeps_the_bar(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(train_mod, "PLAIN_EVERY_S", 0.0, raising=False)
    spy = BarSpy(monkeypatch)
    train(tiny_cfg(tmp_path, "train.steps=4"))
    out, err = capfd.readouterr()
    assert [bar["disable"] for bar in spy.made] == [False]
    assert progress_lines(out) == []
    assert "4/4" in err  # tqdm drew it


def test_minsnr_train_into_a_file(tmp_path):
    """The command as a batch job runs it: stdout and stderr both a file."""
    log = tmp_path / "job.log"
    cmd = [sys.executable, "-m", "minsnr", "train", "quickstart", *TINY, f"run_dir={tmp_path / 'run'}"]
    cmd += ["train.steps=4", "train.device=cpu", "log.tensorboard=false", "log.preview_every=0"]
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "\r" not in text
    assert [int(m[1]) for m in progress_lines(text)] == [2, 4], text  # the first read, then the last step
