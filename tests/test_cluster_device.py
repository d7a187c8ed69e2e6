"""GPU-side decisions checked on the CPU with CUDA faked: data on the GPU only when it fits the device's share
for every process on it (not its free memory), a failed CUDA-graph capture names the body's error once (not
capture_end's), and a torch.compile recompilation says one line in the run's log."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_speed_paths import random_dataset

import minsnr.step as step_mod
from minsnr.data.device import choose_path

CUDA = torch.device("cuda", 0)
GIB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of `total` bytes with almost nothing free (as when other runs already hold it)."""
    memory = {"total": 80 * GIB, "free": 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], memory["total"]))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=memory["total"])
    )
    monkeypatch.delenv("MINSNR_PROCS_PER_GPU", raising=False)
    return memory


def test_data_fits_the_total_memory_shared_by_the_processes_not_the_free_memory(fake_gpu, monkeypatch):
    arrays = random_dataset()
    size = arrays.images.nbytes + arrays.labels.nbytes
    fake_gpu["total"] = 4 * 4 * size  # 25% of it / 4 processes = the data exactly
    on, why = choose_path(None, arrays, CUDA)
    assert on is True and why.endswith("/ 1 process")  # alone: the free memory (1 byte) is not asked
    monkeypatch.setenv("MINSNR_PROCS_PER_GPU", "4")
    on, why = choose_path(None, arrays, CUDA)
    assert on is True and "fits in 25% of" in why and why.endswith("/ 4 processes (MINSNR_PROCS_PER_GPU)")
    fake_gpu["free"] = fake_gpu["total"]  # all of it free: still one quarter of the share per process
    fake_gpu["total"] -= 1
    on, why = choose_path(None, arrays, CUDA)
    assert on is False and "is over 25% of" in why
    monkeypatch.setenv("MINSNR_PROCS_PER_GPU", "0")
    with pytest.raises(ValueError, match="MINSNR_PROCS_PER_GPU='0' must be a whole number >= 1"):
        choose_path(None, arrays, CUDA)


def test_compare_tells_its_runs_how_many_share_the_gpu(tmp_path, monkeypatch):
    import minsnr.compare.pool as pool

    seen = {}

    class Popen:
        def __init__(self, cmd, stdout, stderr, env):
            seen.update(env)

    monkeypatch.setattr(pool.subprocess, "Popen", Popen)
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    job = pool._launch(None, 0, config, [0], False, 1, 0, 4)
    job.log.close()
    assert seen["MINSNR_PROCS_PER_GPU"] == "4"


class CaptureForbidden(RuntimeError):
    """Error A: what an op that cannot be captured raises inside the capture."""


def test_a_failed_capture_names_the_body_error_once(monkeypatch):
    """torch.cuda.graph faked: the body raises A while capturing, then capture_end (the context's exit) raises B,
    as CUDA does after a broken capture. The fallback says A, once, and the step goes on eagerly."""
    capturing = []

    class FakeGraph:
        def __init__(self, graph, stream=None, capture_error_mode="global"):
            pass

        def __enter__(self):
            capturing.append(True)

        def __exit__(self, *exc):
            capturing.clear()
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # B

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FakeGraph)

    def body(x):
        if capturing:
            raise CaptureForbidden("cannot read the CUDA RNG state while capturing\nsecond line")
        return x * 2

    lines: list[str] = []
    static = step_mod.StaticStep(
        body, lambda: None, capture=True, device=torch.device("cpu"), log=lines.append, warmup=2
    )
    for i in range(6):
        assert torch.equal(static(torch.full((3,), float(i))), torch.full((3,), 2.0 * i))
    assert len(lines) == 1, lines
    assert "CaptureForbidden: cannot read the CUDA RNG state while capturing)" in lines[0]
    assert "previous error during capture" not in lines[0] and "second line" not in lines[0]
    assert static.graph is None and static.capture is False


def test_a_recompilation_says_one_line_in_the_run_log(capfd, monkeypatch):
    import logging

    monkeypatch.delenv("TORCH_LOGS", raising=False)
    lines: list[str] = []
    step_mod.report_recompiles(lines.append)
    try:
        double = torch.compile(lambda x: 2 * x, backend="eager")
        for n in (2, 3, 4):  # the second shape recompiles (dynamic from then on); the third does not
            double(torch.ones(n))
    finally:  # torch's logging as it was, for the tests after this one
        logging.getLogger("torch._dynamo.guards.__recompiles").removeHandler(step_mod.RECOMPILES)
        torch._logging.set_logs()
    recompiles = [line for line in lines if "Recompiling" in line]
    assert len(recompiles) == 1 and len(lines) == 1, lines
    assert "size mismatch at index 0. expected 2, actual 3" in lines[0]
    assert "Recompiling" not in capfd.readouterr().err  # said in the run's log only, not again on stderr
