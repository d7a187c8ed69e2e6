"""The GPU speed paths, checked on the CPU: device-resident batches, the static step (the CUDA graph's
eager twin), the thread count and the path choices (issue 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minsnr.data import ArrayDataset, Batches, load_digits
from minsnr.data.device import DeviceBatches, choose_path
from minsnr.data.loader import Sharding

CPU = torch.device("cpu")


def random_dataset(n: int = 53, hflip: bool = True) -> ArrayDataset:
    rng = np.random.default_rng(5)
    return ArrayDataset(
        rng.integers(0, 256, (n, 4, 6, 3), dtype=np.uint8),
        rng.integers(0, 3, n),
        num_classes=3,
        class_names=["a", "b", "c"],
        hflip=hflip,
    )


@pytest.mark.parametrize(
    "dataset",
    [random_dataset(), random_dataset(hflip=False), load_digits()],
    ids=["rgb_flip", "rgb_noflip", "digits_16_levels"],
)
@pytest.mark.parametrize("world", [1, 2])
def test_device_batches_equal_the_host_loader_for_three_epochs(dataset, world):
    batch = 8 if len(dataset) < 100 else 128
    for rank in range(world):
        host = Batches(dataset, batch, seed=7, rank=rank, world_size=world)
        dev = DeviceBatches(dataset, batch, seed=7, device=CPU, rank=rank, world_size=world)
        assert len(dev) == len(host)
        for _ in range(3 * len(host)):
            (xh, yh), (xd, yd) = next(host), next(dev)
            assert torch.equal(xh, xd) and torch.equal(yh, yd) and xd.dtype == torch.float32
            assert dev.state_dict() == host.state_dict()
        assert dev.epoch == host.epoch == 3
    index, aug = dev.sharding.order(3)
    plain, _, _ = dataset.get_batch(index[:batch].tolist())  # un-augmented: no flips
    x, _ = next(dev)
    assert torch.equal(x, plain) != (dataset.hflip and bool((aug[:batch] & 1).any()))


@pytest.mark.parametrize("world", [1, 2])
def test_device_batches_resume_and_switch_paths(world):
    dataset = random_dataset(61)
    ref = DeviceBatches(dataset, 5, seed=1, device=CPU, rank=world - 1, world_size=world)
    want = [next(ref) for _ in range(20)]  # crosses two epoch boundaries
    for cut in (3, 6, 12):
        first = DeviceBatches(dataset, 5, seed=1, device=CPU, rank=world - 1, world_size=world)
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        for resumed in (
            DeviceBatches(dataset, 5, seed=1, device=CPU, rank=world - 1, world_size=world),
            Batches(dataset, 5, seed=1, rank=world - 1, world_size=world),
        ):  # switch to the host path
            resumed.load_state_dict(state)
            for x, y in want[cut:]:
                xr, yr = next(resumed)
                assert torch.equal(x, xr) and torch.equal(y, yr)


def test_device_batches_reject_a_foreign_state():
    dev = DeviceBatches(random_dataset(40), 8, seed=0, device=CPU)
    with pytest.raises(ValueError, match="batch=9 is outside this epoch's 5 batches"):
        dev.load_state_dict({"epoch": 0, "batch": 9})


def test_device_batches_upload_the_order_once_per_epoch(monkeypatch):
    calls, real = [], Sharding.order
    monkeypatch.setattr(Sharding, "order", lambda self, epoch: calls.append(epoch) or real(self, epoch))
    dev = DeviceBatches(random_dataset(40), 8, seed=0, device=CPU)
    for _ in range(2 * len(dev) + 1):
        next(dev)
    assert calls == [0, 1, 2]


def test_choose_path():
    arrays, cuda = random_dataset(), torch.device("cuda")
    size = arrays.images.nbytes + arrays.labels.nbytes
    assert choose_path(None, arrays, cuda, total_bytes=4 * size)[0] is True
    on, why = choose_path(None, arrays, cuda, total_bytes=4 * size - 1)
    assert on is False and "over 25%" in why
    assert choose_path(None, arrays, CPU)[0] is False
    assert choose_path(True, arrays, CPU) == (True, "train.data_on_device=true")
    assert choose_path(False, arrays, cuda, total_bytes=10**12)[0] is False

    class Folder:  # any dataset that is not an ArrayDataset
        pass

    assert choose_path(None, Folder(), cuda, total_bytes=10**12) == (False, "Folder is read by the host loader")
    with pytest.raises(ValueError, match="train.data_on_device=true needs array data"):
        choose_path(True, Folder(), cuda)


# ---- the static step: the CUDA graph's eager twin ----------------------------------------------------


def trainer(tmp_path, *extra, general=False):
    from test_train import tiny_cfg

    from minsnr.train import Trainer

    t = Trainer(tiny_cfg(tmp_path, "train.steps=20", *extra))
    if general:
        t.static = None  # the general step (grad accumulation, DDP) on the same run
    return t


def assert_same_state(a, b) -> None:
    for name, (pa, pb) in enumerate(
        zip([*a.model.parameters(), *a.ema.parameters()], [*b.model.parameters(), *b.ema.parameters()])
    ):
        assert torch.equal(pa, pb), f"parameter {name} differs"
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), f"optimizer {i}.{k} differs"
    for buf in ("mse", "count", "loss"):
        assert torch.equal(getattr(a.stats, buf), getattr(b.stats, buf)), buf
    assert torch.equal(a.grad_norm, b.grad_norm) and a.step == b.step and int(a.done) == a.step
    assert a.batches.state_dict() == b.batches.state_dict()


@pytest.mark.parametrize(
    "extra",
    [[], ["model.num_classes=0", "loss.label_dropout=0", "optim.grad_clip=0"]],
    ids=["conditional_clip", "unconditional_noclip"],
)
def test_static_step_is_bit_identical_to_the_general_step(tmp_path, extra):
    """Through lr warm-up (2 steps), EMA warm-up (every step), label dropout, clipping; and with the data
    on the device in the static run."""
    static = trainer(tmp_path / "a", "train.data_on_device=true", *extra)
    general = trainer(tmp_path / "b", "train.data_on_device=false", *extra, general=True)
    assert static.static is not None and type(static.batches).__name__ == "DeviceBatches"
    lrs = []
    for _ in range(5):
        lrs.append(static._lr())
        static.train_step()
        general.train_step()
        assert_same_state(static, general)
    assert len(set(lrs)) == 2  # the warm-up really changed the learning rate
    assert not torch.equal(general.model.head.weight, torch.zeros_like(general.model.head.weight))


def test_static_step_keeps_every_tensor_in_place(tmp_path):
    """The contract a CUDA graph needs: the same storage for inputs, weights, optimizer and EMA state,
    statistics, flags and per-step scalars at every step; gradients left unset for the capture."""
    t = trainer(tmp_path)
    t.train_step()

    def tensors():
        opt = [v for s in t.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [
            *t.static.buffers[:1],
            *t.static.buffers[2:],
            *t.model.parameters(),
            *t.ema.parameters(),
            *opt,
            t.stats.mse,
            t.stats.count,
            t.stats.loss,
            t.first_bad,
            t.done,
            t.ema_weight,
        ]

    before = [(x.data_ptr(), x.shape, x.dtype) for x in tensors()]
    for _ in range(3):
        t.train_step()
        assert all(p.grad is None for p in t.model.parameters())
    assert [(x.data_ptr(), x.shape, x.dtype) for x in tensors()] == before
    assert int(t.done) == 4 and int(t.stats.loss[1]) == 4
    # a replayed graph cannot see host values: the body must not read the host step counter
    inputs = t._micro_batch(0)
    t.step = None
    t.static(*inputs)
    assert int(t.done) == 5


def test_failed_capture_falls_back_to_the_eager_step_and_says_so(tmp_path, capsys):
    failing = trainer(tmp_path / "a")
    failing.static.capture = True  # on this CPU-only machine the capture raises after the warm-up steps
    general = trainer(tmp_path / "b", general=True)
    for _ in range(5):
        failing.train_step()
        general.train_step()
    assert_same_state(failing, general)
    lines = [line for line in capsys.readouterr().out.splitlines() if "capture failed" in line]
    assert len(lines) == 1 and "running the static step eagerly" in lines[0], lines
    assert failing.static.calls == 5 and failing.static.graph is None and not failing.static.capture


def test_resume_across_step_and_data_paths_is_bit_exact(tmp_path):
    """3 general steps with the host loader, then 3 static steps with device data == 6 static steps."""
    from test_train import states_equal, tiny_cfg

    from minsnr.checkpoint import load_checkpoint
    from minsnr.train import Trainer, train

    train(tiny_cfg(tmp_path / "one", "train.steps=6", "checkpoint.every=3"))
    first = Trainer(tiny_cfg(tmp_path / "two", "train.steps=3", "checkpoint.every=3", "train.data_on_device=false"))
    first.static = None
    first.run()
    train(tiny_cfg(tmp_path / "two", "train.steps=6", "checkpoint.every=3", "train.data_on_device=true"))
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")
    states_equal(a, b)
    assert a["step"] == 6 and isinstance(a["optimizer"]["param_groups"][0]["lr"], float)


def test_nan_is_named_by_its_step_on_the_static_path(tmp_path, monkeypatch):
    from minsnr.loss import TrainingLoss

    t = trainer(tmp_path)
    real, calls = TrainingLoss.__call__, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 5):  # the first bad step is named, not the last
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)
    for _ in range(6):
        t.train_step()
    assert int(t.first_bad) == 3


# ---- choices and settings ------------------------------------------------------------------------------


def test_default_threads():
    from minsnr.step import default_threads

    assert [default_threads("cuda", c) for c in (1, 2, 7, 8, 16, 64, 256)] == [1, 1, 1, 2, 4, 4, 4]
    assert default_threads("cpu", 16) is None


def test_configure_threads_logs_the_choice(monkeypatch):
    import minsnr.step as step

    before = torch.get_num_threads()
    monkeypatch.setattr(step, "available_cores", lambda: 16)
    try:
        assert step.configure_threads(0, "cuda") == "4 CPU threads (auto on cuda: min(4, 16 cores // 4))"
        assert torch.get_num_threads() == 4
        assert step.configure_threads(3, "cuda") == "3 CPU threads (train.threads)"
        assert step.configure_threads(0, "cpu") == "3 CPU threads (torch's default)"  # left as it was
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "args,want",
    [
        (("cuda", 1, 1, True, True, "default"), (True, True, "the whole step as one CUDA graph after 3 eager steps")),
        (("cuda", 1, 1, True, True, "max-autotune-no-cudagraphs"), (True, True, None)),
        (("cuda", 2, 1, True, False, "default"), (False, False, "2 DDP ranks")),
        (("cuda", 1, 4, True, False, "default"), (False, False, "train.grad_accum=4")),
        (("cpu", 1, 1, True, False, "default"), (True, False, "CUDA graphs need a CUDA device")),
        (("cuda", 1, 1, False, False, "default"), (True, False, "train.cuda_graph=false")),
        (("cuda", 1, 1, True, True, "reduce-overhead"), (True, False, "the model's own CUDA graphs")),
    ],
)
def test_plan_step(args, want):
    from minsnr.step import plan_step

    static, capture, why = plan_step(*args)
    assert (static, capture) == want[:2] and (want[2] is None or want[2] in why)


def test_checkpoints_keep_a_plain_learning_rate_and_loading_keeps_the_run_settings():
    from minsnr.step import keep_run_settings, set_lr

    p = torch.nn.Parameter(torch.ones(3))
    tensor_lr = torch.optim.AdamW([p], lr=torch.tensor(0.1), foreach=False)  # as the fused CUDA optimizer
    keep_run_settings(tensor_lr)
    lr = tensor_lr.param_groups[0]["lr"]
    set_lr(tensor_lr, 0.25)
    assert tensor_lr.param_groups[0]["lr"] is lr and float(lr) == 0.25  # filled in place
    p.grad = torch.ones(3)
    tensor_lr.step()
    saved = tensor_lr.state_dict()
    assert saved["param_groups"][0]["lr"] == 0.25 and isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor)

    q = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.AdamW([q], lr=1.0, foreach=True)  # as the CPU optimizer
    keep_run_settings(plain)
    plain.load_state_dict(saved)
    group = plain.param_groups[0]
    assert group["lr"] == 0.25 and group["foreach"] is True and group["fused"] is None
    assert plain.state[q]["step"].device.type == "cpu" and float(plain.state[q]["step"]) == 1
    tensor_lr.load_state_dict(plain.state_dict())
    assert isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor) and tensor_lr.param_groups[0]["foreach"] is False


def test_attention_backends_on_the_cpu(tmp_path):
    from minsnr.config import ConfigError
    from minsnr.step import attention

    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for backend in ("flash", "math"):
        with attention(backend):
            torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v), ref)
    with pytest.raises(ConfigError, match="train.attention=cudnn needs a CUDA device"):
        trainer(tmp_path, "train.attention=cudnn")


def test_speed_settings_are_validated(tmp_path):
    from test_train import tiny_cfg

    from minsnr.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile_mode='fast' is not valid.*max-autotune-no-cudagraphs"):
        tiny_cfg(tmp_path, "train.compile_mode=fast")
    with pytest.raises(ConfigError, match="train.data_on_device"):
        tiny_cfg(tmp_path, "train.data_on_device=maybe")


def test_train_speed_benchmark_smoke(tmp_path):
    """benchmarks/train_speed.py --smoke on the CPU: an npz workload alone and two at once, a latent one."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "speed.json"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_speed.py",
            "--smoke",
            "--workloads",
            "cifar,vit_xl",
            "--seconds",
            "0.5",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads(out.read_text())
    assert [(r["workload"], r["procs"], r["ok"]) for r in table["results"]] == [
        ("cifar", 1, 1),
        ("cifar", 2, 2),
        ("vit_xl", 1, 1),
    ]
    for row in table["results"]:
        assert (
            row["steps_per_s_total"] > 0
            and row["tflops"] > 0
            and 0 < row["mfu"]
            and row["speed_log"].startswith("speed: ")
        )
        assert all(run["steps"] >= 1 and run["batch"] in (16, 32) for run in row["runs"])
    assert table["results"][0]["data"] == "Batches" and table["peak_tflops"] > 0
    assert "cifar" in res.stdout and "MFU" in res.stdout
