"""Static shapes (``model.shape_buckets``): the entity Transformer's pair rows and the context
Transformer's packed tokens are padded to a few bucket sizes and the neighbour width to
``max_neighbours``, without changing any result."""

import pytest
import torch

from hitter_core.batches import compute_loss, make_batch
from hitter_core.layers import bucket_size
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from tests.test_gpu import E, R, no_dropout, random_triples, tiny_config


def test_bucket_size_rounds_up_within_an_eighth():
    assert [bucket_size(n, 8) for n in (1, 7, 16)] == [1, 7, 16]  # small sizes stay
    assert bucket_size(5300, 8) == 5632 and bucket_size(24_500, 8) == 24_576
    assert bucket_size(5300, 0) == 5300  # 0: exact shapes
    sizes = set()
    for n in range(17, 5000):
        b = bucket_size(n, 8)
        assert n <= b <= n * 9 / 8, n
        sizes.add(b)
    assert len({b for b in sizes if 2048 < b <= 4096}) == 8  # 8 sizes an octave


def twin_models(**kwargs):
    torch.manual_seed(0)
    exact = HittER(tiny_config(shape_buckets=0, **kwargs))
    bucketed = HittER(tiny_config(shape_buckets=2, **kwargs))
    bucketed.load_state_dict(exact.state_dict())
    return exact, bucketed


def test_buckets_change_no_eval_result():
    """Eval mode: the same scores and hidden states (zeros at padding) with and without
    buckets, though the bucketed model runs more rows and a full-width neighbourhood."""
    triples = random_triples()
    index = NeighbourIndex.from_triples(triples, E, R)
    exact, bucketed = (m.eval() for m in twin_models())
    src, rel = torch.arange(70) % E, torch.arange(70) % (2 * R)
    rows = []
    bucketed.context_layers[0].register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[0]))
    nb = index.gather(src, 8)
    wide = index.gather(src, 8, full_width=True)
    assert wide.entities.shape[1] == 8 and nb.entities.shape[1] <= 8
    with torch.no_grad():
        a = exact(src, rel, *nb, output_hidden_states=True)
        b = bucketed(src, rel, *wide, output_hidden_states=True)
    real_tokens = int(a.attention_mask.sum())
    grid = 70 * (2 + 8)  # at most every cell of the padded (B, 2 + N) grid
    assert rows[0] == min(bucket_size(real_tokens, 2), grid) > real_tokens  # padding rows ran
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-5)
    n = a.hidden_states[0].shape[1]
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(hb[:, :n], ha, rtol=1e-5, atol=1e-5)
        assert not hb[:, n:].any()  # the extra width is padding: zeros


def test_buckets_change_no_training_loss_or_gradient():
    """Train mode without dropout: the same loss and gradients (the padding rows get none)."""
    triples = random_triples()
    index = NeighbourIndex.from_triples(triples, E, R)
    models = twin_models()
    results = []
    for model in models:
        no_dropout(model.config)
        model.train()
        torch.manual_seed(1)  # the same neighbour sample for both
        loss, _ = compute_loss(model, make_batch(triples[:40], index, model.config))
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()
                               if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("buckets, most", [(8, 3), (0, None)])
def test_an_epoch_sees_few_shapes(buckets, most):
    """Training batches of a real-sized distribution of pair counts: with buckets a handful
    of distinct (pairs, tokens, width) shapes, without them nearly one per batch."""
    triples = random_triples(2000, seed=3)
    index = NeighbourIndex.from_triples(triples, E, R)
    torch.manual_seed(0)
    model = HittER(tiny_config(shape_buckets=buckets)).train()
    shapes, pairs = set(), []
    model.pair_layers[0].register_forward_pre_hook(lambda m, a: pairs.append(a[0].shape[0]))
    model.context_layers[0].register_forward_pre_hook(
        lambda m, a: shapes.add((pairs[-1], a[0].shape[0], a[1].batch, a[1].length)))
    with torch.no_grad():
        for start in range(0, 1600, 100):
            compute_loss(model, make_batch(triples[start:start + 100], index, model.config))
    if most is None:
        assert len(shapes) > 8
    else:
        assert len(shapes) <= most
