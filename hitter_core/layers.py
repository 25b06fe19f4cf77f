"""Transformer layers of HittER's two Transformers (paper section 2.2), computing what the
reference computes (``shared/design/REFERENCE.md`` "Encoder") while skipping padding.

:class:`PostLNLayer` is a post-LN encoder layer (BERT / ``nn.TransformerEncoderLayer``
layout) over *packed* tokens: every per-token map (projections, FFN, LayerNorm, dropout) runs
on the real tokens only, and the batch is padded just for attention (:class:`Packing`). A last
layer can compute only the first positions of every row (the [CLS] / [GCLS] outputs that the
model reads), with keys and values from every token. Dropout and attention come from
:func:`hitter_core.kernels.kernels_for` (torch's ops; faster equivalents on CPU).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from hitter_core.config import HittERConfig
from hitter_core.kernels import kernels_for


class Packing(NamedTuple):
    """Where the T real tokens of a batch sit in its padded (B, L) grid. The layers hold tokens
    packed as (T, D), run every per-token map on real tokens only and pad just for attention."""

    batch: int  # B
    length: int  # L
    positions: torch.Tensor | None  # (T,) ascending flat indices into B * L; None: no padding
    row_starts: torch.Tensor  # (B,) packed index of each row's first token
    key_mask: torch.Tensor | None  # (B, 1, 1, L) bool, True = real key; None: no padding

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, L, C), zeros at padding. Rows added to reach a bucket size
        (:func:`bucket_size`) sit at padding positions, whose keys the mask hides."""
        B, L, C = self.batch, self.length, t.shape[-1]
        if self.positions is None:
            return t.view(B, L, C)
        return t.new_zeros(B * L, C).index_copy(0, self.positions, t).view(B, L, C)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (T, C)."""
        t = t.reshape(self.batch * self.length, t.shape[-1])
        return t if self.positions is None else t[self.positions]


def bucket_size(n: int, per_octave: int) -> int:
    """The padded size of ``n`` rows when each octave (2^k, 2^(k+1)] is cut into
    ``per_octave`` equal steps: ``n`` rounded up to a multiple of 2^k / per_octave (at most
    1 / per_octave more rows). Sizes up to 2 * per_octave, and any size when ``per_octave`` is
    0, stay as they are. For 8: 5,300 -> 5,632; 24,500 -> 24,576."""
    if per_octave <= 0 or n <= 2 * per_octave:
        return n
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // per_octave)
    return -(-n // step) * step


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that computes and returns float32 under autocast, as CUDA's autocast
    does for layer_norm and CPU's does not (torch 2.13 keeps a bf16 input in bf16 there). In a
    post-LN layer its output is the residual stream, which thereby stays float32 in bf16
    training on either device; matrix products still read it in bf16. Without autocast it is
    ``nn.LayerNorm`` (same parameters, same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


class PostLNLayer(nn.Module):
    """A post-LN Transformer encoder layer (BERT / ``nn.TransformerEncoderLayer`` layout) with
    scaled-dot-product attention, over packed tokens (see :class:`Packing`). ``ffn_dropout``
    adds torch's dropout after the FFN activation, which the reference's context layers
    (torch) have and its BERT layers do not."""

    def __init__(self, config: HittERConfig, eps: float, ffn_dropout: bool) -> None:
        super().__init__()
        d, self.heads = config.hidden_size, config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = LayerNorm(d, eps=eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = LayerNorm(d, eps=eps)
        self.act = ACT2FN[config.hidden_act]
        self.attention_dropout = config.attention_dropout
        self.hidden_dropout = config.hidden_dropout
        self.ffn_dropout = config.hidden_dropout if ffn_dropout else 0.0

    def forward(
        self, x: torch.Tensor, packing: Packing, first: int | None = None
    ) -> torch.Tensor:
        """x (T, D) packed tokens -> (T, D). With ``first`` only the outputs of the first
        ``first`` positions of every row are computed, (B * first, D): what a last layer needs
        when the rest of its output is not used (the keys and values still see every token)."""
        B, L, D, H = packing.batch, packing.length, x.shape[1], self.heads
        kernels = kernels_for(x.device)
        w, b = self.qkv.weight, self.qkv.bias  # (3D, D), (3D,): [query; key; value]
        if first is None:
            residual = x
            q = packing.pad(F.linear(x, w[:D], b[:D]))  # (B, L, D)
        else:
            rows = (packing.row_starts[:, None] + torch.arange(first, device=x.device)).flatten()
            residual = x[rows]  # (B * first, D)
            q = F.linear(residual, w[:D], b[:D])  # (B * first, D)
        q = q.view(B, -1, H, D // H)  # (B, Lq, H, D/H), Lq = L or first
        kv = packing.pad(F.linear(x, w[D:], b[D:])).view(B, L, 2, H, D // H)  # keys, values
        p = self.attention_dropout if self.training else 0.0
        a = kernels.attention(q, kv, packing.key_mask, p).reshape(B, -1, D)  # (B, Lq, D)
        a = packing.unpad(a) if first is None else a.view(B * first, D)
        a = kernels.dropout(self.attn_out(a), self.hidden_dropout, self.training)
        x = self.attn_norm(residual + a)
        h = kernels.dropout(self.act(self.ffn_in(x)), self.ffn_dropout, self.training)
        h = kernels.dropout(self.ffn_out(h), self.hidden_dropout, self.training)
        return self.ffn_norm(x + h)
