"""The one seam between the model and device-specific kernels (STYLE.md habit 13).

The model and its layers call dropout, attention and cross-entropy through
``kernels_for(device)``: torch's own ops (:data:`STANDARD`) on GPU and any other device, and
on CPU the faster versions of :mod:`hitter_core.cpu_kernels` (:data:`CPU`), which compute the
same functions (the tests compare them with torch's).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hitter_core import cpu_kernels

MAX_SDPA_BATCH = 65_535  # rows per scaled_dot_product_attention call (sdpa_attention)

# The SDPA backends CUDA may use, by choice: flash (no mask) and memory-efficient attention
# (boolean key masks), math as the last resort. cuDNN's attention is left out: it builds an
# execution plan on the host for every new shape, 200 ms of host time a step against 66 ms of
# GPU work in the first GPU suite (bench/gpu/README.md); bench/train_speed.py --sdpa-backend
# compares. None: torch's own choice.
CUDA_SDPA_BACKENDS: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Kernels:
    """The ops whose implementation depends on the device.

    * ``dropout(x, p, training)``: as ``F.dropout``.
    * ``attention(q, kv, key_mask, dropout_p)``: as :func:`sdpa_attention`.
    * ``cross_entropy(scores, targets, label_smoothing)``: as ``F.cross_entropy`` (mean).
    """

    dropout: Callable[[torch.Tensor, float, bool], torch.Tensor]
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]
    cross_entropy: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v with dropout on the weights: q (B, Lq, H, d), kv
    (B, L, 2, H, d) keys and values (the layout of the fused projection), key_mask
    (B, 1, 1, L) bool, True = real key, or None -> (B, Lq, H, d).

    Batches of more than :data:`MAX_SDPA_BATCH` rows run in chunks: CUDA's flash and
    memory-efficient kernels launch one block per row in a grid dimension capped at 65,535
    (pytorch/pytorch#146704), and the entity Transformer's batch is the number of distinct
    (entity, relation) pairs, about 24.5k at the paper's batch of 512, more at larger ones.
    On CUDA the backends are :data:`CUDA_SDPA_BACKENDS`."""
    if q.shape[0] > MAX_SDPA_BATCH:
        chunks = [
            sdpa_attention(q[i : i + MAX_SDPA_BATCH], kv[i : i + MAX_SDPA_BATCH],
                           None if key_mask is None else key_mask[i : i + MAX_SDPA_BATCH],
                           dropout_p)
            for i in range(0, q.shape[0], MAX_SDPA_BATCH)
        ]
        return torch.cat(chunks)
    q, k, v = q.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4)  # (B, H, L*, d) each
    backends = CUDA_SDPA_BACKENDS if q.is_cuda else None
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    return a.transpose(1, 2)  # (B, Lq, H, d)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=training)


def _cross_entropy(
    scores: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    return F.cross_entropy(scores, targets, label_smoothing=label_smoothing)


STANDARD = Kernels(dropout=_dropout, attention=sdpa_attention, cross_entropy=_cross_entropy)
CPU = Kernels(
    dropout=cpu_kernels.dropout,
    attention=cpu_kernels.attention,
    cross_entropy=cpu_kernels.cross_entropy,
)


def kernels_for(device: torch.device) -> Kernels:
    """:data:`CPU` for a CPU device, :data:`STANDARD` otherwise and inside code that
    ``torch.compile`` traces: the CPU versions are autograd Functions with hand-written
    backwards that keep tensors outside ``save_for_backward`` and write gradients in place;
    compiled, torch 2.13 failed in their backward ("setStorage ... out of bounds"), and a
    compiler fuses the standard ops anyway."""
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return CPU
    return STANDARD
