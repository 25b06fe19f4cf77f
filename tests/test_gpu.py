"""The CUDA path of HittER (`pytest -m gpu` on a GPU machine; bench/gpu/suite.sh runs them).

Tests marked ``gpu`` skip without a CUDA device; the unmarked ones check on CPU what the CUDA
path relies on (fp32 scores under bf16 autocast, chunked attention), so CI keeps them honest.
This module imports only torch and hitter_core: it is collected without deepspeed, datasets or
evaluate (tests/conftest.py)."""

import dataclasses

import pytest
import torch

from hitter_core import kernels
from hitter_core.batches import compute_loss, make_batch
from hitter_core.config import HittERConfig
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

E, R = 40, 4


def tiny_config(**kwargs) -> HittERConfig:
    values = dict(num_entities=E, num_relations=R, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, num_entity_layers=2, num_context_layers=2,
                  max_neighbours=8)
    return HittERConfig(**{**values, **kwargs})


def no_dropout(config: HittERConfig) -> HittERConfig:
    config.hidden_dropout = config.attention_dropout = config.output_dropout = 0.0
    config.mep_self_dropout = config.neighbour_drop = 0.0
    return config


def random_triples(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    triples = torch.stack([torch.randint(E, (n,), generator=g), torch.randint(R, (n,), generator=g),
                           torch.randint(E, (n,), generator=g)], 1)
    return torch.unique(triples[triples[:, 0] != triples[:, 2]], dim=0)


@pytest.fixture
def graph():
    triples = random_triples()
    return triples, NeighbourIndex.from_triples(triples, E, R)


def batch_to(batch, device):
    return dataclasses.replace(
        batch, sources=batch.sources.to(device), relations=batch.relations.to(device),
        targets=batch.targets.to(device), neighbours=batch.neighbours.to(device))


def loss_and_grads(model: HittER, batch, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch.sources.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters()
                           if p.grad is not None}


# ------------------------------------------------------------------ checked on CPU as well


def test_scores_stay_fp32_under_bf16_autocast(graph):
    """The 1vsAll scores (and so the loss and the ranking) are float32 under bf16 autocast,
    where a plain product of the last layer's output and the table would be bf16."""
    triples, index = graph
    model = HittER(tiny_config()).eval()
    batch = make_batch(triples[:16], index, model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.sources, batch.relations, batch.neighbours.entities,
                    batch.neighbours.relations, batch.neighbours.mask,
                    output_hidden_states=True)
    assert out.scores.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (out.hidden_states[-1][:, 0] @ model.entity_embeddings.weight.T).dtype == (
            torch.bfloat16)
        context_free = HittER(tiny_config(use_context=False)).eval()
        assert context_free(batch.sources, batch.relations).scores.dtype == torch.float32


def test_attention_in_chunks_matches_one_call(monkeypatch):
    """Batches above MAX_SDPA_BATCH rows (CUDA's grid limit) are split; the result is the
    same as one call (no dropout)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 3, 2, 4, generator=g)
    kv = torch.randn(10, 3, 2, 2, 4, generator=g)
    mask = torch.rand(10, 1, 1, 3, generator=g) > 0.3
    mask[:, ..., 0] = True
    whole = kernels.sdpa_attention(q, kv, mask, 0.0)
    monkeypatch.setattr(kernels, "MAX_SDPA_BATCH", 4)
    torch.testing.assert_close(kernels.sdpa_attention(q, kv, mask, 0.0), whole)
    no_mask = kernels.sdpa_attention(q, kv, None, 0.0)
    monkeypatch.setattr(kernels, "MAX_SDPA_BATCH", 100)
    torch.testing.assert_close(no_mask, kernels.sdpa_attention(q, kv, None, 0.0))


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@cuda
def test_cuda_fp32_matches_cpu_fp64(graph):
    """Dropout off: scores, loss and gradients of the CUDA model (fp32, TF32 off) equal the
    CPU model's in float64 within float32 rounding."""
    triples, index = graph
    torch.manual_seed(0)
    reference = HittER(no_dropout(tiny_config())).double().train()
    model = HittER(no_dropout(tiny_config())).cuda().train()
    model.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    batch = make_batch(triples[:32], index, reference.config)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss64, grads64 = loss_and_grads(reference, batch)
        loss32, grads32 = loss_and_grads(model, batch_to(batch, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    assert grads32.keys() == grads64.keys()
    for name, grad in grads64.items():
        torch.testing.assert_close(grads32[name].double().cpu(), grad, rtol=1e-3, atol=1e-6,
                                   msg=name)


@pytest.mark.gpu
@cuda
def test_bf16_autocast_close_to_fp32(graph):
    """Under bf16 autocast (the engine's torch_autocast) loss and gradients stay close to fp32:
    loss within 2% and every gradient tensor at cosine similarity >= 0.98."""
    triples, index = graph
    torch.manual_seed(0)
    model = HittER(no_dropout(tiny_config())).cuda().train()
    batch = make_batch(triples[:64], index.to("cuda"), model.config)
    loss32, grads32 = loss_and_grads(model, batch)
    loss16, grads16 = loss_and_grads(model, batch, bf16=True)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32, name  # fp32 master weights
        if grad.norm() > 1e-8:
            cosine = torch.nn.functional.cosine_similarity(
                grads16[name].flatten(), grad.flatten(), dim=0)
            assert cosine >= 0.98, (name, cosine.item())


@pytest.mark.gpu
@cuda
def test_sdpa_matches_manual_attention():
    """torch's SDPA with a bool key mask (the CUDA kernels) equals softmax attention written
    out at p = 0; with dropout it keeps the shape and finite values."""
    g = torch.Generator().manual_seed(0)
    B, L, H, d = 64, 9, 4, 8
    q = torch.randn(B, L, H, d, generator=g).cuda()
    kv = torch.randn(B, L, 2, H, d, generator=g).cuda()
    lengths = torch.randint(1, L + 1, (B,), generator=g).cuda()
    mask = (torch.arange(L, device="cuda") < lengths[:, None])[:, None, None, :]
    got = kernels.sdpa_attention(q, kv, mask, 0.0)
    k, v = kv[:, :, 0], kv[:, :, 1]  # (B, L, H, d)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
    weights = weights.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    dropped = kernels.sdpa_attention(q, kv, mask, 0.1)
    assert dropped.shape == got.shape and torch.isfinite(dropped).all()


@pytest.mark.gpu
@cuda
def test_neighbour_gathering_on_cuda(graph):
    """Evaluation neighbourhoods are the same on CUDA as on CPU; training ones keep their
    invariants: only real neighbours, kept tokens first, the ground-truth token removed."""
    triples, index = graph
    gpu = index.to("cuda")
    sources = torch.arange(E)
    cpu_nb, gpu_nb = index.gather(sources, 8), gpu.gather(sources.cuda(), 8)
    for a, b in zip(cpu_nb, gpu_nb, strict=True):
        assert torch.equal(a, b.cpu())
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch = triples[:32].cuda()
    nb = gpu.gather(batch[:, 0], 8, train=True, exclude_entity=batch[:, 2],
                    exclude_relation=batch[:, 1] + R, drop=0.2, generator=generator)
    assert nb.entities.device.type == "cuda"
    kept = nb.mask.sum(1)
    assert torch.equal(nb.mask, torch.arange(nb.mask.shape[1], device="cuda") < kept[:, None])
    for i, source in enumerate(batch[:, 0].tolist()):
        entities, relations = index.neighbours_of(source)
        real = set(zip(entities.tolist(), relations.tolist(), strict=True))
        got = set(zip(nb.entities[i][nb.mask[i]].tolist(), nb.relations[i][nb.mask[i]].tolist(),
                      strict=True))
        assert got <= real
        assert (batch[i, 2].item(), batch[i, 1].item() + R) not in got


@pytest.mark.gpu
@cuda
def test_entity_transformer_above_65535_pairs():
    """The entity Transformer's batch is the number of distinct pairs: 70,000 of them run
    forward and backward on CUDA (attention in chunks) and match the rows run alone."""
    torch.manual_seed(0)
    config = no_dropout(tiny_config(num_entities=70_000, num_relations=2))
    model = HittER(config).cuda().train()
    entities = torch.arange(70_000, device="cuda")
    relations = entities % 2
    vectors = model.entity_embeddings(entities)
    out = model._encode_pairs(vectors, relations, input_dropout=False)  # (70000, D)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all() and model.entity_embeddings.weight.grad is not None
    with torch.no_grad():
        tail = model._encode_pairs(vectors[-100:], relations[-100:], input_dropout=False)
    torch.testing.assert_close(out[-100:].detach(), tail, rtol=1e-4, atol=1e-5)
