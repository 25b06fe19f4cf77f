"""The DeepSpeed set-up shared by both stages: the process group and ``ds_config.json``.

* :func:`init_distributed`: join the process group a launcher set up (``deepspeed``,
  ``torchrun``) or form a world of one; nccl on CUDA, gloo on CPU. Returns the process's
  device too (its GPU made current on CUDA).
* :func:`resolve_ds_config`: ``ds_config.json`` with its ``"auto"`` values filled in from the
  caller's train config, the single place of every hyper-parameter. A value in the file that
  contradicts the train config is an error (batch size, ZeRO stage) or is overridden with a
  warning (clipping); ``"auto"`` is always accepted.
* :func:`initialize_engine`: the DeepSpeed engine over a model, an optimizer and a schedule
  built by the caller, with the resolved ``ds_config.json``.
* :func:`destroy_distributed`: leave the process group at the end of a command.

deepspeed is imported inside the functions, not at module level: it picks its accelerator at
import, and ``device="cpu"`` must reach it first (``DS_ACCELERATOR``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hitter_core.precision import native_bf16
from hitter_core.runtime import check_build_locks, prepare_process

logger = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_config.json"


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group a launcher set up through RANK/WORLD_SIZE/MASTER_*, or form a
    world of one (the process's environment: :func:`hitter_core.runtime.prepare_process`);
    nccl on CUDA, gloo on CPU. ``device``: "auto" (CUDA when available), "cpu" or "cuda".
    Returns (rank, world size, this process's device); on CUDA the device is
    ``cuda:LOCAL_RANK``, made the current one."""
    alone = prepare_process(device)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    cuda = get_accelerator().device_name() == "cuda"
    if not cuda:
        check_build_locks()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if alone:  # no rendezvous, so no port to race for: an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)  # adopts the group if there is one
    where = torch.device("cpu")
    if cuda:
        where = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(where)
    return dist.get_rank(), dist.get_world_size(), where


def check_same_on_all_ranks(exists: bool, what: str, device: torch.device) -> None:
    """Raise on every process unless all of them see ``what`` (e.g. a checkpoint to resume)
    alike: rank 0 writes the checkpoints and every rank reads them, so several nodes need one
    shared output directory."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flags = torch.tensor([float(exists), float(not exists)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # (all see it, none sees it)
    if not flags.any():
        raise RuntimeError(
            f"{what} exists on some processes but not on others (rank {dist.get_rank()} on "
            f"{socket.gethostname()}: {'found' if exists else 'missing'}); with several nodes "
            f"the output directory must be on a file system they all share"
        )


def destroy_distributed() -> None:
    """Leave the process group through DeepSpeed, which also drops the groups it cached (torch's
    ``destroy_process_group`` leaves those behind, and the next engine in the same process,
    e.g. in a test session, fails on them)."""
    import deepspeed.comm

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()


def initialize_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: str | Path | None = None,
    **resolve_kwargs: Any,
) -> Any:
    """The DeepSpeed engine over ``model`` with the caller's ``optimizer`` and per-step
    ``scheduler`` (call :func:`init_distributed` first). ``resolve_kwargs`` go to
    :func:`resolve_ds_config` (``micro_batch_size`` and ``max_grad_norm`` at least;
    ``bf16_available``, whether ``"auto"`` in the file means bf16, defaults to the device's
    native bf16, :func:`hitter_core.precision.native_bf16`). The engine moves the
    model to its device and averages gradients across processes; ``engine.optimizer``,
    ``engine.lr_scheduler`` and ``engine.config`` (the resolved config) are the ones in use."""
    import deepspeed

    if "bf16_available" not in resolve_kwargs:
        device = deepspeed.accelerator.get_accelerator().device_name()
        resolve_kwargs["bf16_available"] = native_bf16(device)
    resolved = resolve_ds_config(ds_config, **resolve_kwargs)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=resolved
    )
    return engine


def resolve_ds_config(
    path: str | Path | None,
    *,
    micro_batch_size: int,
    max_grad_norm: float,
    engine_clips: bool = True,
    zero_stage: int = 0,
    supported_zero_stages: tuple[int, ...] = (0,),
    bf16_available: bool,
) -> dict[str, Any]:
    """Read the DeepSpeed config at ``path`` (default: the repository's ``ds_config.json``)
    and fill it in.

    * ``train_micro_batch_size_per_gpu``: ``micro_batch_size`` (examples per process and
      step); ``train_batch_size`` is dropped (DeepSpeed derives it); no gradient accumulation.
    * ``gradient_clipping``: ``max_grad_norm`` of the *global* norm when ``engine_clips``,
      else 0 (the caller clips, e.g. per tensor as the HittER reference does).
    * ``zero_optimization.stage``: ``zero_stage``, which must be in ``supported_zero_stages``.
    * ``bf16``: ``"auto"`` means bf16 where ``bf16_available`` (the trainers pass their
      ``train.precision`` resolved on the device, :mod:`hitter_core.precision`). It runs as
      DeepSpeed's ``torch_autocast`` (bf16 compute; fp32 weights, gradients and optimizer
      state) rather than DeepSpeed's bf16 mode, which keeps bf16 weights: those would make
      HittER's 1vsAll scores bf16 (many ties among 14k entities) and hide fp32 gradients from
      clipping.
    """
    path = Path(path) if path is not None else DEFAULT_DS_CONFIG
    ds = json.loads(path.read_text(encoding="utf-8"))
    if ds.get("train_micro_batch_size_per_gpu", "auto") not in ("auto", micro_batch_size):
        raise ValueError(
            f"{path}: train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} "
            f"contradicts the train config's batch size {micro_batch_size}; set it to \"auto\""
        )
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds.pop("train_batch_size", None)
    if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise ValueError(f"{path}: gradient accumulation is not supported by the trainers")
    ds["gradient_accumulation_steps"] = 1

    if ds.get("gradient_clipping", "auto") not in ("auto", max_grad_norm):
        logger.warning("%s: gradient_clipping=%s overridden by the train config's "
                       "max_grad_norm=%s", path, ds["gradient_clipping"], max_grad_norm)
    ds["gradient_clipping"] = max_grad_norm if engine_clips else 0.0

    if zero_stage not in supported_zero_stages:
        raise NotImplementedError(
            f"ZeRO stage {zero_stage} is not supported here; use one of {supported_zero_stages}"
        )
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") not in ("auto", zero_stage):
        raise ValueError(f"{path}: zero_optimization.stage={zero['stage']} contradicts the "
                         f"train config's ZeRO stage {zero_stage}; set it to \"auto\"")
    zero["stage"] = zero_stage

    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        bf16 = bf16_available
    ds["bf16"] = {"enabled": False}
    if bf16:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ds.get("fp16", {}).get("enabled", False) is True:
        raise ValueError(f"{path}: fp16 is not supported (use bf16)")
    return ds
