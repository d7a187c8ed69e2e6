"""The optimiser step with static shapes and no host sync, captured as one CUDA graph where it can be.

With one process and train.grad_accum 1 every step runs the same kernels on tensors at fixed
addresses (`StaticStep`): the batch, timesteps, noise and labels are copied into static buffers (the
randomness is drawn outside, by the same (seed, step) generator as ever, so the numbers do not change),
the learning rate and the EMA weight are device tensors filled before each step, and the step counter
behind the non-finite flag is a device tensor. On CUDA the body (forward, backward, clipping, AdamW,
EMA, per-bin statistics, non-finite flags) runs eagerly for WARMUP steps on a side stream (compilation,
autotuning, optimizer state, cuBLAS workspaces), is then captured once and replayed every step. Elsewhere
the same body runs eagerly: the graph's eager twin, which the CPU tests compare bit for bit with the
general step. Grad accumulation and DDP keep the general step (`Trainer.train_step`).

Several runs on one GPU: each process otherwise keeps torch's default of one OpenMP thread per core, and
idle OpenMP threads busy-wait (libgomp's default active wait policy), so four launch-bound runs on 16
cores keep 64 spinning threads that take the cores from the threads launching kernels. `default_threads`
gives a CUDA run a few threads instead. Without NVIDIA MPS the GPU runs one process's context at a time
(time-slicing): runs together can only fill the time each leaves the GPU idle, so they gain when each
step is one graph launch with its data already on the device, and MPS (kernels of several processes at
once) can add more. None of this is measured yet on a GPU by this project.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from minsnr.distributed import GRAPHING_MODES

WARMUP = 3  # eager steps before the capture (PyTorch's CUDA graph notes warm up with 3 iterations)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset or a cgroup set it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(device_type: str, cores: int) -> int | None:
    """train.threads=0: a CUDA run takes max(1, min(4, cores // 4)) threads, so four runs fit the cores;
    a CPU run keeps torch's default (None)."""
    return max(1, min(4, cores // 4)) if device_type == "cuda" else None


def configure_threads(threads: int, device_type: str) -> str:
    """Apply train.threads (0: `default_threads`); returns the phrase for the log."""
    cores = available_cores()
    n = threads or default_threads(device_type, cores)
    if n:
        torch.set_num_threads(n)
    why = "train.threads" if threads else (f"auto on cuda: min(4, {cores} cores // 4)" if n else "torch's default")
    return f"{torch.get_num_threads()} CPU threads ({why})"


def plan_step(
    device_type: str, world: int, grad_accum: int, cuda_graph: bool, compile: bool, compile_mode: str
) -> tuple[bool, bool, str]:
    """(static step?, capture it as a CUDA graph?, the log phrase saying why)."""
    if world > 1:
        return False, False, f"eager step ({world} DDP ranks: a CUDA graph of the step needs one process)"
    if grad_accum > 1:
        return False, False, f"eager step (train.grad_accum={grad_accum}: a CUDA graph of the step needs 1)"
    if device_type != "cuda":
        return True, False, f"static eager step on {device_type} (CUDA graphs need a CUDA device)"
    if not cuda_graph:
        return True, False, "static eager step (train.cuda_graph=false)"
    if compile and compile_mode in GRAPHING_MODES:
        return True, False, f"static eager step around the model's own CUDA graphs (train.compile_mode={compile_mode})"
    return True, True, f"the whole step as one CUDA graph after {WARMUP} eager steps"


def attention(backend: str) -> AbstractContextManager[Any]:
    """The context that restricts scaled_dot_product_attention to `backend` (a name of ATTENTION)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(names[backend])


class RecompileLines(logging.Handler):
    """Each record of torch.compile's 'recompiles' log as one line through `say` (the run's log): the function
    recompiled and the first guard that failed."""

    def __init__(self) -> None:
        super().__init__()
        self.say: Callable[[str], None] = print

    def emit(self, record: logging.LogRecord) -> None:
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        why = [line[2:] for line in lines if line.startswith("- ")]
        self.say(f"torch.compile: {lines[0] if lines else 'recompiling'}" + (f" ({why[0]})" if why else ""))


RECOMPILES = RecompileLines()


def report_recompiles(log: Callable[[str], None]) -> None:
    """Say each torch.compile recompilation once, as one line of the run's log (`log`); otherwise they are
    silent. torch._logging.set_logs(recompiles=True) turns on dynamo's 'recompiles' log (when TORCH_LOGS is
    set, it decides instead), and its logger, torch._dynamo.guards.__recompiles, gets RECOMPILES in place of
    torch's stderr handler, so a recompilation is not also said on stderr. Calling again re-routes the lines."""
    import torch._dynamo.guards  # noqa: F401  importing it configures the logger: route it afterwards

    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    RECOMPILES.say, logger.propagate = log, False
    if RECOMPILES not in logger.handlers:
        logger.addHandler(RECOMPILES)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Write the learning rate in place where it is a device tensor (a captured step reads it there)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def keep_run_settings(opt: torch.optim.Optimizer) -> None:
    """Checkpoints store the learning rate as a number, and loading one keeps this run's implementation
    (fused / foreach / capturable), its kind of learning rate and the step counts where it needs them;
    so a run may resume from a checkpoint of another device or step path."""
    flags = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable")}
    lr_tensor = isinstance(opt.param_groups[0]["lr"], Tensor)

    def saved(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        for group in state["param_groups"]:  # new dicts: the live groups keep their tensors
            if isinstance(group["lr"], Tensor):
                group["lr"] = group["lr"].item()
        return state

    def loaded(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(flags)
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), device=device) if lr_tensor else float(group["lr"])
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:  # on the device for fused/capturable, on the CPU for foreach (torch's rule)
                    at = p.device if flags["fused"] or flags["capturable"] else torch.device("cpu")
                    state["step"] = state["step"].to(device=at, dtype=torch.float32)

    opt.register_state_dict_post_hook(saved)
    opt.register_load_state_dict_post_hook(loaded)


class StaticStep:
    """`step(*inputs)`: copy inputs into static buffers, then run `body(*buffers)` (eagerly, or by
    replaying its CUDA graph once captured) and return its output (a static tensor when replayed).
    `zero_grad` sets gradients to None after each eager step, and before the capture so that backward
    allocates them in the graph's pool and every replay writes them afresh."""

    def __init__(
        self,
        body: Callable[..., Tensor],
        zero_grad: Callable[[], None],
        *,
        capture: bool,
        device: torch.device,
        log: Callable[[str], None],
        warmup: int = WARMUP,
    ) -> None:
        self.body, self.zero_grad, self.capture, self.log, self.warmup = body, zero_grad, capture, log, warmup
        self.buffers: list[Tensor | None] | None = None
        self.graph: Any = None
        self.out: Tensor | None = None
        self.calls = 0
        self.stream = torch.cuda.Stream(device) if capture and device.type == "cuda" else None

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        if self.buffers is None:
            self.buffers = [None if x is None else x.clone() for x in inputs]
        else:
            for buf, x in zip(self.buffers, inputs):
                if buf is not None:
                    buf.copy_(x)  # type: ignore[arg-type]
        self.calls += 1
        if self.graph is None and self.capture and self.calls > self.warmup:
            try:
                self._capture()
            except Exception as err:  # e.g. an op that cannot be captured: keep training, eagerly
                self.capture, self.graph = False, None
                self.zero_grad()
                line = (str(err).splitlines() or [""])[0][:200]
                self.log(
                    f"CUDA graph capture failed ({type(err).__name__}: {line}); running the static step eagerly "
                    "for the rest of the run (train.cuda_graph=false skips the attempt)"
                )
        if self.graph is not None:
            self.graph.replay()
            return self.out  # type: ignore[return-value]
        return self._eager()

    def _eager(self) -> Tensor:
        side = self.stream is not None
        if side:  # warm up on the stream the capture will use
            self.stream.wait_stream(torch.cuda.current_stream())  # type: ignore[union-attr]
        with torch.cuda.stream(self.stream) if side else contextlib.nullcontext():
            out = self.body(*self.buffers)  # type: ignore[misc]
            self.zero_grad()
        if side:
            torch.cuda.current_stream().wait_stream(self.stream)  # type: ignore[arg-type]
        return out

    def _capture(self) -> None:
        """Capture the body as a CUDA graph. When the body fails during the capture (an op that cannot be captured,
        e.g. torch.utils.checkpoint reading the CUDA RNG state under model.args.grad_checkpointing), capture_end
        then fails too on the broken capture; that second error would hide the first, so the first is raised."""
        graph = torch.cuda.CUDAGraph()
        self.zero_grad()
        first: Exception | None = None
        try:
            # thread_local: the loader's pin-memory thread may allocate pinned memory meanwhile (global mode would
            # invalidate the capture and poison that thread); kernels are captured by stream, backward's included
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                try:
                    out = self.body(*self.buffers)  # type: ignore[misc]
                except Exception as err:
                    first = err
                    raise
        except Exception:
            if first is None:
                raise
            raise first from None
        self.graph, self.out = graph, out
