"""Numeric precision of training, one setting for both stages (``train.precision``).

* ``fp32``: everything in float32.
* ``bf16``: the forward runs under ``torch.autocast(dtype=torch.bfloat16)`` (DeepSpeed's
  ``torch_autocast``, :func:`hitter_core.distributed.resolve_ds_config`): matrix products in
  bf16, while weights, optimizer state and gradients (so clipping) stay float32, and so do
  HittER's 1vsAll scores and loss (:func:`hitter_core.model.score_entities`) and LayerNorm
  statistics (accumulated in float32 by torch's kernels).
* ``auto`` (the default): ``bf16`` where the device computes bf16 natively, else ``fp32``.
  A CUDA GPU does when ``torch.cuda.is_bf16_supported()`` says so; a CPU does when it has
  AVX512-BF16 or AMX-BF16 (:func:`cpu_has_native_bf16`). Elsewhere bf16 is emulated and slower
  than float32, so an explicit ``bf16`` there runs as asked, with one warning.

Evaluation (ranking, dev and test accuracy) is not autocast: it runs in float32 either way.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``/proc/cpuinfo``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16): there, bf16
    matrix products run 3-6x faster than float32 (bench/RESULTS.md)."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """``train.precision`` on ``device`` -> "fp32" or "bf16" ("auto": bf16 where native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        logger.warning("precision bf16 on %s, which has no native bf16: it runs emulated, "
                       "slower than fp32 (precision auto would pick fp32)", device)
    return precision
