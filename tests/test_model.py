"""HittER model (hitter_core/model.py): shapes, consistency, MEP, parameter count, save/load."""

import types

import pytest
import torch

from hitter_core.config import HittERConfig
from hitter_core.model import HittER, HittEROutput, HittERScorer

E, R, D = 40, 5, 32


def tiny_config(**kw) -> HittERConfig:
    base = dict(
        num_entities=E, num_relations=R, hidden_size=D, num_attention_heads=4,
        intermediate_size=64, num_entity_layers=2, num_context_layers=2, type_vocab_size=3,
        max_neighbours=6,
    )
    return HittERConfig(**{**base, **kw})


def no_dropout(**kw) -> HittERConfig:
    return tiny_config(attention_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0, **kw)


def tiny_model(seed: int = 0, **kw) -> HittER:
    torch.manual_seed(seed)
    return HittER(tiny_config(**kw))


def batch(B: int = 5, N: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sources = torch.randint(E, (B,), generator=g)
    relations = torch.randint(2 * R, (B,), generator=g)
    nbr_e = torch.randint(E, (B, N), generator=g)
    nbr_r = torch.randint(2 * R, (B, N), generator=g)
    counts = torch.randint(0, N + 1, (B,), generator=g)
    counts[0] = N  # one full row so that N is the true width
    mask = torch.arange(N)[None, :] < counts[:, None]  # (B, N) real tokens first
    return sources, relations, nbr_e.masked_fill(~mask, 0), nbr_r.masked_fill(~mask, 0), mask


def test_shapes_and_outputs():
    model = tiny_model().eval()
    s, r, ne, nr, nm = batch(B=5, N=6)
    out = model(s, r, ne, nr, nm, output_hidden_states=True)
    assert isinstance(out, HittEROutput)
    assert out.scores.shape == (5, E)
    assert out.loss is None and out.lp_loss is None and out.mep_loss is None
    assert len(out.hidden_states) == 2
    assert all(h.shape == (5, 8, D) for h in out.hidden_states)
    assert out.attention_mask.dtype == torch.bool and out.attention_mask.shape == (5, 8)
    assert torch.equal(out.attention_mask[:, 2:], nm) and out.attention_mask[:, :2].all()
    assert torch.equal(out.hidden_states[-1][:, 0] @ model.entity_embeddings.weight.T, out.scores)
    assert model(s, r, ne, nr, nm).hidden_states is None


def test_loss_is_cross_entropy_with_label_smoothing():
    model = tiny_model(label_smoothing=0.1).eval()
    s, r, ne, nr, nm = batch()
    t = torch.randint(E, (len(s),))
    out = model(s, r, ne, nr, nm, targets=t)
    expected = torch.nn.functional.cross_entropy(out.scores, t, label_smoothing=0.1)
    assert torch.allclose(out.loss, expected) and torch.equal(out.loss, out.lp_loss)


def test_batch_equals_one_by_one():
    model = tiny_model().eval()
    s, r, ne, nr, nm = batch(B=6, N=6)
    with torch.no_grad():
        batched = model(s, r, ne, nr, nm, output_hidden_states=True)
        for i in range(len(s)):
            n = int(nm[i].sum())  # each query alone, without padding
            single = model(s[i : i + 1], r[i : i + 1], ne[i : i + 1, :n], nr[i : i + 1, :n],
                           nm[i : i + 1, :n], output_hidden_states=True)
            torch.testing.assert_close(single.scores[0], batched.scores[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(  # O(1) values, unlike the small scores at init
                single.hidden_states[-1][0], batched.hidden_states[-1][i, : 2 + n],
                rtol=1e-5, atol=1e-5,
            )


def test_extra_padding_changes_nothing():
    model = tiny_model().eval()
    s, r, ne, nr, nm = batch(B=4, N=6)
    g = torch.Generator().manual_seed(5)
    pad = 7  # padded slots with arbitrary (garbage) ids must be ignored
    ne2 = torch.cat([ne, torch.randint(E, (4, pad), generator=g)], 1)
    nr2 = torch.cat([nr, torch.randint(2 * R, (4, pad), generator=g)], 1)
    nm2 = torch.cat([nm, torch.zeros(4, pad, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = model(s, r, ne, nr, nm, output_hidden_states=True)
        b = model(s, r, ne2, nr2, nm2, output_hidden_states=True)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    real = a.attention_mask  # (B, 2+N): compare every real position of every layer
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(ha[real], hb[:, : 2 + 6][real], rtol=1e-5, atol=1e-5)


def test_neighbours_matter_with_context_and_not_without():
    s, r, ne, nr, nm = batch(B=4, N=6)
    ne_other = (ne + 1) % E
    ctx = tiny_model().eval()
    with torch.no_grad():
        assert not torch.allclose(ctx(s, r, ne, nr, nm).scores, ctx(s, r, ne_other, nr, nm).scores)
    plain = tiny_model(use_context=False).eval()
    assert not hasattr(plain, "context_layers")
    with torch.no_grad():
        ref = plain(s, r).scores
        torch.testing.assert_close(plain(s, r, ne, nr, nm).scores, ref)
        torch.testing.assert_close(plain(s, r, ne_other, nr, nm).scores, ref)
    assert ref.shape == (4, E)


def test_no_neighbours_given():
    model = tiny_model().eval()
    s, r, *_ = batch(B=3)
    out = model(s, r, output_hidden_states=True)
    assert out.scores.shape == (3, E) and out.attention_mask.shape == (3, 2)
    empty = torch.zeros(3, 0, dtype=torch.long)
    torch.testing.assert_close(
        model(s, r, empty, empty, empty.bool()).scores, out.scores, rtol=0, atol=0
    )


def test_type_embedding_rows():
    # Row 0 = GCLS, 1 = source, 2 = every neighbour; further rows are unused.
    model = tiny_model(type_vocab_size=5).eval()
    s, r, ne, nr, nm = batch()
    changes = {}
    shift = torch.randn(D, generator=torch.Generator().manual_seed(2))  # not constant: LN
    with torch.no_grad():
        before = model(s, r, ne, nr, nm).scores, model(s, r).scores
        for row in range(4):
            model.type_embeddings.weight[row] += shift
            after = model(s, r, ne, nr, nm).scores, model(s, r).scores
            model.type_embeddings.weight[row] -= shift
            changes[row] = tuple(
                not torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after, strict=True)
            )
    assert changes == {0: (True, True), 1: (True, True), 2: (True, False), 3: (False, False)}


def test_relation_table_has_reciprocal_rows():
    model = tiny_model().eval()
    assert model.relation_embeddings.num_embeddings == 2 * R
    s = torch.tensor([0, 1])
    assert model(s, torch.tensor([2 * R - 1, R])).scores.shape == (2, E)
    with pytest.raises(IndexError):
        model(s, torch.tensor([0, 2 * R]))


def test_eval_is_deterministic_and_training_is_not():
    model = tiny_model()
    s, r, ne, nr, nm = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(s, r, ne, nr, nm).scores, model(s, r, ne, nr, nm).scores)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(s, r, ne, nr, nm).scores, model(s, r, ne, nr, nm).scores)


def test_mep_sampling_proportions():
    # WN18RR's setting: 80% selected; of those 60% masked, 30% of the rest replaced.
    model = tiny_model(mep_self_dropout=0.8, mep_mask_prob=0.6, mep_replace_prob=0.3)
    torch.manual_seed(0)
    n = 200_000
    selected, masked, replaced = model._sample_mep(n, torch.device("cpu"))
    kept = selected & ~masked & ~replaced
    assert not (masked & replaced).any() and not ((masked | replaced) & ~selected).any()
    tol = 4 * (0.25 / n) ** 0.5  # 4 standard deviations at p = 0.5
    for share, expected in [(selected, 0.8), (masked, 0.48), (replaced, 0.096), (kept, 0.224)]:
        assert abs(share.float().mean().item() - expected) < tol
    sel = selected.sum()
    assert abs((masked.sum() / sel).item() - 0.6) < 2 * tol
    assert abs((replaced.sum() / sel).item() - 0.12) < 2 * tol


def test_mep_mask_hides_the_source_entity():
    torch.manual_seed(0)
    model = HittER(no_dropout(mep_self_dropout=1.0, mep_mask_prob=1.0)).train()
    _, r, ne, nr, nm = batch(B=1, N=6)
    s1, s2 = torch.tensor([3]), torch.tensor([17])
    # Every source is masked, so the source entity no longer matters in training ...
    torch.testing.assert_close(model(s1, r, ne, nr, nm).scores, model(s2, r, ne, nr, nm).scores)
    # ... but it does in evaluation, where MEP is off.
    model.eval()
    assert not torch.allclose(model(s1, r, ne, nr, nm).scores, model(s2, r, ne, nr, nm).scores)


def test_mep_keep_changes_nothing():
    torch.manual_seed(0)
    s, r, ne, nr, nm = batch()
    keep = HittER(no_dropout(mep_self_dropout=1.0, mep_mask_prob=0.0)).train()
    expected = keep.eval()(s, r, ne, nr, nm).scores
    torch.testing.assert_close(keep.train()(s, r, ne, nr, nm).scores, expected)


def test_mep_replacement_is_detached():
    # Sources 20.., neighbours among 0..4: through the context output, only neighbour rows
    # may receive gradient when every source is masked or replaced by a detached entity.
    s = torch.arange(20, 28)
    r = torch.zeros(8, dtype=torch.long)
    ne = torch.arange(8 * 3).view(8, 3) % 5
    nr, nm = torch.ones_like(ne), torch.ones(8, 3, dtype=torch.bool)
    touched = {}
    for name, mask_prob, replace_prob in [("keep", 0.0, 0.0), ("replace", 0.0, 1.0),
                                          ("mask", 1.0, 0.0)]:
        torch.manual_seed(0)
        model = HittER(no_dropout(mep_self_dropout=1.0, mep_mask_prob=mask_prob,
                                  mep_replace_prob=replace_prob)).train()
        out = model(s, r, ne, nr, nm, output_hidden_states=True)
        # GCLS and source outputs (not the scoring table); a random projection, since the sum
        # of a LayerNorm output does not depend on its input.
        proj = torch.randn(D, generator=torch.Generator().manual_seed(1))
        (out.hidden_states[-1][:, :2] @ proj).sum().backward()
        grad = model.entity_embeddings.weight.grad.abs().sum(1)  # (E,)
        touched[name] = set(grad.nonzero().flatten().tolist())
    assert touched["keep"] == set(range(5)) | set(range(20, 28))
    assert touched["replace"] == set(range(5)) and touched["mask"] == set(range(5))


def test_mep_aux_loss_combination():
    s, r, ne, nr, nm = batch(B=8)
    t = torch.randint(E, (8,))
    torch.manual_seed(0)
    model = HittER(tiny_config(mep_self_dropout=0.8, mep_aux_loss=True)).train()
    out = model(s, r, ne, nr, nm, targets=t)
    assert out.mep_loss is not None and out.mep_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lp_loss + (0.8 / 1.8) * out.mep_loss)
    out.loss.backward()
    assert model.mask_vector.grad is not None and model.mask_vector.grad.abs().sum() > 0
    off = HittER(tiny_config(mep_self_dropout=0.8, mep_aux_loss=False)).train()
    out = off(s, r, ne, nr, nm, targets=t)
    assert out.mep_loss is None and torch.equal(out.loss, out.lp_loss)
    assert model.eval()(s, r, ne, nr, nm, targets=t).mep_loss is None  # training only


def test_gradients_reach_every_parameter():
    model = tiny_model(mep_self_dropout=0.5, mep_aux_loss=True).train()
    s, r, ne, nr, nm = batch(B=16)
    torch.manual_seed(3)
    model(s, r, ne, nr, nm, targets=torch.randint(E, (16,))).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize("mep", [0.0, 0.7])
def test_dedup_in_training_matches_per_copy_encoding(mep):
    # Many repeated pairs (also a source pair equal to another row's neighbour pair): with
    # dropout off, shared encoding must give the same result, MEP-perturbed sources included.
    s = torch.tensor([1, 1, 2, 3, 2, 1])
    r = torch.tensor([0, 0, 4, 0, 1, 0])
    ne = torch.tensor([[2, 3, 2, 1], [2, 3, 0, 0], [1, 1, 5, 0], [1, 0, 0, 0], [2, 3, 0, 0],
                       [1, 2, 0, 0]])
    nr = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0], [1, 1, 0, 0],
                       [0, 4, 0, 0]])
    nm = ne.new_tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                        [1, 1, 0, 0]]).bool()
    s, r, ne, nr, nm = s.repeat(4), r.repeat(4), ne.repeat(4, 1), nr.repeat(4, 1), nm.repeat(4, 1)
    outs = []
    for dedup in (False, True):
        torch.manual_seed(0)
        model = HittER(no_dropout(mep_self_dropout=mep, mep_mask_prob=0.5, mep_replace_prob=0.5,
                                  dedup_pairs_in_training=dedup)).train()
        torch.manual_seed(1)  # the same MEP draws in both runs
        outs.append(model(s, r, ne, nr, nm, output_hidden_states=True).hidden_states[-1])
    # Hidden states are O(1); scores at init are small, so they would hide differences.
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    if mep == 0:  # evaluation always deduplicates
        out = model.eval()(s, r, ne, nr, nm, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dedup", [False, True])
def test_repeated_pairs_share_dropout_only_with_dedup(dedup):
    # Two identical queries in one batch; only the 0.6 input dropout of the entity Transformer
    # is random. Encoded once, their pairs share its draws and the rows agree exactly;
    # encoded per copy (the reference), each copy draws its own and the rows differ.
    s, r, ne, nr, nm = batch(B=3)
    s, r, ne, nr, nm = s[[0, 0, 1]], r[[0, 0, 1]], ne[[0, 0, 1]], nr[[0, 0, 1]], nm[[0, 0, 1]]
    torch.manual_seed(0)
    model = HittER(tiny_config(attention_dropout=0.0, hidden_dropout=0.0, output_dropout=0.6,
                               mep_self_dropout=0.0, dedup_pairs_in_training=dedup)).train()
    head = model(s, r, ne, nr, nm, output_hidden_states=True).hidden_states[-1][:, 0]  # (3, D)
    assert torch.equal(head[0], head[1]) == dedup
    assert not torch.allclose(head[0], head[2], atol=1e-3)


def test_encode_ignores_mep_and_input_dropout():
    s, r, ne, nr, nm = batch()
    torch.manual_seed(0)
    # Internal dropouts off, input dropout 0.6 and MEP on every example: in training mode
    # encode() must still equal evaluation, while forward() must not.
    model = HittER(tiny_config(attention_dropout=0.0, hidden_dropout=0.0, output_dropout=0.6,
                               mep_self_dropout=1.0))
    hidden_train, mask = model.train().encode(s, r, ne, nr, nm)
    hidden_eval, mask_eval = model.eval().encode(s, r, ne, nr, nm)
    assert len(hidden_train) == 2 and hidden_train[0].shape == (5, 8, D)
    assert torch.equal(mask, mask_eval) and mask.shape == (5, 8)
    for a, b in zip(hidden_train, hidden_eval, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fwd = model.train()(s, r, ne, nr, nm, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(fwd, hidden_eval[-1], atol=1e-3)


def test_encode_keeps_internal_dropout_in_training():
    model = tiny_model(output_dropout=0.0, mep_self_dropout=0.0).train()
    s, r, ne, nr, nm = batch()
    a, _ = model.encode(s, r, ne, nr, nm)
    b, _ = model.encode(s, r, ne, nr, nm)
    assert not torch.equal(a[-1], b[-1])


def test_save_load_round_trip(tmp_path):
    model = tiny_model(dataset="toy", mep_aux_loss=True).eval()
    s, r, ne, nr, nm = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = HittER.from_pretrained(tmp_path).eval()
    assert loaded.config.dataset == "toy" and loaded.config.mep_aux_loss is True
    with torch.no_grad():
        assert torch.equal(model(s, r, ne, nr, nm).scores, loaded(s, r, ne, nr, nm).scores)


def test_scorer_gathers_eval_neighbourhoods():
    model = tiny_model().train()
    s, r, ne, nr, nm = batch(B=4)
    calls = []

    class FakeIndex:
        def gather(self, sources, max_neighbours, train=False, full_width=False):
            calls.append((max_neighbours, train, full_width))
            return types.SimpleNamespace(entities=ne, relations=nr, mask=nm)

    scores = HittERScorer(model, FakeIndex())(s, r)
    assert calls == [(model.config.max_neighbours, False, model.config.shape_buckets > 0)]
    assert model.training  # the scorer restores the mode it found
    with torch.no_grad():
        torch.testing.assert_close(scores, model.eval()(s, r, ne, nr, nm).scores)
    assert not scores.requires_grad


def count(config: HittERConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in HittER(config).parameters())


def test_parameter_count_of_the_paper_models():
    paper = HittERConfig(num_entities=14541, num_relations=237)
    assert count(paper) == 15_936_640  # REFERENCE.md
    assert count(HittERConfig(type_vocab_size=3)) == 15_936_640 - 97 * 320
    wn18rr = count(HittERConfig(num_entities=40943, num_relations=11, max_neighbours=12))
    assert wn18rr == 24_240_640  # "~24M" (paper Table 1)
