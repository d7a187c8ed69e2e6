"""The training loss of a run: noise a clean batch, predict, weighted MSE (eq. 2, 4, 5 with the weight of
section 3.4), as one object built once from the config.

`TrainingLoss` owns everything that decides a weight: the target, the weighting (a name of
weighting.STRATEGIES or a callable from SNR to the x0-space weight), gamma, the distribution of the
training timesteps (minsnr.timesteps) and, for the stateful weightings `learned` and `pareto`
(weighting.ADAPTIVE), their trained or adapted state (minsnr.adaptive): its optimiser group, its DDP
averaging, its state_dict, its exported tensors and its metrics. The target-space weight of every
timestep is computed once, at construction (appendix B conversion, importance-sampling correction
apart), and each call gathers it for the batch's timesteps.

`diffusion_loss` is the same object used as a function: the public one-call form for your own loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minsnr.adaptive import LearnedWeight, ParetoWeight, make_adaptive
from minsnr.objective import make_target, predict_x0, q_sample
from minsnr.registry import check
from minsnr.schedule import Schedule
from minsnr.timesteps import DEFAULT_TIMESTEPS, Distribution, Timesteps, make_timesteps
from minsnr.weighting import ADAPTIVE, DEFAULT_TARGET, DEFAULT_WEIGHTING, TARGETS, Strategy, loss_weight

Model = nn.Module | Callable[..., Tensor]  # model(x_t, t, labels) -> prediction of the target
Adaptive = LearnedWeight | ParetoWeight  # a stateful weighting's state: t -> (scale [B], offset [B])


@dataclass
class LossOutput:
    loss: Tensor  # scalar: mean over the batch of weight * target-space MSE
    t: Tensor  # [B] long timesteps
    mse_x0: Tensor  # [B] unweighted x0-space MSE, detached (figure 6)
    weight: Tensor  # [B] weight applied in the target's space


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class TrainingLoss:
    """loss(model, x0, labels, t=None, noise=None, generator=None) -> LossOutput; see the module docstring."""

    def __init__(
        self,
        schedule: Schedule,
        *,
        target: str = DEFAULT_TARGET,
        weighting: Strategy = DEFAULT_WEIGHTING,
        gamma: float | None = None,
        timesteps: str | Distribution | Timesteps = DEFAULT_TIMESTEPS,
        adaptive: Adaptive | None = None,
        adapt_every: int = 100,
        timestep_args: Mapping[str, float] | None = None,
    ) -> None:
        check(target, TARGETS, "target")
        stateful = isinstance(weighting, str) and weighting in ADAPTIVE
        if stateful and adaptive is None:
            raise ValueError(
                f"weighting {weighting!r} is stateful: pass adaptive=minsnr.adaptive.make_adaptive(...) "
                "or build the loss with TrainingLoss.from_config"
            )
        if adaptive is not None and not stateful:
            raise ValueError(f"adaptive= is given but weighting {weighting!r} is fixed; use 'learned' or 'pareto'")
        self.schedule, self.target, self.weighting, self.gamma = schedule, target, weighting, gamma
        self.adaptive, self.adapt_every = adaptive, adapt_every
        self.timesteps = (
            timesteps
            if isinstance(timesteps, Timesteps)
            else make_timesteps(timesteps, schedule, weighting, gamma, target, timestep_args)
        )
        base = ADAPTIVE[weighting] if stateful else weighting  # type: ignore[index]
        snr = schedule.snr(torch.arange(schedule.num_timesteps, device=schedule.alphas_cumprod.device))
        self.weight_table = loss_weight(snr, base, gamma, target)  # [T] target-space weight (float64)

    @classmethod
    def from_config(cls, cfg: Any, schedule: Schedule) -> TrainingLoss:
        """The loss of `cfg.loss` (target, weighting, gamma, timesteps and their args, adapt_every), state on the schedule's device."""
        c = cfg.loss
        return cls(
            schedule,
            target=c.target,
            weighting=c.weighting,
            gamma=c.gamma,
            timesteps=c.timesteps,
            adaptive=make_adaptive(c.weighting, schedule),
            adapt_every=c.adapt_every,
            timestep_args=c.timestep_args,
        )

    def __call__(
        self,
        model: Model,
        x0: Tensor,
        labels: Tensor | None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Eq. 5 with the weight of section 3.4: x0 float [B, ...], labels long [B] or None, t long [B] (drawn
        from the timestep distribution when None), noise like x0 (drawn when None). The model receives the
        integer timesteps t (int64 [B]) that index the schedule. With a stateful weighting the per-sample
        loss is scale(t) * base weight * mse + offset(t)."""
        if t is None:
            t = self.timesteps.draw(x0.shape[0], generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma = _bcast(self.schedule.alpha(t), x0), _bcast(self.schedule.sigma(t), x0)
        x_t = q_sample(x0, noise, alpha, sigma)
        pred = model(x_t, t, labels).float()
        dims = tuple(range(1, x0.dim()))
        mse = (pred - make_target(x0, noise, alpha, sigma, self.target)).square().mean(dim=dims)
        weight = self.weight_table[t].to(mse.dtype) * self.timesteps.correction[t]
        offset = None
        if self.adaptive is not None:
            scale, offset = self.adaptive(t)
            weight = weight * scale.to(mse.dtype)
        with torch.no_grad():
            mse_x0 = (predict_x0(pred, x_t, alpha, sigma, self.target) - x0).square().mean(dim=dims)
        loss = (weight * mse if offset is None else weight * mse + offset.to(mse.dtype)).mean()
        return LossOutput(loss=loss, t=t, mse_x0=mse_x0, weight=weight.detach() if offset is not None else weight)

    # ---- the state of a stateful weighting (none for a fixed one) --------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of the loss's trained parameters (learned u(t): no weight decay); [] if none."""
        params = [] if self.adaptive is None else list(self.adaptive.parameters())
        return [{"params": params, "weight_decay": 0.0}] if params else []

    def average_gradients(self, world: int) -> None:
        """Average the trained parameters' gradients over the DDP ranks (they live outside the DDP wrapper)."""
        if self.adaptive is None or world == 1:
            return
        for p in self.adaptive.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def adapt(self, step: int, model: nn.Module, dataset: Any, seed: int) -> None:
        """Before optimiser step `step`: the pareto weighting's update (eq. 11) every adapt_every steps."""
        if isinstance(self.adaptive, ParetoWeight) and step > 0 and step % self.adapt_every == 0:
            self.adaptive.adapt(model, self.schedule, self.target, dataset, seed)

    def state_dict(self) -> dict[str, Tensor] | None:
        """The stateful weighting's state (a copy), None for a fixed weighting."""
        if self.adaptive is None:
            return None
        return {k: v.detach().clone() for k, v in self.adaptive.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Strict only: every key of the stateful weighting, nothing else (RuntimeError listing the misfits)."""
        if self.adaptive is None or not strict:
            raise ValueError(
                f"weighting {self.weighting!r} has no state to load"
                if self.adaptive is None
                else "a stateful loss weighting loads strictly only"
            )
        self.adaptive.load_state_dict(state, strict=True)

    def export_tensors(self) -> dict[str, Tensor] | None:
        """What the run exports of the loss (keys 'loss_weight.*'), None for a fixed weighting."""
        state = self.state_dict()
        return None if state is None else {f"loss_weight.{k}": v for k, v in state.items()}

    def metrics(self) -> dict[str, float]:
        return {} if self.adaptive is None else self.adaptive.metrics()


def diffusion_loss(
    model: Model,
    x0: Tensor,
    labels: Tensor | None,
    schedule: Schedule,
    *,
    target: str = DEFAULT_TARGET,
    weighting: Strategy = DEFAULT_WEIGHTING,
    gamma: float | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    timesteps: str | Distribution | Timesteps = DEFAULT_TIMESTEPS,
    generator: torch.Generator | None = None,
    adaptive: Adaptive | None = None,
) -> LossOutput:
    """The weighted denoising loss of one batch: `TrainingLoss(schedule, ...)(model, x0, labels, t, noise)`.

    `model(x_t, t, labels)` predicts `target`; weighting: a name (min_snr, const, plain, ...) or a callable
    from SNR to the x0-space weight; timesteps: a key of minsnr.timesteps.TIMESTEPS, a spec such as
    'lognormal(-0.4,1)', a Distribution or a built Timesteps (with importance sampling the weight is divided by T p(t), also for a given t). A
    stateful weighting (`learned`, `pareto`) needs its state as `adaptive` (minsnr.adaptive.make_adaptive).
    For many batches build the TrainingLoss once: it computes every timestep's weight at construction."""
    loss = TrainingLoss(
        schedule, target=target, weighting=weighting, gamma=gamma, timesteps=timesteps, adaptive=adaptive
    )
    return loss(model, x0, labels, t=t, noise=noise, generator=generator)
