"""Suite-wide settings: `make test` runs two pytest workers on two cores, so each uses one thread
(OpenMP threads spinning on a busy core make small CPU ops many times slower); subprocesses inherit it."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
