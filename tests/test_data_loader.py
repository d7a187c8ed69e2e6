"""Batches: deterministic order and flips, disjoint DDP shards, exact resume, unreadable files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minsnr.data import ArrayDataset, BadImagesError, Batches, FolderDataset


def index_dataset(n: int, hflip: bool = True) -> ArrayDataset:
    """Image i is one row [i % 256, i // 256, 255]; a flip moves the 255 to the front."""
    rows = np.stack([np.arange(n) % 256, np.arange(n) // 256, np.full(n, 255)], 1).astype(np.uint8)
    return ArrayDataset(
        rows[:, None, :, None], np.arange(n) % 7, num_classes=7, class_names=[str(i) for i in range(7)], hflip=hflip
    )


def decode(x: torch.Tensor) -> list[tuple[int, bool]]:
    """(index, flipped) for each image of a batch from `index_dataset`."""
    v = ((x[:, 0, 0] + 1) * 127.5).round().long()
    flipped = v[:, 0] == 255
    v = torch.where(flipped[:, None], v.flip(-1), v)
    return [(int(a + 256 * b), bool(f)) for a, b, f in zip(v[:, 0], v[:, 1], flipped)]


def run(batches: Batches, steps: int) -> list[list[tuple[int, bool]]]:
    out = []
    for _ in range(steps):
        x, y = next(batches)
        items = decode(x)
        assert y.tolist() == [i % 7 for i, _ in items]
        out.append(items)
    return out


def test_each_epoch_is_a_seeded_permutation_with_random_flips() -> None:
    ds = index_dataset(100)
    b = Batches(ds, 32, seed=3, drop_last=False)
    assert len(b) == 4
    epochs = run(b, 8)
    first = [i for batch in epochs[:4] for i, _ in batch]
    second = [i for batch in epochs[4:] for i, _ in batch]
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    assert [len(batch) for batch in epochs[:4]] == [32, 32, 32, 4] and b.epoch == 2
    flips = [f for batch in epochs for _, f in batch]
    assert 70 < sum(flips) < 130  # Binomial(200, 1/2)
    assert run(Batches(ds, 32, seed=3, drop_last=False), 8) == epochs
    assert run(Batches(ds, 32, seed=4, drop_last=False), 4) != epochs[:4]
    assert not any(f for batch in run(Batches(index_dataset(100, hflip=False), 32, seed=3), 3) for _, f in batch)


def test_ddp_shards_are_disjoint_equal_and_agree_with_one_rank() -> None:
    ds, world = index_dataset(103), 4
    shards = [run(Batches(ds, 5, seed=0, rank=r, world_size=world), 5) for r in range(world)]  # one epoch each
    seen = [item for shard in shards for batch in shard for item in batch]
    assert all(len(batch) == 5 for shard in shards for batch in shard)
    assert len(seen) == 100 and len({i for i, _ in seen}) == 100  # equal shares, no index twice
    single = {i: f for batch in run(Batches(ds, 103, seed=0), 1) for i, f in batch}
    assert all(single[i] == f for i, f in seen)  # an image's flip depends on (seed, epoch, index) only
    assert run(Batches(ds, 5, seed=0, rank=2, world_size=world), 5) == shards[2]


def test_global_batch_is_the_same_for_any_number_of_ranks() -> None:
    """Rank r takes positions r, r + W, ... of the epoch order: interleaving the W ranks' batches of B
    gives the one-rank batch of W * B, item for item (what the training loop relies on)."""
    ds, world = index_dataset(103), 3
    ranks = [run(Batches(ds, 4, seed=5, rank=r, world_size=world), 17) for r in range(world)]
    single = run(Batches(ds, 4 * world, seed=5), 17)  # 103 // 12 = 8 batches per epoch: crosses epochs
    for step in range(17):
        interleaved = [ranks[r][step][j] for j in range(4) for r in range(world)]
        assert interleaved == single[step]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(workers: int, tmp_path: Path) -> None:
    ds = index_dataset(50)
    reference = run(Batches(ds, 8, seed=7), 20)  # 6 batches per epoch
    first = Batches(ds, 8, seed=7, num_workers=workers)
    assert run(first, 9) == reference[:9]
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 3}  # consumed batches, whatever the workers prefetched
    torch.save({"data": state}, tmp_path / "ckpt.pt")
    resumed = Batches(ds, 8, seed=7, num_workers=workers)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"])
    assert resumed.epoch == 1 and run(resumed, 11) == reference[9:]
    first.load_state_dict({"epoch": 0, "batch": 5})  # rewinding a live iterator restarts its workers
    assert run(first, 2) == reference[5:7]
    with pytest.raises(ValueError, match="outside this epoch's 6 batches"):
        resumed.load_state_dict({"epoch": 0, "batch": 6})


def test_batches_rejects_bad_arguments() -> None:
    ds = index_dataset(10)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        Batches(ds, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full batch of 8"):
        Batches(ds, 8, seed=0, world_size=2)


def folder_with_bad_files(root: Path) -> tuple[Path, Path]:
    """20 PNGs of value 10 * i; 05.png is not an image, 12.jpg a truncated JPEG."""
    root.mkdir()
    for i in range(20):
        Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(root / f"{i:02d}.png")
    (root / "05.png").write_bytes(b"not an image at all")
    (root / "12.png").unlink()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "12.jpg")
    data = (root / "12.jpg").read_bytes()
    (root / "12.jpg").write_bytes(data[: len(data) // 2])
    return root / "05.png", root / "12.jpg"


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_images_are_replaced_counted_and_reported(
    tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    junk, truncated = folder_with_bad_files(tmp_path / "imgs")
    ds = FolderDataset(tmp_path / "imgs", hflip=False, max_bad_fraction=0.2)
    b = Batches(ds, 5, seed=0, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="minsnr.data"):
        values = [int(v) for _ in range(4) for v in ((next(b)[0][:, 0, 0, 0] + 1) * 127.5).round()]
    assert set(b.bad_files) == {str(junk), str(truncated)} and all(b.bad_files.values())
    text = caplog.text
    assert "05.png" in text and "12.jpg" in text and "epoch 0: skipped 2 unreadable images of 20" in text
    good = [10 * i for i in range(20) if i not in (5, 12)]
    assert sorted(values) == sorted(good + [60, 130])  # each bad file replaced by the next index
    assert b.epoch_bad == set() and b.epoch == 1


def test_too_many_unreadable_images_stop_with_a_message(tmp_path: Path) -> None:
    folder_with_bad_files(tmp_path / "imgs")
    b = Batches(FolderDataset(tmp_path / "imgs", max_bad_fraction=0.05), 5, seed=0)
    with pytest.raises(BadImagesError, match=r"2 unreadable images out of 20 .*max_bad_fraction=0.05.*05.png"):
        for _ in range(4):
            next(b)
