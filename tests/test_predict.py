"""python -m hitter_core.predict: names resolve (or fail with the candidates), and a model that
learned a small graph by heart returns the graph's answers first, marked as known facts. (A
context-free HittER: with one or two neighbours per entity, the evaluation neighbourhoods, which
hold the answer token that training removes, are too unlike the training inputs.)"""

import pytest
import torch

from hitter_core.batches import compute_loss, make_batch
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from hitter_core.optim import AdamaxW
from hitter_core.predict import AmbiguousName, find_entity, find_relation, predict

NAMES = ["Paris", "France", "Berlin", "Germany", "Rome", "Italy", "Springfield", "Springfield"]
RELATIONS = ["/location/capital_of", "/location/contains"]
# capital_of: Paris->France, Berlin->Germany, Rome->Italy; contains: the reverse.
TRIPLES = [(0, 0, 1), (2, 0, 3), (4, 0, 5), (1, 1, 0), (3, 1, 2), (5, 1, 4), (6, 1, 7)]


@pytest.fixture(scope="module")
def trained():
    triples = torch.tensor(TRIPLES)
    kg = KnowledgeGraph(name="toy", directory=None, entities=[f"/m/{i}" for i in range(8)],
                        relations=RELATIONS, entity_names=NAMES,
                        splits={"train": triples[:5], "valid": triples[5:6],
                                "test": triples[6:]})
    torch.manual_seed(0)
    config = HittERConfig(num_entities=8, num_relations=2, hidden_size=32, num_attention_heads=2,
                          intermediate_size=64, num_entity_layers=1, use_context=False,
                          attention_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0)
    model, index = HittER(config).train(), NeighbourIndex.from_triples(triples, 8, 2)
    optimizer = AdamaxW(model.parameters(), lr=0.02)
    for _ in range(200):  # the train split by heart
        loss, _ = compute_loss(model, make_batch(kg.train, index, config))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), kg, index


def test_names_and_relations_resolve(trained):
    _, kg, _ = trained
    assert find_entity(kg, "Paris") == 0 and find_entity(kg, "paris") == 0
    assert find_entity(kg, "/m/7") == 7  # identifiers win
    assert find_relation(kg, "capital_of") == 0 and find_relation(kg, RELATIONS[1]) == 1
    with pytest.raises(AmbiguousName, match=r"'Springfield' names 2 entities: /m/6 .*/m/7"):
        find_entity(kg, "Springfield")
    with pytest.raises(AmbiguousName, match="close names: Berlin"):
        find_entity(kg, "Berlim")
    with pytest.raises(AmbiguousName, match="no relation 'borders'"):
        find_relation(kg, "borders")


def test_known_answers_come_first(trained):
    model, kg, index = trained
    top = predict(model, kg, index, find_entity(kg, "Berlin"), 0, top_k=3)
    assert (top[0].name, top[0].known_in, top[0].rank) == ("Germany", ("train",), 1)
    heads = predict(model, kg, index, find_entity(kg, "Italy"), 0, head=True, top_k=1)
    assert heads[0].name == "Rome"  # (?, capital_of, Italy)
    everything = predict(model, kg, index, find_entity(kg, "Italy"), 1, top_k=8)
    assert [p.known_in for p in everything if p.name == "Rome"] == [("valid",)]
    filtered = predict(model, kg, index, find_entity(kg, "Berlin"), 0, top_k=8, filtered=True)
    assert "Germany" not in [p.name for p in filtered] and len(filtered) == 7
