"""HittER details the paper leaves to REFERENCE.md: LayerNorm epsilons and where the 0.6
"output" dropout applies (the scoring table in training, never in evaluation)."""

import pytest
import torch

from hitter_core import model as model_module
from hitter_core.config import HittERConfig
from hitter_core.kernels import Kernels, kernels_for
from hitter_core.model import HittER

E, R, D = 40, 5, 32


def small_model(**kw) -> HittER:
    torch.manual_seed(0)
    return HittER(HittERConfig(num_entities=E, num_relations=R, hidden_size=D,
                               num_attention_heads=4, intermediate_size=64, num_entity_layers=2,
                               num_context_layers=2, **kw))


def test_layer_norm_eps_placement():
    """REFERENCE.md "Small details": 1e-12 for the two input norms and inside the entity
    (BERT) layers, 1e-5 inside the context (torch) layers; the defaults give exactly that."""
    model = small_model()
    assert model.pair_norm.eps == 1e-12 and model.context_norm.eps == 1e-12
    for layer in model.pair_layers:
        assert layer.attn_norm.eps == layer.ffn_norm.eps == 1e-12
    for layer in model.context_layers:
        assert layer.attn_norm.eps == layer.ffn_norm.eps == 1e-5


@pytest.mark.parametrize("use_context", [True, False])
def test_output_dropout_on_the_scoring_table_in_training_only(monkeypatch, use_context):
    """The entity table that scores every answer gets ``output_dropout`` (0.6) in training,
    not ``hidden_dropout``; in eval mode the scores use the table as it is."""
    model = small_model(use_context=use_context, hidden_dropout=0.1, attention_dropout=0.1)
    table = model.entity_embeddings.weight
    dropped = []

    def recording_kernels(device: torch.device) -> Kernels:
        real = kernels_for(device)

        def dropout(x, p, training):
            out = real.dropout(x, p, training)
            if x is table:
                dropped.append((p, training, out))
            return out

        return Kernels(dropout=dropout, attention=real.attention,
                       cross_entropy=real.cross_entropy)

    monkeypatch.setattr(model_module, "kernels_for", recording_kernels)
    sources, relations = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 7])
    model.train()(sources, relations)
    (p, training, out), = dropped
    assert (p, training) == (0.6, True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.06  # 1,280 draws: sd ~0.014
    torch.testing.assert_close(out[kept], (table / 0.4)[kept])

    dropped.clear()
    model.eval()(sources, relations)
    (p, training, out), = dropped
    assert not training and out is table
