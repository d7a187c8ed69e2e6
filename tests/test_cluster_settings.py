"""Cluster settings on the CPU, with CUDA faked: each rank's RNG streams survive a resume on any number of
ranks and GPUs (said in one line where they cannot), and settings a machine or the step can never honour are
refused at config time with the keys named."""

from pathlib import Path

import pytest
import torch
from test_train import ROOT, tiny_cfg

import minsnr.state as state_mod
from minsnr.config import ConfigError, load_config, packaged_configs
from minsnr.run import build_run
from minsnr.state import TrainState

SEED = 0  # tiny_cfg's train.seed (the quickstart's)


def seeded(seed: int) -> torch.Tensor:
    """What the fake device generator holds after manual_seed_all(seed)."""
    return torch.tensor([seed, -1])


class FakeCuda:
    """`count` CUDA devices with one generator state each, behind the torch.cuda calls the code makes; an index
    past `count` raises IndexError, as torch.cuda.default_generators[idx] does."""

    def __init__(self, monkeypatch, count: int):
        self.count = count
        self.states = {i: torch.tensor([1000 + i, 0]) for i in range(count)}
        for name, fn in {
            "is_available": lambda: True,
            "device_count": lambda: self.count,
            "get_rng_state": self.get,
            "set_rng_state": self.set,
            "get_rng_state_all": lambda: [self.get(i) for i in range(self.count)],
            "set_rng_state_all": lambda states: [self.set(s, i) for i, s in enumerate(states)],
            "manual_seed_all": self.seed_all,
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def _index(self, device) -> int:
        idx = device if isinstance(device, int) else torch.device(device).index or 0
        if idx >= self.count:
            raise IndexError("tuple index out of range")
        return idx

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def seed_all(self, seed: int) -> None:
        for i in range(self.count):
            self.states[i] = seeded(seed)


@pytest.fixture(autouse=True)
def keep_global_rng():
    """These tests set torch's global stream on purpose; the tests after them get it back."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_run(tiny_cfg(tmp_path_factory.mktemp("run")))


def train_state(parts, rank: int = 0, world: int = 1, device: torch.device | None = None) -> TrainState:
    p = parts
    where = {} if device is None else {"device": device}
    return TrainState(p.cfg, p.model, p.ema, p.opt, p.loss, p.batches, p.dataset.class_names, rank, world, **where)


def cpu_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def two_gpu_checkpoint(parts, monkeypatch) -> tuple[dict, list[dict]]:
    """A checkpoint saved by rank 0 of 2 DDP ranks on 2 (fake) GPUs, and what each rank held."""
    cuda = FakeCuda(monkeypatch, 2)
    held = [{"torch": cpu_state(10 + r), "cuda": torch.tensor([500 + r, 3])} for r in range(2)]
    own = []
    for rank in range(2):  # each rank takes its own snapshot; the gather collects them by rank
        torch.default_generator.set_state(held[rank]["torch"])
        cuda.set(held[rank]["cuda"], rank)
        own.append(state_mod.ck.rank_rng_state(torch.device("cuda", rank)))

    def gather(out: list, obj: dict) -> None:
        assert all(torch.equal(obj[k], own[0][k]) for k in ("torch", "cuda"))  # rank 0 gives its own
        out[:] = own

    monkeypatch.setattr(state_mod.dist, "all_gather_object", gather)
    torch.default_generator.set_state(held[0]["torch"])
    state = train_state(parts, 0, 2, torch.device("cuda", 0)).state_dict()
    return state, held


def resume(parts, state: dict, world: int) -> tuple[list[str], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every rank of `world` loads `state` on its own GPU: (the lines said, each rank's CPU and GPU state after)."""
    said: list[str] = []
    restored = []
    for rank in range(world):
        device = torch.device("cuda", rank)
        train_state(parts, rank, world, device).load_state_dict(state, Path("ck.pt"), said.append)
        restored.append((torch.get_rng_state(), torch.cuda.get_rng_state(device)))
    return said, restored


def test_the_checkpoint_holds_each_ranks_own_streams(parts, monkeypatch):
    state, held = two_gpu_checkpoint(parts, monkeypatch)
    assert len(state["rng_ranks"]) == 2
    for rank in range(2):
        assert torch.equal(state["rng_ranks"][rank]["torch"], held[rank]["torch"])
        assert torch.equal(state["rng_ranks"][rank]["cuda"], held[rank]["cuda"])


@pytest.mark.parametrize("gpus", [2, 1, 4])
def test_each_rank_gets_its_own_streams_back_on_any_number_of_gpus(parts, monkeypatch, gpus):
    state, held = two_gpu_checkpoint(parts, monkeypatch)
    FakeCuda(monkeypatch, gpus)  # the machine resumed on, fresh generators
    said, restored = resume(parts, state, gpus)  # no IndexError on fewer GPUs
    for rank in range(min(gpus, 2)):  # the streams that map: exactly each rank's own
        assert torch.equal(restored[rank][0], held[rank]["torch"]), rank
        assert torch.equal(restored[rank][1], held[rank]["cuda"]), rank
    for rank in range(2, gpus):  # no saved stream: re-seeded from the seed and the rank, not rank 0's
        assert torch.equal(restored[rank][0], cpu_state(SEED + rank)), rank
        assert torch.equal(restored[rank][1], seeded(SEED + rank)), rank
    if gpus == 2:
        assert said == []
        return
    assert len(said) == 1 and "\n" not in said[0], said
    assert "written by 2 rank(s) and resumes on" in said[0]
    if gpus == 1:
        assert "rank(s) 1 end here" in said[0]
    else:
        assert "rank(s) 2, 3 cannot be continued and are re-seeded from train.seed + rank" in said[0]


def test_one_process_saved_on_a_2_gpu_machine_resumes_on_a_1_gpu_machine(parts, monkeypatch, capsys):
    """The issue's IndexError, through the calls a training run makes (the rank's device is its model's)."""
    monkeypatch.setattr(TrainState, "_device", lambda self: torch.device("cuda", 0), raising=False)
    saved = FakeCuda(monkeypatch, 2)
    saved.set(torch.tensor([321, 9]), 0)
    state = train_state(parts).state_dict()
    FakeCuda(monkeypatch, 1)
    train_state(parts).load_state_dict(state, Path("ck.pt"))
    assert torch.equal(torch.cuda.get_rng_state(torch.device("cuda", 0)), torch.tensor([321, 9]))
    assert "note" not in capsys.readouterr().out  # the one rank, on its one device: continued exactly


def legacy_checkpoint(parts, devices: int) -> dict:
    """A checkpoint as written before CUDA streams were kept per rank (2 DDP ranks): each rank's CPU stream,
    and rank 0's states of every device it saw."""
    state = train_state(parts).state_dict()
    state["rng"]["cuda"] = [torch.tensor([700 + i, 5]) for i in range(devices)]
    state["rng_ranks"] = [cpu_state(10), cpu_state(11)]
    return state


def test_an_older_checkpoint_from_more_gpus_resumes_on_one(parts, monkeypatch):
    state = legacy_checkpoint(parts, devices=2)
    FakeCuda(monkeypatch, 1)
    said: list[str] = []
    train_state(parts, 0, 1, torch.device("cuda", 0)).load_state_dict(state, Path("ck.pt"), said.append)
    assert torch.equal(torch.cuda.get_rng_state(torch.device("cuda", 0)), torch.tensor([700, 5]))  # rank 0's own
    assert torch.equal(torch.get_rng_state(), cpu_state(10))
    assert len(said) == 1 and "rank(s) 1 end here" in said[0]


def test_an_older_checkpoint_on_the_same_gpus_reseeds_the_ranks_it_has_no_cuda_stream_for(parts, monkeypatch):
    state = legacy_checkpoint(parts, devices=2)
    FakeCuda(monkeypatch, 2)
    said, restored = resume(parts, state, 2)
    assert torch.equal(restored[0][1], torch.tensor([700, 5])) and torch.equal(restored[1][0], cpu_state(11))
    assert torch.equal(restored[1][1], seeded(SEED + 1))  # not rank 0's list entry
    assert len(said) == 1 and "rank(s) 1 cannot be continued" in said[0]


def test_a_cpu_rank_beyond_the_checkpoint_does_not_take_rank_0s_stream(parts, capsys):
    """gloo on the CPU, 1 rank grown to 3: rank 0 continues, ranks 1 and 2 are re-seeded, said once (on stdout)."""
    torch.default_generator.set_state(cpu_state(42))
    state = train_state(parts).state_dict()
    for rank in range(3):
        train_state(parts, rank, 3).load_state_dict(state, Path("ck.pt"))
        want = cpu_state(42) if rank == 0 else cpu_state(SEED + rank)
        assert torch.equal(torch.get_rng_state(), want), rank
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "rank(s) 1, 2 cannot be continued" in said[0], said


# ---- settings refused at config time ----------------------------------------------------------------------


def quickstart(*overrides: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        quickstart(*overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return FakeCuda(monkeypatch, 1)


def test_cuda_on_a_machine_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "train.device=cuda" in refused("train.device=cuda")
    quickstart("train.device=auto")


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_half_precision_attention_in_fp32(gpu, backend, device):
    msg = refused(f"train.device={device}", f"train.attention={backend}", "train.precision=fp32")
    assert f"train.attention={backend}" in msg and "train.precision=fp32" in msg
    quickstart(f"train.device={device}", f"train.attention={backend}", "train.precision=auto")
    quickstart(f"train.device={device}", "train.attention=efficient", "train.precision=fp32")


def test_fp32_flash_on_the_cpu_is_allowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quickstart("train.device=auto", "train.attention=flash", "train.precision=fp32")  # the CPU kernel takes fp32


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_graphs_of_their_own(gpu, mode):
    base = ["train.device=cuda", "train.compile=true", f"train.compile_mode={mode}"]
    msg = refused(*base, "train.cuda_graph=true")
    assert "train.cuda_graph=true" in msg and f"train.compile_mode={mode}" in msg and "train.compile=true" in msg
    quickstart(*base, "train.cuda_graph=false")
    quickstart("train.device=cuda", "train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs")


def test_grad_checkpointing_cannot_be_captured(gpu, monkeypatch):
    ckpt = "model.args={patch_size: 2, depth: 2, width: 32, num_heads: 2, grad_checkpointing: true}"
    msg = refused("train.device=cuda", ckpt)
    assert "train.cuda_graph=true" in msg and "model.args.grad_checkpointing=true" in msg
    quickstart("train.device=cuda", ckpt, "train.cuda_graph=false")
    quickstart("train.device=cuda", ckpt, "train.grad_accum=2")  # the general step: no graph planned
    quickstart("train.device=cpu", ckpt)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the step is not captured either
    quickstart("train.device=cuda", ckpt)


@pytest.mark.parametrize("machine", ["cpu", "gpu"])
def test_every_shipped_config_still_loads(monkeypatch, machine):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if machine == "gpu":
        FakeCuda(monkeypatch, 1)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paths = sorted({*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/compare/*.yaml"), *packaged_configs().values()})
    assert len(paths) >= 12
    for path in paths:
        load_config(path)
