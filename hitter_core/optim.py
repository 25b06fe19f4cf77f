"""Optimisation of link-prediction training (paper section 3.3; REFERENCE.md "Optimiser
quirks"); :func:`warmup_steps` is the warm-up length of both stages.

* :class:`AdamaxW`: torch's Adamax with *decoupled* weight decay on every parameter
  (embeddings and LayerNorm included, as the reference). torch 2.13's ``Adamax(weight_decay=)``
  is an L2 term added to the gradient and has no decoupled switch, so the decay is applied
  here as ``p <- p * (1 - lr * wd)`` before the Adamax update (the AdamW rule). Unlike the
  reference, torch's Adamax bias-corrects the first moment; that changes only the first few
  dozen updates, which fall inside the warm-up where the learning rate is near zero.
* :func:`linear_schedule`: linear warm-up over ``warmup_ratio`` of all steps, then linear decay
  to 0 (``transformers.get_linear_schedule_with_warmup``).
* :func:`clip_grad_per_tensor_`: clip each parameter's gradient to norm ``max_norm`` on its
  own (the reference), rather than DeepSpeed's clipping of the global norm.

The DeepSpeed engine over these is built by :func:`hitter_core.distributed.initialize_engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from hitter_core.config import TrainConfig


class AdamaxW(torch.optim.Adamax):
    """Adamax with decoupled weight decay. Each param group holds the decay rate under
    ``"decoupled_weight_decay"``; torch's own (L2) ``"weight_decay"`` stays 0."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.defaults["decoupled_weight_decay"] = weight_decay
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            decay = group["lr"] * group["decoupled_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - decay)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> AdamaxW:
    """Adamax over every trainable parameter with the run's lr, eps and decoupled decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return AdamaxW(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Number of warm-up steps of a linear warm-up / linear decay schedule over
    ``total_steps``: ``ceil(warmup_ratio * total_steps)`` (both stages)."""
    return math.ceil(warmup_ratio * total_steps)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> LambdaLR:
    """lr factor ``s / W`` for step ``s < W`` (0 at the first step), then
    ``(total - s) / (total - W)`` down to 0 at ``total``; W = :func:`warmup_steps`."""
    return get_linear_schedule_with_warmup(
        optimizer, warmup_steps(total_steps, warmup_ratio), total_steps
    )


@torch.no_grad()
def clip_grad_per_tensor_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each gradient whose L2 norm exceeds ``max_norm`` down to ``max_norm``, in place.
    Returns the (P,) gradient norms before clipping (P = parameters with a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (P,)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms
