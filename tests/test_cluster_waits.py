"""Rank 0's hooks under torchrun: while rank 0 alone previews or evaluates, the other ranks wait without a
timeout (minsnr.distributed.wait_for_rank0), so a hook longer than the process group's timeout
(train.dist_timeout_min) no longer kills the job; and that timeout is a validated setting."""

import datetime
import socket
import subprocess
import sys

import pytest
from test_train import ROOT, TINY

from minsnr.config import ConfigError, load_config

TIMEOUT_MIN = 0.1  # 6 s: each collective fails when a rank waits in it longer than this
SLEEP_S = 10.0  # the hook on rank 0, longer than TIMEOUT_MIN

# `minsnr train` with one extra hook, which sleeps on rank 0 at the last step (conftest's `torchrun` helper runs
# `-m minsnr` only, so the test launches this script instead)
RUNNER = """
import sys, time
import minsnr.launch as launch
from minsnr.train import Hook

def slow(ctx):
    time.sleep({sleep})
    return {{"slow_hook": 1.0}}

launch.build_hooks = lambda cfg: (Hook(cfg.train.steps, slow),)
sys.exit(launch.main(sys.argv[1:]))
"""


def torchrun_script(script, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
    return subprocess.run([*cmd, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_a_hook_longer_than_the_timeout_finishes_on_both_ranks(tmp_path):
    script = tmp_path / "slow_hook_train.py"
    script.write_text(RUNNER.format(sleep=SLEEP_S))
    run_dir = tmp_path / "run"
    res = torchrun_script(
        script,
        str(ROOT / "configs" / "quickstart.yaml"),
        *TINY,
        "train.steps=2",
        "data.num_workers=0",
        "train.batch_size=8",
        f"train.dist_timeout_min={TIMEOUT_MIN}",
        f"run_dir={run_dir}",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert '"slow_hook": 1.0' in (run_dir / "metrics.jsonl").read_text()


def test_the_timeout_reaches_the_process_group(monkeypatch):
    import minsnr.distributed as distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    assert distributed.setup("cpu", timeout_min=0.5).rank == 1
    assert seen == {"timeout": datetime.timedelta(seconds=30)}


@pytest.mark.parametrize("value", ["0", "-1"])
def test_dist_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=f"train.dist_timeout_min={float(value)!r} must be > 0"):
        load_config(ROOT / "configs" / "quickstart.yaml", [f"train.dist_timeout_min={value}"])
