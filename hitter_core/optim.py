"""Optimisation of link-prediction training and the DeepSpeed engine that runs it (paper
section 3.3; REFERENCE.md "Optimiser quirks").

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
* :func:`resolve_ds_config`: ``ds_config.json`` with its ``"auto"`` values filled in from
  :class:`~hitter_core.config.TrainConfig`, the single place of every hyper-parameter;
  :func:`init_distributed` and :func:`build_engine` set up the process group and the engine.

deepspeed is imported inside the functions, not at module level: it picks its accelerator
at import, and ``train.device="cpu"`` must reach it first (``DS_ACCELERATOR``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from hitter_core.config import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_config.json"


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
    """Number of warm-up steps: ``ceil(warmup_ratio * total_steps)``."""
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


def resolve_ds_config(
    path: str | Path | None,
    config: TrainConfig,
    micro_batch_size: int,
    bf16_available: bool,
) -> dict[str, Any]:
    """Read the DeepSpeed config and fill it from ``config`` (the hyper-parameters' one place).

    * ``train_micro_batch_size_per_gpu``: ``micro_batch_size`` (triples per process and step).
    * ``gradient_clipping``: DeepSpeed clips the *global* norm; with ``clip_per_tensor`` the
      trainer clips per tensor itself and DeepSpeed's clipping is set to 0, otherwise it is
      ``max_grad_norm``. A differing value in the file is overridden with a warning.
    * ``bf16``: ``"auto"`` means bf16 where ``bf16_available`` (the trainer: CUDA with bf16).
      It runs as DeepSpeed's ``torch_autocast`` (bf16 compute; fp32 weights, gradients and
      optimizer state) rather than DeepSpeed's bf16 mode, which keeps bf16 weights: those
      would make the 1vsAll evaluation scores bf16 (many ties among 14k entities) and hide
      the fp32 gradients from per-tensor clipping.
    """
    path = Path(path) if path is not None else DEFAULT_DS_CONFIG
    ds = json.loads(path.read_text(encoding="utf-8"))
    if ds.get("train_micro_batch_size_per_gpu", "auto") not in ("auto", micro_batch_size):
        raise ValueError(
            f"{path}: train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} "
            f"contradicts train.batch_size; set it to \"auto\""
        )
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch x world size
    if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise ValueError(f"{path}: gradient accumulation is not supported by this trainer")
    ds["gradient_accumulation_steps"] = 1

    clipping = 0.0 if config.clip_per_tensor else config.max_grad_norm
    if ds.get("gradient_clipping", "auto") not in ("auto", config.max_grad_norm, clipping):
        logger.warning(
            "%s: gradient_clipping=%s overridden by train.max_grad_norm=%s",
            path, ds["gradient_clipping"], config.max_grad_norm,
        )
    ds["gradient_clipping"] = clipping

    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        bf16 = bf16_available
    ds["bf16"] = {"enabled": False}
    if bf16:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ds.get("fp16", {}).get("enabled", False) is True:
        raise ValueError(f"{path}: fp16 is not supported (use bf16)")
    if ds.get("zero_optimization", {}).get("stage", 0) != 0:
        raise ValueError(f"{path}: only ZeRO stage 0 is supported (the model has ~16M params)")
    return ds


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group a launcher set up through RANK/WORLD_SIZE/MASTER_*, or form a
    world of one; nccl on CUDA, gloo on CPU. Returns (rank, world size)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port for a world of one
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        cuda = get_accelerator().device_name() == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_engine(
    model: torch.nn.Module,
    config: TrainConfig,
    total_steps: int,
    ds_config: str | Path | None = None,
) -> tuple[Any, AdamaxW, LambdaLR, dict[str, Any]]:
    """The DeepSpeed engine around ``model`` with our optimizer and schedule (call
    :func:`init_distributed` first). Returns (engine, optimizer, scheduler, resolved config);
    the engine moves the model to its device and averages gradients across processes."""
    import deepspeed

    cuda = deepspeed.accelerator.get_accelerator().device_name() == "cuda"
    resolved = resolve_ds_config(
        ds_config, config, config.batch_size, cuda and torch.cuda.is_bf16_supported()
    )
    optimizer = build_optimizer(model, config)
    scheduler = linear_schedule(optimizer, total_steps, config.warmup_ratio)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=resolved
    )
    return engine, optimizer, scheduler, resolved
