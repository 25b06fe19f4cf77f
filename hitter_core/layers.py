"""Transformer layers of HittER's two Transformers (paper section 2.2), built for speed on CPU
while computing what the reference computes (``shared/design/REFERENCE.md`` "Encoder").

* :class:`PostLNLayer`: a post-LN encoder layer (BERT / ``nn.TransformerEncoderLayer``
  layout) over *packed* tokens: every per-token map (projections, FFN, LayerNorm, dropout)
  runs on the real tokens only, and the batch is padded just for attention
  (:class:`Packing`). A last layer can compute only the first positions of every row (the
  [CLS] / [GCLS] outputs that the model reads), with keys and values from every token.
* :func:`short_attention`: attention over the entity Transformer's 3 tokens on CPU.
* :func:`dropout`: inverted dropout with a cheaper mask on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

if TYPE_CHECKING:
    from hitter_core.model import HittERConfig


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout``. On CPU the keep mask compares random 16-bit integers
    with ``p`` (:func:`random_int16`), about 3x faster than ``F.dropout``'s ``bernoulli_``
    there; ``p`` is thereby rounded to a multiple of 2^-16 (float32 ``rand`` rounds to 2^-24).
    The mask stays bool, for the backward too (:class:`_MaskedScale`): a float mask cost about
    10% of a FB15K-237 paper-config training step on 2 CPU threads."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, training=True)
    return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Bool CPU mask of ``shape``, True (keep) with probability 1 - p (p rounded to 2^-16)."""
    n = int(np.prod(shape))
    return random_int16(n).view(shape) >= round(p * 65536) - 32768


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` for a bool ``keep``, saving the 1-byte mask for the backward rather
    than a float one, without casting the mask (two passes over x each way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


def random_int16(n: int) -> torch.Tensor:
    """(n,) uniform int16 on CPU from numpy's SFC64 generator (four values per 64-bit draw,
    about twice as fast as torch's mt19937), seeded from torch's generator so that
    ``torch.manual_seed`` governs it like any torch random op."""
    seed = int(torch.randint(2**62, ()))
    bits = np.random.SFC64(seed).random_raw((n + 3) // 4)  # (ceil(n / 4),) uint64
    return torch.from_numpy(bits.view(np.int16)[:n])


class Packing(NamedTuple):
    """Where the T real tokens of a batch sit in its padded (B, L) grid. The layers hold tokens
    packed as (T, D), run every per-token map on real tokens only and pad just for attention."""

    batch: int  # B
    length: int  # L
    positions: torch.Tensor | None  # (T,) ascending flat indices into B * L; None: no padding
    row_starts: torch.Tensor  # (B,) packed index of each row's first token
    key_mask: torch.Tensor | None  # (B, 1, 1, L) bool, True = real key; None: no padding

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, L, C), zeros at padding."""
        B, L, C = self.batch, self.length, t.shape[-1]
        if self.positions is None:
            return t.view(B, L, C)
        return t.new_zeros(B * L, C).index_copy(0, self.positions, t).view(B, L, C)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (T, C)."""
        t = t.reshape(self.batch * self.length, t.shape[-1])
        return t if self.positions is None else t[self.positions]


class PostLNLayer(nn.Module):
    """A post-LN Transformer encoder layer (BERT / ``nn.TransformerEncoderLayer`` layout) with
    torch's fused scaled-dot-product attention (two CPU exceptions: :meth:`_attention`), over
    packed tokens (see :class:`Packing`). ``ffn_dropout`` adds torch's dropout after the FFN
    activation, which the reference's context layers (torch) have and its BERT layers do not."""

    def __init__(self, config: HittERConfig, eps: float, ffn_dropout: bool) -> None:
        super().__init__()
        d, self.heads = config.hidden_size, config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
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
        a = self._attention(q, kv, packing.key_mask).reshape(B, -1, D)  # (B, Lq, D)
        a = packing.unpad(a) if first is None else a.view(B * first, D)
        x = self.attn_norm(residual + dropout(self.attn_out(a), self.hidden_dropout, self.training))
        h = dropout(self.act(self.ffn_in(x)), self.ffn_dropout, self.training)
        return self.ffn_norm(x + dropout(self.ffn_out(h), self.hidden_dropout, self.training))

    def _attention(
        self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Scaled dot-product attention, q (B, Lq, H, D/H), kv (B, L, 2, H, D/H) keys and values,
        key_mask (B, 1, 1, L) -> (B, Lq, H, D/H). Torch's ``scaled_dot_product_attention``,
        except on CPU in two cases where it is slower there:

        * a few keys and no padding (the entity Transformer's 3 tokens): :func:`short_attention`;
        * training with padding: spelled out to use the cheaper :func:`dropout` (SDPA then
          takes its unfused path with ``bernoulli_`` anyway)."""
        p = self.attention_dropout if self.training else 0.0
        if q.device.type == "cpu" and key_mask is None and kv.shape[1] <= SHORT_ATTENTION_KEYS:
            return short_attention(q, kv, p)
        q, k, v = q.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4)  # (B, H, L*, D/H) each
        if not p or key_mask is None or q.device.type != "cpu":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, L)
            weights = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
            a = dropout(weights, p, True) @ v
        return a.transpose(1, 2)  # (B, Lq, H, D/H)


SHORT_ATTENTION_KEYS = 4  # up to this many keys, CPU attention runs as short_attention


def short_attention(q: torch.Tensor, kv: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with dropout ``p`` on the weights, for a few keys and no
    padding: q (B, Lq, H, d), kv (B, L, 2, H, d) keys and values -> (B, Lq, H, d).

    With L = 3 (the entity Transformer), torch's SDPA on CPU spends its time in batched
    products of 3 x 40 matrices (the math path, taken with dropout) or in its flash kernel's
    blocking (without). A loop over the L keys of whole-batch elementwise products, with the
    backward written out (:class:`_ShortAttention`), is the same computation, faster on CPU:
    see ``bench/attention_speed.py``."""
    keep = keep_mask((*q.shape[:3], kv.shape[1]), p) if p else None  # (B, Lq, H, L)
    return _ShortAttention.apply(q, kv, keep, 1.0 / (1.0 - p) if p < 1.0 else 0.0)


class _ShortAttention(torch.autograd.Function):
    """:func:`short_attention` with a given dropout mask ``keep`` (None: no dropout) and its
    ``scale`` 1 / (1 - p). Weights w (B, Lq, H, L) = softmax(s), s_j = q . k_j / sqrt(d);
    out = sum_j (w_j * keep_j * scale) v_j. The gradients are written into fresh tensors of
    the inputs' shapes, so that no stacking follows."""

    @staticmethod
    def forward(ctx, q, kv, keep, scale):
        B, Lq, H, d = q.shape
        L = kv.shape[1]
        s = q.new_empty(B, Lq, H, L)
        for j in range(L):
            torch.sum(q * kv[:, None, j, 0], -1, out=s[..., j])
        w = s.mul_(d**-0.5).softmax(-1)
        wd = w if keep is None else torch.where(keep, w, 0.0).mul_(scale)
        out = wd[..., 0, None] * kv[:, None, 0, 1]  # (B, Lq, H, d)
        for j in range(1, L):
            out.addcmul_(wd[..., j, None], kv[:, None, j, 1])
        ctx.save_for_backward(q, kv, w, wd, keep)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g (B, Lq, H, d)
        q, kv, w, wd, keep = ctx.saved_tensors
        B, Lq, H, d = q.shape
        L = kv.shape[1]
        dw = w.new_empty(B, Lq, H, L)
        for j in range(L):
            torch.sum(g * kv[:, None, j, 1], -1, out=dw[..., j])
        if keep is not None:
            dw = torch.where(keep, dw, 0.0).mul_(ctx.scale)
        ds = (dw - (dw * w).sum(-1, keepdim=True)).mul_(w).mul_(d**-0.5)  # (B, Lq, H, L)
        dq = ds[..., 0, None] * kv[:, None, 0, 0]  # (B, Lq, H, d)
        for j in range(1, L):
            dq.addcmul_(ds[..., j, None], kv[:, None, j, 0])
        dkv = torch.empty_like(kv, memory_format=torch.contiguous_format)  # (B, L, 2, H, d)
        for j in range(L):
            for grad, coef, other in ((dkv[:, j, 0], ds, q), (dkv[:, j, 1], wd, g)):
                torch.mul(coef[:, 0, :, j, None], other[:, 0], out=grad)  # sum over queries
                for i in range(1, Lq):
                    grad.addcmul_(coef[:, i, :, j, None], other[:, i])
        return dq, dkv, None, None


def cross_entropy(
    scores: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean softmax cross-entropy of (N, E) float scores against (N,) targets, with label
    smoothing: the value and gradient of ``F.cross_entropy``. On CPU a fused version keeps
    only the log-normaliser and writes the gradient softmax - smoothed target in one go,
    about twice as fast over 1vsAll scores (N x 14,541 for FB15K-237)."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return F.cross_entropy(scores, targets, label_smoothing=label_smoothing)
    return _FusedCrossEntropy.apply(scores, targets, label_smoothing)


class _FusedCrossEntropy(torch.autograd.Function):
    """loss = mean_i [lse_i - (1 - e) s_i,t - e mean_j s_ij]; d/ds = (softmax - (1 - e) onehot
    - e / E) / N, with lse the log-sum-exp of row i and e the label smoothing. The forward keeps
    exp(s - max) for the backward, so that one exp pass serves both."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, targets: torch.Tensor, smoothing: float):
        top = scores.amax(dim=1, keepdim=True)  # (N, 1)
        exp = torch.sub(scores, top).exp_()  # (N, E)
        total = exp.sum(dim=1, keepdim=True)  # (N, 1)
        lse = (top + total.log()).squeeze(1)  # (N,)
        loss = lse - (1.0 - smoothing) * scores.gather(1, targets[:, None]).squeeze(1)
        if smoothing:
            loss = loss - smoothing * scores.mean(1)
        ctx.save_for_backward(targets, total)
        ctx.exp, ctx.smoothing = exp, smoothing  # not saved_tensors: the backward reuses it
        return loss.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        targets, total = ctx.saved_tensors
        g, e = ctx.exp, ctx.smoothing
        if g is None:
            raise RuntimeError("the fused cross-entropy supports one backward pass only")
        ctx.exp = None
        N, E = g.shape
        scale = grad / N
        g = g.mul_(scale / total)  # (N, E) softmax * grad / N, in place of exp
        if e:
            g.sub_(scale * (e / E))
        g.scatter_add_(1, targets[:, None], (scale * (e - 1.0)).expand(N, 1))
        return g, None, None
