"""CPU versions of dropout, attention and cross-entropy: the same computations as torch's,
faster on CPU (measured by ``bench/attention_speed.py`` and ``bench/train_speed.py``;
bench/RESULTS.md gives the figures). The model never calls them directly:
:func:`hitter_core.kernels.kernels_for` hands them out on CPU and torch's own ops elsewhere.

* :func:`dropout`: inverted dropout whose keep mask comes from numpy's SFC64 generator as
  16-bit integers and stays a bool mask for the backward.
* :func:`attention`: :func:`short_attention` for the entity Transformer's 3 tokens; the masked
  attention of training spelled out to use :func:`dropout`; torch's SDPA otherwise.
* :func:`cross_entropy`: a fused softmax cross-entropy that writes its gradient in one pass.
"""

import numpy as np
import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout``, for CPU tensors. The keep mask compares random
    16-bit integers with ``p`` (:func:`random_int16`), about 3x faster than ``F.dropout``'s
    ``bernoulli_`` on CPU; ``p`` is thereby rounded to a multiple of 2^-16 (float32 ``rand``
    rounds to 2^-24). The mask stays bool, for the backward too (:class:`_MaskedScale`): a
    float mask cost about 10% of a FB15K-237 paper-config training step on 2 CPU threads."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
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


def attention(
    q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """Scaled dot-product attention as :func:`hitter_core.kernels.sdpa_attention` (same
    arguments and shapes), for CPU tensors. Torch's SDPA, except in two cases where it is
    slower on CPU:

    * a few keys and no padding (the entity Transformer's 3 tokens): :func:`short_attention`;
    * dropout with padding (context layers in training): spelled out to use the cheaper
      :func:`dropout` (SDPA then takes its unfused path with ``bernoulli_`` anyway)."""
    if key_mask is None and kv.shape[1] <= SHORT_ATTENTION_KEYS:
        return short_attention(q, kv, dropout_p)
    q, k, v = q.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4)  # (B, H, L*, D/H) each
    if not dropout_p or key_mask is None:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    else:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, L)
        # The softmax in float32 under bf16 autocast too (CUDA's autocast does so; CPU's not).
        weights = scores.to(at_least_float32(scores.dtype))
        weights = weights.masked_fill(~key_mask, float("-inf")).softmax(-1)
        a = dropout(weights, dropout_p, True).to(v.dtype) @ v
    return a.transpose(1, 2)  # (B, Lq, H, D/H)


SHORT_ATTENTION_KEYS = 4  # up to this many keys, CPU attention runs as short_attention


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention weights are computed in: float32 for bf16 / fp16, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


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
    the inputs' shapes, so that no stacking follows. Scores, weights and the output are at
    least float32 (:func:`at_least_float32`; under bf16 autocast a softmax in float32, as
    CUDA's autocast runs it); the gradients have the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, kv, keep, scale):
        B, Lq, H, d = q.shape
        L = kv.shape[1]
        s = q.new_empty(B, Lq, H, L, dtype=at_least_float32(q.dtype))
        for j in range(L):
            torch.sum(q * kv[:, None, j, 0], -1, dtype=s.dtype, out=s[..., j])
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
        dw = w.new_empty(B, Lq, H, L)  # at least float32, as w
        for j in range(L):
            torch.sum(g * kv[:, None, j, 1], -1, dtype=dw.dtype, out=dw[..., j])
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
        return dq.to(q.dtype), dkv, None, None


def cross_entropy(
    scores: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean softmax cross-entropy of (N, E) float scores against (N,) targets, with label
    smoothing: the value and gradient of ``F.cross_entropy``. A fused version keeps
    only the log-normaliser and writes the gradient softmax - smoothed target in one go,
    about twice as fast over 1vsAll scores (N x 14,541 for FB15K-237). Other dtypes (bf16
    autocast) go to ``F.cross_entropy``."""
    if scores.dtype != torch.float32:
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
