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
    return ArrayDataset(rng.integers(0, 256, (n, 4, 6, 3), dtype=np.uint8), rng.integers(0, 3, n), num_classes=3,
                        class_names=["a", "b", "c"], hflip=hflip)


@pytest.mark.parametrize("dataset", [random_dataset(), random_dataset(hflip=False), load_digits()],
                         ids=["rgb_flip", "rgb_noflip", "digits_16_levels"])
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
        for resumed in (DeviceBatches(dataset, 5, seed=1, device=CPU, rank=world - 1, world_size=world),
                        Batches(dataset, 5, seed=1, rank=world - 1, world_size=world)):  # switch to the host path
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
    assert choose_path(None, arrays, cuda, free_bytes=4 * size)[0] is True
    on, why = choose_path(None, arrays, cuda, free_bytes=4 * size - 1)
    assert on is False and "over 25%" in why
    assert choose_path(None, arrays, CPU)[0] is False
    assert choose_path(True, arrays, CPU) == (True, "train.data_on_device=true")
    assert choose_path(False, arrays, cuda, free_bytes=10**12)[0] is False

    class Folder:  # any dataset that is not an ArrayDataset
        pass

    assert choose_path(None, Folder(), cuda, free_bytes=10**12) == (False, "Folder is read by the host loader")
    with pytest.raises(ValueError, match="train.data_on_device=true needs array data"):
        choose_path(True, Folder(), cuda)
