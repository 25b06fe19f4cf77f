"""HittER's layers (hitter_core/layers.py) and the CPU kernels behind hitter_core/kernels.py:
parity with torch's reference modules and ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hitter_core import cpu_kernels
from hitter_core.config import HittERConfig
from hitter_core.cpu_kernels import (
    _ShortAttention,
    cross_entropy,
    dropout,
    keep_mask,
    short_attention,
)
from hitter_core.kernels import CPU, STANDARD, kernels_for, sdpa_attention
from hitter_core.layers import Packing, PostLNLayer

D, H, FFN = 16, 4, 24


def packed_layer_and_torch_reference(seed: int = 0) -> tuple[PostLNLayer, nn.Module]:
    torch.manual_seed(seed)
    config = HittERConfig(hidden_size=D, num_attention_heads=H, intermediate_size=FFN)
    layer = PostLNLayer(config, eps=1e-5, ffn_dropout=True).eval()
    ref = nn.TransformerEncoderLayer(D, H, FFN, dropout=0.0, activation="gelu",
                                     layer_norm_eps=1e-5, batch_first=True).eval()
    with torch.no_grad():
        for p in layer.parameters():  # not the default init: LayerNorms too
            p.normal_(0.0, 0.3)
        ref.self_attn.in_proj_weight.copy_(layer.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(layer.qkv.bias)
        for mine, theirs in [(layer.attn_out, ref.self_attn.out_proj),
                             (layer.ffn_in, ref.linear1), (layer.ffn_out, ref.linear2),
                             (layer.attn_norm, ref.norm1), (layer.ffn_norm, ref.norm2)]:
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return layer, ref


def test_packed_layer_equals_torch_encoder_layer_on_real_tokens():
    layer, ref = packed_layer_and_torch_reference()
    B, L = 4, 7
    lengths = torch.tensor([7, 2, 5, 3])
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L) True = real
    x = torch.randn(B, L, D)
    positions = mask.flatten().nonzero().squeeze(1)
    packing = Packing(B, L, positions, torch.cumsum(lengths, 0) - lengths, mask[:, None, None, :])
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=~mask)  # (B, L, D)
        got = layer(x.view(B * L, D)[positions], packing)  # (T, D)
        first2 = layer(x.view(B * L, D)[positions], packing, first=2)  # (B * 2, D)
    torch.testing.assert_close(got, expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first2.view(B, 2, D), expected[:, :2], rtol=1e-5, atol=1e-5)


def test_dense_packing_without_padding():
    layer, ref = packed_layer_and_torch_reference(seed=1)
    P = 6
    x = torch.randn(P, 3, D)
    packing = Packing(P, 3, None, torch.arange(0, 3 * P, 3), None)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(layer(x.view(-1, D), packing).view(P, 3, D), expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x.view(-1, D), packing, first=1), expected[:, 0],
                                   rtol=1e-5, atol=1e-5)


def test_packed_layer_gradients_match_padded_training_path():
    # Dropout off: the packed layer in training mode (its manual attention path on CPU is taken
    # only with dropout, so here SDPA) must give torch's gradients.
    layer, ref = packed_layer_and_torch_reference(seed=2)
    layer.train()
    B, L = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()
    x = torch.randn(B, L, D)
    positions = mask.flatten().nonzero().squeeze(1)
    lengths = mask.sum(1)
    packing = Packing(B, L, positions, torch.cumsum(lengths, 0) - lengths, mask[:, None, None, :])
    layer.attention_dropout = layer.hidden_dropout = layer.ffn_dropout = 0.0
    out = layer(x.view(B * L, D)[positions], packing)
    out.pow(2).sum().backward()
    ref(x, src_key_padding_mask=~mask)[mask].pow(2).sum().backward()
    torch.testing.assert_close(layer.qkv.weight.grad, ref.self_attn.in_proj_weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.ffn_in.weight.grad, ref.linear1.weight.grad,
                               rtol=1e-4, atol=1e-5)


def q_and_kv(B: int, L: int, heads: int, d: int, Lq: int | None = None):
    """q (B, Lq, heads, d) and kv (B, L, 2, heads, d) as the layer makes them (float64)."""
    q = torch.randn(B, Lq or L, heads, d, dtype=torch.float64, requires_grad=True)
    return q, torch.randn(B, L, 2, heads, d, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("Lq", [3, 1])
def test_short_attention_equals_sdpa_values_and_gradients(Lq):
    torch.manual_seed(0)
    q, kv = q_and_kv(5, 3, 4, 8, Lq)
    ours = short_attention(q, kv, 0.0)  # (B, Lq, H, d)
    k, v = kv.permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
    theirs = F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, (q, kv), g), torch.autograd.grad(theirs, (q, kv), g)
    )


def test_short_attention_dropout_draws_the_keep_mask_and_its_gradient_holds():
    torch.manual_seed(1)
    q, kv = q_and_kv(6, 3, 2, 4)
    p = 0.4
    torch.manual_seed(7)
    ours = short_attention(q, kv, p)
    torch.manual_seed(7)
    keep = keep_mask((6, 3, 2, 3), p)  # (B, Lq, H, L): the draw short_attention makes
    assert 0 < keep.sum() < keep.numel()
    k, v = kv.unbind(2)  # (B, L, H, d)
    weights = (torch.einsum("bihd,bjhd->bhij", q, k) / 2.0).softmax(-1)  # sqrt(d) = 2
    dropped = weights * keep.permute(0, 2, 1, 3) / (1 - p)  # (B, H, Lq, L)
    torch.testing.assert_close(ours, torch.einsum("bhij,bjhd->bihd", dropped, v))
    # Backward written out: check it against finite differences with the mask fixed.
    for Lq in (3, 2):
        q, kv = q_and_kv(4, 3, 2, 4, Lq)
        keep = keep_mask((4, Lq, 2, 3), p)
        assert torch.autograd.gradcheck(_ShortAttention.apply, (q, kv, keep, 1 / (1 - p)))


def test_dense_layer_gradients_match_torch_in_training():
    # The entity Transformer's case: no padding, training mode, CPU (short_attention).
    layer, ref = packed_layer_and_torch_reference(seed=3)
    layer.train()
    layer.attention_dropout = layer.hidden_dropout = layer.ffn_dropout = 0.0
    P = 5
    x = torch.randn(P, 3, D)
    packing = Packing(P, 3, None, torch.arange(0, 3 * P, 3), None)
    layer(x.view(-1, D), packing).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for mine, theirs in [(layer.qkv.weight, ref.self_attn.in_proj_weight),
                         (layer.qkv.bias, ref.self_attn.in_proj_bias),
                         (layer.ffn_in.weight, ref.linear1.weight)]:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_dropout_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropout(x, p, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 200k draws: sd ~0.001
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient = mask * scale
    assert dropout(x, p, training=False) is x and dropout(x, 0.0, training=True) is x
    assert not dropout(x, 1.0, training=True).any()


def test_dropout_follows_the_torch_seed():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.3, True)) and not torch.equal(a, dropout(x, 0.3, True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_matches_torch(smoothing):
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(32, 300, generator=g) * 5).requires_grad_()
    targets = torch.randint(300, (32,), generator=g)
    ours = cross_entropy(scores, targets, smoothing)
    (grad_ours,) = torch.autograd.grad(2.5 * ours, scores)
    theirs = F.cross_entropy(scores, targets, label_smoothing=smoothing)
    (grad_theirs,) = torch.autograd.grad(2.5 * theirs, scores)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-8)


def test_fused_cross_entropy_is_stable_for_large_scores():
    scores = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 2000.0, 0.0]], requires_grad=True)
    loss = cross_entropy(scores, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0)
    assert torch.isfinite(scores.grad).all()


def test_kernels_are_chosen_by_device():
    assert kernels_for(torch.device("cpu")) is CPU
    assert kernels_for(torch.device("cuda", 0)) is STANDARD
    assert CPU.dropout is cpu_kernels.dropout and STANDARD.attention is sdpa_attention


@pytest.mark.parametrize("L, masked", [(3, False), (7, True)])
def test_cpu_attention_equals_sdpa_without_dropout(L, masked):
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(5, L, 2, 8, generator=g), torch.randn(5, L, 2, 2, 8, generator=g)
    mask = torch.rand(5, 1, 1, L, generator=g) < 0.7 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every row keeps a key
    torch.testing.assert_close(cpu_kernels.attention(q, kv, mask, 0.0),
                               sdpa_attention(q, kv, mask, 0.0))
