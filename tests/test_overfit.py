"""HittER learns a small synthetic graph by heart (no real data, seconds): the training loss
goes to ~0 and every training query ranks its answer first (MRR 1.0)."""

import torch

from hitter_core.batches import compute_loss, make_batch
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from hitter_core.optim import AdamaxW
from hitter_core.ranking import FilterIndex, ranking_metrics, realistic_rank


def random_graph(num_entities: int = 12, num_relations: int = 3, per_relation: int = 8,
                 seed: int = 0) -> KnowledgeGraph:
    """Each relation maps ``per_relation`` heads to tails through a random permutation, so
    that every tail and head query has one answer and a loss near 0 is reachable."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(num_relations):
        heads = torch.randperm(num_entities, generator=g)[:per_relation]  # (P,)
        tails = torch.randperm(num_entities, generator=g)[heads]  # (P,) distinct
        keep = heads != tails
        rows.append(torch.stack([heads, torch.full_like(heads, r), tails], 1)[keep])
    triples = torch.cat(rows)  # (T, 3)
    return KnowledgeGraph(
        name="synthetic", directory=None,
        entities=[f"e{i}" for i in range(num_entities)],
        relations=[f"r{i}" for i in range(num_relations)],
        entity_names=[f"e{i}" for i in range(num_entities)],
        splits={"train": triples, "valid": triples, "test": triples},
    )


STEPS = 300  # ~3 s on one thread; the loss is ~0.01 by then


def test_overfits_a_synthetic_graph(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    kg = random_graph()
    config = HittERConfig(
        num_entities=kg.num_entities, num_relations=kg.num_relations, hidden_size=32,
        num_attention_heads=2, intermediate_size=64, num_entity_layers=1,
        num_context_layers=1, max_neighbours=32, neighbour_drop=0.0, mep_self_dropout=0.0,
        attention_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0,
    )
    model = HittER(config).train()
    index = NeighbourIndex.build(kg, seed=0)
    optimizer = AdamaxW(model.parameters(), lr=0.02)
    for _ in range(STEPS):  # full batch: every triple's tail and head query
        loss, _ = compute_loss(model, make_batch(kg.train, index, config))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05

    # Each training query with the input it was trained on (its whole neighbourhood without
    # the ground-truth token), ranked among the entities that are not other train answers.
    model.eval()
    batch = make_batch(kg.train, index, config)
    nb = batch.neighbours
    with torch.no_grad():
        scores = model(batch.sources, batch.relations, nb.entities, nb.relations, nb.mask).scores
    scores = FilterIndex.build(kg, ["train"]).filter_scores(
        scores, batch.sources, batch.relations, batch.targets
    )
    assert ranking_metrics(realistic_rank(scores, batch.targets))["mrr"] == 1.0
