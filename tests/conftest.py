"""Suite-wide settings: `make test` runs two pytest workers on two cores, so each uses one thread
(OpenMP threads spinning on a busy core make small CPU ops many times slower); subprocesses inherit it."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minsnr.evaluate.classifier import load_labelled, save_classifier, train_classifier  # noqa: E402

torch.set_num_threads(1)


def torchrun(*minsnr_args: str, ranks: int = 2, cwd: object = None, timeout: float = 300):
    """`python -m torch.distributed.run --nproc_per_node RANKS -m minsnr ARGS` on a free local port (so parallel
    test runs do not collide), one OpenMP thread per rank; returns the CompletedProcess."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = cwd or Path(__file__).resolve().parents[1]
    return subprocess.run(
        [*cmd, "-m", "minsnr", *minsnr_args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    """A digits classifier for the races of the compare tests (fid_cls), trained for one epoch: trained for one epoch:
    enough to score, cheap to make."""
    x, y, _, _ = load_labelled("digits")
    stem = tmp_path_factory.mktemp("clf") / "digits"
    save_classifier(
        train_classifier(x, y, epochs=1),
        stem,
        {"image_shape": [8, 8, 1], "num_classes": 10, "width": 16, "feature_dim": 128},
    )
    return str(stem)
