"""How the LM reads the graph (kgqa/readers): the gated adapter, the copy head
(kgqa/readers/copy.py), the link head (kgqa/readers/link.py), their combination with the paper's
adapters, the registry and old saved models, the controls (untrained HittER, shuffled topics),
the KG-as-text baseline (kgqa/verbalise.py) and the Table-6 report (kgqa/report.py).

Tiny models as in test_kgqa_model.py: the offline MiniLM and a width-32 HittER over a random
graph of 30 entities.
"""

import copy
import gzip
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, BertForMaskedLM

from hitter_core.baselines import RelationFrequencyScorer
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from hitter_core.sections import ConfigError, load_sections
from kgqa.batches import build_cloze_dataset, make_batch
from kgqa.config import QA_SCHEMA, KGQAConfig
from kgqa.data import answer_is_neighbour, shuffle_topics
from kgqa.lm import word_pieces
from kgqa.model import KGEnhancedLM, build_model
from kgqa.qa_readers import QAExample
from kgqa.readers import READERS, Reader, parse_reader
from kgqa.readers.adapters import KGStates
from kgqa.readers.base import KGReader, ReaderInput, ReaderOutput
from kgqa.readers.copy import CopyReader
from kgqa.readers.link import LinkReader
from kgqa.report import build_report, format_markdown, row_label
from kgqa.verbalise import fit_phrases, kg_texts, neighbour_phrases

E, R = 30, 4


@pytest.fixture(scope="module")
def base_lm(minilm_path):
    return BertForMaskedLM.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def triples():
    g = torch.Generator().manual_seed(0)
    heads, tails = torch.randint(E, (120,), generator=g), torch.randint(E, (120,), generator=g)
    return torch.stack([heads, torch.randint(R, (120,), generator=g), tails], dim=1)


@pytest.fixture(scope="module")
def neighbours(triples):
    return NeighbourIndex.from_triples(triples, E, R)


@pytest.fixture(scope="module")
def kg(triples, tmp_path_factory):
    names = ["paris", "london", "william shakespeare", "honolulu", "portuguese"]
    names += [f"entity {i}" for i in range(len(names), E)]
    return KnowledgeGraph(
        name="tiny", directory=tmp_path_factory.mktemp("kg"),
        entities=[f"/m/{i}" for i in range(E)], relations=[f"/rel/r_{i}" for i in range(R)],
        entity_names=names, splits={"train": triples, "valid": triples[:2], "test": triples[:2]},
    )


def tiny_hitter(seed: int = 0) -> HittER:
    torch.manual_seed(seed)
    return HittER(HittERConfig(
        num_entities=E, num_relations=R, hidden_size=32, num_attention_heads=4,
        intermediate_size=64, num_entity_layers=1, num_context_layers=2,
    ))


def examples(topics):
    qs = [("what is the capital of france?", "paris"), ("who wrote hamlet?", "shakespeare"),
          ("where was obama born?", "honolulu"), ("what do they speak in brazil?", "portuguese")]
    return [QAExample(f"q{i}", q, None if t < 0 else t, a, None)
            for i, ((q, a), t) in enumerate(zip(qs, topics, strict=True))]


def kg_shape(num_entities, num_relations, hidden_size=8, max_neighbours=50):
    """What a head reads of HittER's config."""
    return HittERConfig(num_entities=num_entities, num_relations=num_relations,
                        hidden_size=hidden_size, num_attention_heads=4,
                        max_neighbours=max_neighbours)


def head_input(lm, lm_logits, mask_states, rows, batch_size, **kg):
    """A ReaderInput without a model around it."""
    return ReaderInput(lm_logits, mask_states, rows, batch_size,
                       lm.bert.embeddings.word_embeddings, **kg)


def copy_input(lm, lm_logits, mask_states, rows, batch_size, kg_rows, kg_tokens, kg_entities,
               kg_mask, kg_relations=None):
    """The copy head's input for the questions ``kg_rows``: HittER's neighbour tokens (B_kg, N,
    D_kg) behind a [GCLS] and a topic token, as KGEnhancedLM.encode_kg returns them."""
    B_kg, N, D_kg = kg_tokens.shape
    layer = torch.cat([torch.zeros(B_kg, 2, D_kg), kg_tokens], dim=1)
    mask = torch.cat([torch.ones(B_kg, 2, dtype=torch.bool), kg_mask], dim=1)
    entities = torch.zeros(batch_size, N, dtype=torch.long).index_copy(0, kg_rows, kg_entities)
    relations = None if kg_relations is None else torch.zeros(
        batch_size, N, dtype=torch.long).index_copy(0, kg_rows, kg_relations)
    return head_input(lm, lm_logits, mask_states, rows, batch_size,
                      states=KGStates(kg_rows, (layer,), mask), kg_entities=entities,
                      kg_relations=relations)


def stock_logits(base_lm, batch):
    with torch.no_grad():
        logits = base_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids")).logits  # (B, L, V)
    return logits[batch["labels"] != -100]


# ---------------------------------------------------------------------- gated adapter


def test_gated_adapter_at_init_is_exactly_the_plain_lm(base_lm, neighbours, tokenizer):
    batch = make_batch(examples([3, 5, 7, 12]), tokenizer, neighbours)
    model = KGEnhancedLM(KGQAConfig(lm="minilm", reader="gated"), copy.deepcopy(base_lm),
                         tiny_hitter()).eval()
    assert model.new_modules() and all(a.gated for a in model.new_modules())
    with torch.no_grad():
        out = model(**batch)
    plain = KGEnhancedLM(KGQAConfig(lm="minilm", reader="none"), copy.deepcopy(base_lm)).eval()
    with torch.no_grad():
        expected = plain(**batch).log_probs  # the plain LM, same code path
    assert batch["kg_mask"].any()  # KG input is there, and read
    assert torch.equal(out.log_probs, expected)
    torch.testing.assert_close(out.log_probs, stock_logits(base_lm, batch).log_softmax(-1),
                               rtol=1e-5, atol=1e-5)
    # Once the gate opens, the KG changes the prediction.
    with torch.no_grad():
        for a in model.new_modules():
            a.gate.fill_(0.5)
        assert not torch.equal(model(**batch).log_probs, out.log_probs)


# ---------------------------------------------------------------------- copy head


def test_copy_head_copies_the_attended_neighbours_name(base_lm):
    head = CopyReader(base_lm.config, kg_shape(4, R))
    head.set_entity_names([[10, 11], [20], [30, 31], [40, 41, 42]])
    V, D = 50, base_lm.config.hidden_size
    rows = torch.tensor([0, 0, 1])  # question 0 has 2 masks, question 1 has 1
    lm_logits = torch.zeros(3, V)
    kg_entities = torch.tensor([[0, 1, 2, 3]])  # only question 0 has KG input
    with torch.no_grad():
        head.gate.bias.fill_(50.0)  # lam = 1: the copy distribution alone
        out = head(copy_input(base_lm, lm_logits, torch.randn(3, D), rows, 2, torch.tensor([0]),
                              torch.randn(1, 4, 8), kg_entities,
                              torch.ones(1, 4, dtype=torch.bool)))
    attention = out.evidence["attention"]
    # Candidates: the 2-piece names (entities 0 and 2); entity 1 and 3 do not fit.
    assert attention[0, 1] == 0 and attention[0, 3] == 0
    assert attention[0].sum().item() == pytest.approx(1.0)
    probs = out.log_probs.exp()
    a0, a2 = attention[0, 0].item(), attention[0, 2].item()
    assert probs[0, 10].item() == pytest.approx(a0, abs=1e-5)  # first mask: first pieces
    assert probs[0, 30].item() == pytest.approx(a2, abs=1e-5)
    assert probs[1, 11].item() == pytest.approx(a0, abs=1e-5)  # second mask: second pieces
    assert probs[1, 31].item() == pytest.approx(a2, abs=1e-5)
    # Question 1 has no KG input: exactly the LM's distribution.
    torch.testing.assert_close(out.log_probs[2], torch.log_softmax(lm_logits[2], -1))


def test_without_hitter_the_recommended_preset_is_the_plain_lm(base_lm, neighbours, tokenizer):
    """qa-webqsp-link-minilm-cpu with model.reader=none model.kg_checkpoint=null (the no-KG row
    of the main job, recipes/finetune_qa.sh --kg-checkpoint none): exactly the stock LM; the
    preset's reader alone, without a checkpoint, is refused before any work."""
    config = load_sections(QA_SCHEMA, "qa-webqsp-link-minilm-cpu", [])["model"]
    assert config.reader == "link" and config.kg_checkpoint is None
    with pytest.raises(ValueError, match="reads HittER: set model.kg_checkpoint"):
        config.check_reader()
    config = load_sections(QA_SCHEMA, "qa-webqsp-link-minilm-cpu",
                           ["model.reader=none", "model.kg_checkpoint=null"])["model"]
    config.check_reader()
    model = KGEnhancedLM(config, copy.deepcopy(base_lm)).eval()
    assert not model.new_modules()  # nothing new to train
    batch = make_batch(examples([3, 5, 7, 12]), tokenizer, neighbours)
    with torch.no_grad():
        log_probs = model(**batch).log_probs
    torch.testing.assert_close(log_probs, stock_logits(base_lm, batch).log_softmax(-1),
                               rtol=1e-5, atol=1e-5)


RELATION_TEXTS = ["people person place of birth", "location country capital",
                  "people person languages", "book written work author"]


def test_name_keys_read_the_neighbours_names(base_lm, tokenizer):
    """With name_keys, a neighbour's attention depends on its name and relation text (read
    through the LM's word embeddings); without, only on HittER's state."""
    D = base_lm.config.hidden_size
    kg_tokens = torch.zeros(1, 3, 8)  # identical HittER states: only names can differ
    entities, relations = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, R + 1]])
    x = copy_input(base_lm, torch.zeros(1, 50), torch.randn(1, D), torch.tensor([0]), 1,
                   torch.tensor([0]), kg_tokens, entities, torch.ones(1, 3, dtype=torch.bool),
                   relations)
    torch.manual_seed(0)
    plain, named = (CopyReader(base_lm.config, kg_shape(3, R), name_keys=k) for k in (False, True))
    for head in (plain, named):
        head.set_entity_names([[7], [8], [9]])
    named.set_relation_names(word_pieces(RELATION_TEXTS, tokenizer))
    with torch.no_grad():
        assert torch.allclose(plain(x).evidence["attention"], torch.full((1, 3), 1 / 3))
        before = named(x).evidence["attention"]
        assert not torch.allclose(before[0, 0], before[0, 1])
        # Entities 1 and 2 share a relation (1), in opposite directions: the direction counts.
        assert not torch.allclose(before[0, 1], before[0, 2])
        named.set_entity_names([[7], [40], [9]])  # rename entity 1
        after = named(x).evidence["attention"]
    assert not torch.allclose(after[0, 1], before[0, 1])


def test_name_keys_of_distinct_entities_equal_the_per_token_keys(base_lm, tokenizer):
    """The text keys are computed once per distinct entity and relation, then gathered: the
    same values and gradients as embedding every neighbour token's name and relation text."""
    torch.manual_seed(0)
    head = CopyReader(base_lm.config, kg_shape(6, R), name_keys=True)
    head.set_entity_names([[7], [8, 9], [10, 11, 12], [13], [14, 15], list(range(20, 31))])
    head.set_relation_names(word_pieces(RELATION_TEXTS, tokenizer))
    embeddings = copy.deepcopy(base_lm.bert.embeddings.word_embeddings)
    entities = torch.tensor([[0, 1, 1, 5], [2, 0, 3, 4]])  # repeated entities and relations
    relations = torch.tensor([[0, 1, R + 1, 3], [R, 0, 2, R + 3]])

    def per_token() -> torch.Tensor:
        def mean(pieces, length):
            keep = torch.arange(pieces.shape[-1]) < length[..., None]
            return (embeddings(pieces) * keep[..., None]).sum(-2) / length[..., None]
        rel = relations % R
        return (head.name_key(mean(head.name_pieces[entities], head.name_key_length[entities]))
                + head.relation_key(mean(head.relation_pieces[rel], head.relation_length[rel]))
                + head.direction((relations >= R).long()))

    keys = head._text_keys(embeddings, entities, relations)
    expected = per_token()
    torch.testing.assert_close(keys, expected)
    weights = torch.randn_like(keys)
    grads = [torch.autograd.grad((k * weights).sum(), [embeddings.weight, head.name_key.weight])
             for k in (keys, expected)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name_keys", [False, True])
def test_copy_head_model_learns_to_point(base_lm, neighbours, tokenizer, name_keys):
    """With the copy head, answers that are neighbours of the topic are learned from the KG:
    the gold answer is named after a neighbour, and training raises its attention."""
    topic = 3
    nbrs = neighbours.gather(torch.tensor([topic]), 50)
    answer_entity = int(nbrs.entities[0, 0])
    names = [f"entity {i}" for i in range(E)]
    names[answer_entity] = "honolulu"
    config = KGQAConfig(lm="minilm", reader="copy-names" if name_keys else "copy")
    model = KGEnhancedLM(config, copy.deepcopy(base_lm), tiny_hitter())
    model.head.set_entity_names(word_pieces(names, tokenizer))
    if name_keys:
        model.head.set_relation_names(word_pieces(RELATION_TEXTS, tokenizer))
    batch = make_batch([QAExample("q", "where was obama born?", topic, "honolulu", None)],
                       tokenizer, neighbours)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    column = (batch["kg_entities"][0] == answer_entity).nonzero()[0, 0]
    assert out.kg_evidence["attention"][0, column] > 0.9
    assert out.log_probs.argmax(-1).tolist() == out.labels.tolist()


# ---------------------------------------------------------------------- link head


def test_link_head_boosts_the_names_hitter_predicts_over_the_topics_relations(base_lm):
    """p_KG = sum over the topic's relations of p(r | q) softmax(HittER's scores), renormalised
    over the C names that fit the masks; each piece's logit gains
    beta * (log(1 + C m_KG) - log(1 + C m_uniform)); beta = 0 or no KG input: the LM exactly."""
    head = LinkReader(base_lm.config, kg_shape(5, 2))
    head.set_entity_names([[10, 11], [20], [30, 31], [40, 41, 42], [10, 12]])
    head.set_relation_names([[2000, 2001], [2002]])
    head.set_graph(torch.tensor([[0, 0, 1], [0, 1, 2]]))  # entity 0 asks (0, 0, ?), (0, 1, ?)
    assert head.entity_relations[0].tolist() == [True, True, False, False]
    assert head.entity_relations[2].tolist() == [False, False, False, True]  # (2, 1 + R, ?)
    query_rows, query_relations = head.queries(torch.tensor([0]))
    assert query_rows.tolist() == [0, 0] and query_relations.tolist() == [0, 1]
    V, D = 50, base_lm.config.hidden_size
    rows = torch.tensor([0, 0, 1])  # question 0 has 2 masks, question 1 (no KG input) one
    lm_logits, states = torch.randn(3, V), torch.randn(3, D)
    scores = torch.tensor([[3.0, 0.0, 1.0, 5.0, 0.0], [0.0, 9.0, 2.0, 0.0, 1.0]])  # (Q, E)
    x = head_input(base_lm, lm_logits, states, rows, 2)
    args = (torch.tensor([0]), torch.tensor([0]), query_rows, query_relations, scores)
    with torch.no_grad():
        start = head.read_links(x, *args)  # beta = 0 at the start: the plain LM
        torch.testing.assert_close(start.log_probs, torch.log_softmax(lm_logits, -1))
        head.gate.bias.fill_(2.0)
        out = head.read_links(x, *args)
    assert out.evidence["gate"].tolist() == [2.0]
    p_r = out.evidence["relation_probs"][0]
    assert p_r[2:].tolist() == [0.0, 0.0] and p_r.sum().item() == pytest.approx(1.0)
    p_kg = p_r[0] * scores[0].softmax(0) + p_r[1] * scores[1].softmax(0)
    fits = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # two masks: the 2-piece names 0, 2, 4
    p_kg = p_kg * fits / (p_kg * fits).sum()
    boost = torch.zeros(2, V)  # (mask, piece): log(1 + 3 m_KG) - log(1 + 3 m_uniform)
    for piece, names in ((10, [0, 4]), (30, [2])):  # first mask: entities 0 and 4 share 10
        boost[0, piece] = (torch.log1p(3 * p_kg[names].sum()) - torch.log1p(torch.tensor(
            len(names) * 1.0)))
    for piece, name in ((11, 0), (31, 2), (12, 4)):
        boost[1, piece] = torch.log1p(3 * p_kg[name]) - torch.log1p(torch.tensor(1.0))
    torch.testing.assert_close(out.log_probs[:2], torch.log_softmax(lm_logits[:2] + 2 * boost, -1))
    torch.testing.assert_close(out.log_probs[2], torch.log_softmax(lm_logits[2], -1))


def test_link_head_model_asks_hitter_and_reads_no_other_neighbours(base_lm, neighbours,
                                                                   tokenizer, kg):
    """The model's link head reads HittER's link prediction for every relation of the topic
    (HittER's own neighbour count), nothing else of the graph: neighbours past HittER's count
    change nothing, another HittER changes the answer; without a topic, the plain LM."""
    config = KGQAConfig(lm="minilm", reader="link", freeze_kg=True)
    hitter = tiny_hitter()
    hitter.config.max_neighbours = 4
    model = KGEnhancedLM(config, copy.deepcopy(base_lm), hitter).eval()
    model.head.set_tables(kg, tokenizer)
    with torch.no_grad():
        model.head.gate.bias.fill_(2.0)
        model.head.log_temperature.fill_(-3.0)  # a peaked p_KG: visible in the logits
    assert model.new_modules() == [model.head] and isinstance(model.head, LinkReader)
    batch = make_batch(examples([3, 5, 7, -1]), tokenizer, neighbours, max_neighbours=12)
    with torch.no_grad():
        out = model(**batch)
        topics = batch["topic_entity"][:3]
        query_rows, query_relations = model.head.queries(topics)
        at = query_rows  # the first three rows have topics
        expected = hitter(topics[query_rows], query_relations,
                          batch["kg_entities"][at, :4], batch["kg_relations"][at, :4],
                          batch["kg_mask"][at, :4]).scores
        mask_rows = (batch["labels"] != -100).nonzero()[:, 0]
        states = model.lm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch.get("token_type_ids")).last_hidden_state
        manual = model.head.read_links(
            head_input(model.lm, stock_logits(model.lm, batch), states[batch["labels"] != -100],
                       mask_rows, 4),
            torch.arange(3), topics, query_rows, query_relations, expected)
        torch.testing.assert_close(out.log_probs, manual.log_probs)
        assert out.kg_rows.tolist() == [0, 1, 2] and out.kg_evidence["gate"].tolist() == [2.0] * 3
        last = mask_rows == 3  # no topic: exactly the LM
        torch.testing.assert_close(out.log_probs[last],
                                   torch.log_softmax(stock_logits(base_lm, batch)[last], -1))
        far = dict(batch, kg_entities=batch["kg_entities"].clone())
        far["kg_entities"][:, 4:] = 0  # past HittER's 4 neighbours
        torch.testing.assert_close(model(**far).log_probs, out.log_probs, rtol=0, atol=0)
        model.hitter.load_state_dict(tiny_hitter(seed=1).state_dict())
        assert not torch.allclose(model(**batch).log_probs[~last], out.log_probs[~last])


def test_link_head_learns_which_relation_the_question_asks(base_lm):
    """Training moves p(r | q) to the relation whose HittER prediction is the answer."""
    torch.manual_seed(0)
    head = LinkReader(base_lm.config, kg_shape(4, 2))
    head.set_entity_names([[10], [20], [30], [40]])
    head.set_relation_names([[2000, 2001], [2002]])
    head.set_graph(torch.tensor([[0, 0, 1], [0, 1, 2]]))
    query_rows, query_relations = head.queries(torch.tensor([0]))
    scores = torch.tensor([[0.0, 6.0, 0.0, 0.0], [0.0, 0.0, 6.0, 0.0]])  # r0 -> 1, r1 -> 2
    states, labels = torch.randn(1, base_lm.config.hidden_size), torch.tensor([30])
    x = head_input(base_lm, torch.zeros(1, 50), states, torch.tensor([0]), 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(40):
        out = head.read_links(x, torch.tensor([0]), torch.tensor([0]), query_rows,
                              query_relations, scores)
        loss = torch.nn.functional.nll_loss(out.log_probs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert out.evidence["relation_probs"][0, 1] > 0.9 and out.evidence["gate"][0] > 0.5
    assert out.log_probs.argmax(-1).tolist() == [30]  # the LM alone: all pieces equal


def test_link_head_reads_the_relation_texts(base_lm, tokenizer):
    """p(r | q) depends on each relation's text (through the LM's word embeddings) and on its
    direction, not only on its id."""
    torch.manual_seed(0)
    head = LinkReader(base_lm.config, kg_shape(3, R))
    head.set_entity_names([[7], [8], [9]])
    head.set_relation_names(word_pieces(RELATION_TEXTS, tokenizer))
    head.set_graph(torch.tensor([[0, 0, 1], [0, 1, 2], [2, 1, 0]]))  # 0 asks r0, r1, r1 + R
    with torch.no_grad():
        head.relation.weight.zero_()  # no per-id preference: only texts and directions
        head.gate.bias.fill_(1.0)
    query_rows, query_relations = head.queries(torch.tensor([0]))
    x = head_input(base_lm, torch.zeros(1, 50), torch.randn(1, base_lm.config.hidden_size),
                   torch.tensor([0]), 1)
    args = (torch.tensor([0]), torch.tensor([0]), query_rows, query_relations,
            torch.zeros(len(query_rows), 3))
    with torch.no_grad():
        before = head.read_links(x, *args).evidence["relation_probs"][0]
        assert before[0] != before[1] and before[1] != before[R + 1]  # text; direction
        head.set_relation_names(word_pieces(["book written work author"] + RELATION_TEXTS[1:],
                                            tokenizer))
        after = head.read_links(x, *args).evidence["relation_probs"][0]
    assert after[0] != before[0]


def test_link_head_confidence_weighs_how_sure_the_head_is(base_lm):
    """link-confidence: beta also reads the best relation logit and the certainty of
    p(r | q) and of p_KG (1 for one-hot, 0 for uniform), through weights zero at the start, so
    the head starts as the plain head; its figures carry no gradient."""
    torch.manual_seed(0)
    certainty = LinkReader.certainty
    asked = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logits = logits.masked_fill(~asked, float("-inf")).masked_fill(~asked.any(1)[:, None], 0.0)
    probs = torch.softmax(logits, 1) * asked
    fits = torch.tensor([[True, True, True, False], [True, True, False, False],
                         [True, True, True, True]])
    p_kg = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sure = certainty(logits.requires_grad_(), probs, asked, p_kg, fits)
    assert not sure.requires_grad
    p = probs[0, :2]
    assert sure[:, 0].tolist() == [2.0, 1.5, 0.0]  # the best relation logit (none: 0)
    assert sure[0, 1].item() == pytest.approx(1 + (p * p.log()).sum().item() / math.log(2))
    assert sure[1:, 1].tolist() == [0.0, 0.0]  # one relation, or none: no choice made
    assert sure[0, 2].item() == pytest.approx(1.0)  # one-hot over 3 candidates
    assert sure[1:, 2].tolist() == [0.0, 0.0]  # uniform over its 2; no opinion
    head = LinkReader(base_lm.config, kg_shape(4, 2), confidence=True)
    plain = LinkReader(base_lm.config, kg_shape(4, 2))
    plain.load_state_dict(head.state_dict(), strict=False)
    for h in (head, plain):
        h.set_entity_names([[10], [20], [30], [40]])
        h.set_relation_names([[2000, 2001], [2002]])
        h.set_graph(torch.tensor([[0, 0, 1], [0, 1, 2]]))
    query_rows, query_relations = head.queries(torch.tensor([0]))
    scores = torch.tensor([[0.0, 6.0, 0.0, 0.0], [0.0, 0.0, 6.0, 0.0]])
    x = head_input(base_lm, torch.randn(1, 50), torch.randn(1, base_lm.config.hidden_size),
                   torch.tensor([0]), 1)
    args = (torch.tensor([0]), torch.tensor([0]), query_rows, query_relations, scores)
    with torch.no_grad():
        head.gate.bias.fill_(1.0)
        plain.gate.bias.fill_(1.0)
        torch.testing.assert_close(head.read_links(x, *args).log_probs,
                                   plain.read_links(x, *args).log_probs)
        head.confidence.weight.copy_(torch.tensor([[0.0, 0.0, 2.0]]))
    out = head.read_links(x, *args)
    relation_probs = out.evidence["relation_probs"]
    p_kg = (relation_probs[0, 0] * scores[0].softmax(0)
            + relation_probs[0, 1] * scores[1].softmax(0))
    kl = (p_kg * (4 * p_kg).log()).sum() / math.log(4)
    assert out.evidence["gate"].item() == pytest.approx(1.0 + 2 * kl.item(), rel=1e-5)
    out.log_probs[0, 30].backward()
    assert head.confidence.weight.grad[0, 2] != 0


def test_reader_names_are_checked_and_combine_only_adapters_with_a_head():
    for spec in ("link+copy", "paper+gated", "paper+none", "copy+paper", "nope"):
        with pytest.raises(ValueError, match="model.reader"):
            load_sections(QA_SCHEMA, None, [f"model.reader={spec}"])
    both = parse_reader("paper+link")
    assert both.adapters == "paper" and both.head is LinkReader
    assert both.description == "paper adapters + link head"
    with pytest.raises(ValueError, match="reads no HittER"):
        KGQAConfig(reader="none", kg_checkpoint="somewhere").check_reader()


def test_a_new_reader_is_one_class_and_one_registry_line(base_lm, neighbours, tokenizer,
                                                         monkeypatch):
    """The seam: a KGReader subclass and its READERS entry are all a new reader needs; the
    model builds it, trains it at lr_new, combines it with adapters, and the report
    names it."""

    class VocabularyBias(KGReader):  # a learned bias over the vocabulary: reads nothing of KG
        def __init__(self, lm_config, kg_config):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(lm_config.vocab_size))

        def forward(self, x):
            return ReaderOutput(torch.log_softmax(x.lm_logits.float() + self.bias, dim=-1))

    monkeypatch.setitem(READERS, "bias", Reader("vocabulary bias", head=VocabularyBias))
    for spec in ("bias", "paper+bias"):
        model = KGEnhancedLM(KGQAConfig(lm="minilm", reader=spec, kg_checkpoint="k"),
                             copy.deepcopy(base_lm), tiny_hitter())
        assert isinstance(model.head, VocabularyBias) and model.head in model.new_modules()
        assert bool(model.layer_mapping) == (spec == "paper+bias")
    batch = make_batch(examples([3, 5, 7, 12]), tokenizer, neighbours)
    model(**batch).loss.backward()
    assert model.head.bias.grad.abs().sum() > 0
    label = row_label({"lm": "minilm", "kg": "frozen", "variant": {"reader": "paper+bias"}})
    assert label == "minilm + HittER frozen, paper adapters + vocabulary bias"


# ---------------------------------------------------------------------- controls


def test_shuffled_topics_give_each_question_another_ones():
    exs = [QAExample(f"q{i}", "?", t, "a", None) for i, t in enumerate([0, 1, None, 3, 4, 5])]
    out = shuffle_topics(exs, seed=7)
    assert out == shuffle_topics(exs, seed=7)  # deterministic
    assert out[2].topic_entity is None  # no topic, nothing to shuffle
    moved = [o.topic_entity for o in out if o.topic_entity is not None]
    assert sorted(moved) == [0, 1, 3, 4, 5]  # a permutation of the topics
    assert all(o.topic_entity != e.topic_entity for o, e in zip(out, exs, strict=True)
               if e.topic_entity is not None)  # none keeps its own (distinct topics here)
    assert [o.question_id for o in out] == [e.question_id for e in exs]


def test_untrained_hitter_control_loads_no_weights(tmp_path):
    pretrained = tiny_hitter(seed=0)
    pretrained.save_pretrained(tmp_path / "hitter")
    config = KGQAConfig(lm="minilm", kg_checkpoint=str(tmp_path / "hitter"))
    loaded, _ = build_model(config)
    torch.manual_seed(123)
    control, _ = build_model(KGQAConfig(lm="minilm", kg_checkpoint=str(tmp_path / "hitter"),
                                        kg_init="random"))
    reference = pretrained.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.hitter.state_dict().items())
    weights = [k for k in reference if k.endswith("weight") and "norm" not in k]
    assert weights and not any(torch.equal(control.hitter.state_dict()[k], reference[k])
                               for k in weights)
    assert control.hitter.config.hidden_size == pretrained.config.hidden_size  # same shape


def test_frequency_control_reads_answer_counts_instead_of_hitter(base_lm, neighbours, tokenizer,
                                                                 kg, tmp_path):
    """model.kg_init=frequency: the link head reads log(1 + how often each entity answers the
    relation in train), the relation-frequency baseline's counts, and never HittER; the table
    is saved with the model; readers with adapters refuse it."""
    config = KGQAConfig(lm="minilm", reader="link", freeze_kg=True, kg_init="frequency")
    model = KGEnhancedLM(config, copy.deepcopy(base_lm), tiny_hitter()).eval()
    model.head.set_tables(kg, tokenizer)
    assert torch.equal(model.head.log_counts, RelationFrequencyScorer(kg).counts.log1p())
    batch = make_batch(examples([3, 5, 7, -1]), tokenizer, neighbours, max_neighbours=12)
    with torch.no_grad():
        model.head.gate.bias.fill_(2.0)
        out = model(**batch)
        model.hitter.load_state_dict(tiny_hitter(seed=1).state_dict())
        assert torch.equal(model(**batch).log_probs, out.log_probs)  # HittER is not read
        plain = torch.log_softmax(stock_logits(base_lm, batch), -1)
        assert not torch.allclose(out.log_probs[:3], plain[:3])  # the counts are
    model.save_pretrained(tmp_path / "control")
    loaded = KGEnhancedLM.from_pretrained(tmp_path / "control").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).log_probs, out.log_probs)
    with pytest.raises(ConfigError, match="kg_init=frequency"):
        KGQAConfig(lm="minilm", kg_checkpoint="x", reader="paper+link",
                   kg_init="frequency").check_reader()


def test_answer_is_neighbour(kg):
    h, _, t = kg.train[0].tolist()
    unlinked = next(e for e in range(E) if e not in {x for tr in kg.train.tolist()
                                                     for x in (tr[0], tr[2]) if h in tr[::2]})
    assert answer_is_neighbour([h, t, h, -1], [t, h, unlinked, t], kg) == [True, True, False,
                                                                         False]


# ---------------------------------------------------------------------- KG as text


def test_text_baseline_is_deterministic_and_cut_safely(kg, neighbours, tokenizer):
    exs = examples([3, -1, 7, 12])
    texts = kg_texts(exs, kg, neighbours, tokenizer, max_length=40, max_neighbours=50)
    assert texts == kg_texts(exs, kg, neighbours, tokenizer, 40, 50)
    assert texts[1] == ""  # no topic, no text
    ds = build_cloze_dataset(exs, tokenizer, kg_texts=texts)
    for row, text in zip(ds, texts, strict=True):
        assert len(row["input_ids"]) <= 40
        assert sum(t == tokenizer.mask_token_id for t in row["input_ids"]) == row["num_masks"]
        if text:  # second segment, token type 1, cut between whole phrases
            assert text.startswith(kg.entity_names[row["topic_entity"]] + ":")
            assert 1 in row["token_type_ids"]
    longer = kg_texts(exs, kg, neighbours, tokenizer, max_length=200, max_neighbours=50)
    assert all(long.startswith(short.rstrip()) or not short
               for short, long in zip(texts, longer, strict=True))
    phrases = neighbour_phrases([1, 2], [0, R + 1], kg, ["r zero", "r one", "r two", "r three"])
    assert phrases == ["r zero london", "william shakespeare r one"]  # reciprocal: reversed
    assert fit_phrases("paris", ["a b", "c d"], tokenizer, budget=1) == ""
    assert fit_phrases("paris", ["a b", "c d"], tokenizer, budget=6) == "paris: a b"


# ---------------------------------------------------------------------- report


def result(seed, acc, kg="none", total=100, **variant):
    v = {"adapter": "paper", "copy_head": False, "kg_init": "pretrained",
         "kg_text_length": 0, "shuffle_topics": False,
         "protocol": {"epochs": 20, "lr_new": 5e-4, "lr_pretrained": 5e-5,
                      "batch_size": 16}} | variant
    return {"lm": "minilm", "kg": kg, "dataset": "webqsp", "split": "filtered", "seed": seed,
            "train_examples": 676, "test": {"accuracy": acc, "total": total}, "variant": v}


def test_report_rows_gains_and_protocols():
    runs = [result(1, 0.40), result(2, 0.50),
            result(1, 0.45, "frozen", adapter="none", copy_head=True),
            result(2, 0.58, "frozen", adapter="none", copy_head=True),
            result(1, 0.41, "frozen", adapter="none", copy_head=True, shuffle_topics=True),
            result(1, 0.30, kg_text_length=128)]
    report = build_report(runs)
    rows = {r["label"]: r for r in report["rows"]}
    copy_row = rows["minilm + HittER frozen, copy head"]
    assert copy_row["gain"]["mean"] == pytest.approx(6.5)  # (5 + 8) / 2, paired by seed
    assert "minilm + HittER frozen, copy head [control: shuffled topics]" in rows
    assert rows["minilm + KG as text"]["gain"]["mean"] == pytest.approx(-10.0)
    table = format_markdown(report)
    assert "BERT-base + HittER (paper)" in table and "| 51.0 (n=5) |" in table
    assert "+6.5 ± 2.1 (n=2)" in table
    # Another protocol is another row, never averaged in.
    other = result(3, 0.9)
    other["variant"]["protocol"]["epochs"] = 6
    labels = [(r["label"], r["protocol"]) for r in build_report(runs + [other])["rows"]]
    assert ("minilm", "6 ep, lr 0.0005 / 5e-05") in labels
    other_lr = result(3, 0.9)
    other_lr["variant"]["protocol"]["lr_new"] = 5e-5
    labels = [(r["label"], r["protocol"]) for r in build_report(runs + [other_lr])["rows"]]
    assert ("minilm", "20 ep, lr 5e-05 / 5e-05") in labels
    with pytest.raises(ValueError, match="differ in train / test size"):  # another train size
        build_report(runs + [result(3, 0.5) | {"train_examples": 32}])
    # A run on cut splits is marked and is a row of its own.
    cut = result(1, 0.9, total=8)
    cut["variant"]["protocol"] |= {"max_train_examples": 32, "max_eval_examples": 8}
    labels = [(r["label"], r["protocol"]) for r in build_report(runs + [cut])["rows"]]
    assert ("minilm", "20 ep, lr 0.0005 / 5e-05 [train cut to 32, dev/test cut to 8]") in labels
    with pytest.raises(ValueError, match="differ in train / test size"):
        build_report(runs + [result(3, 0.5, total=99)])
    label = row_label({"lm": "minilm", "kg": "co-trained", "variant": {"adapter": "gated"}})
    assert label == "minilm + HittER co-trained, gated adapters"
    label = row_label({"lm": "minilm", "kg": "frozen", "variant": {
        "adapter": "none", "copy_head": True, "copy_name_keys": True}})
    assert label == "minilm + HittER frozen, copy head, name keys"
    label = row_label({"lm": "minilm", "kg": "frozen", "variant": {"reader": "paper+link"}})
    assert label == "minilm + HittER frozen, paper adapters + link head"


def test_report_never_averages_runs_over_different_hitters():
    """Runs that read different HittERs (by their weights' hash) are separate rows, each named
    by its HittER; both are paired with the plain LM."""
    runs = [result(1, 0.40), result(2, 0.44)]
    for seed, acc, sha, mrr in ((1, 0.50, "aaa", 0.29), (2, 0.52, "aaa", 0.29),
                                (1, 0.45, "bbb", 0.31)):
        runs.append(result(seed, acc, "frozen", reader="link")
                    | {"kg_identity": {"sha256": sha, "test_mrr": mrr}})
    rows = {r["label"]: r for r in build_report(runs)["rows"]}
    a = rows["minilm + HittER frozen, link head [HittER sha aaa, test MRR 0.2900]"]
    b = rows["minilm + HittER frozen, link head [HittER sha bbb, test MRR 0.3100]"]
    assert (a["n"], b["n"]) == (2, 1) and "minilm" in rows
    assert a["gain"]["mean"] == pytest.approx(9.0) and b["gain"]["mean"] == pytest.approx(5.0)
    one = build_report(runs[:4])["rows"]  # one HittER: no need to name it
    assert {r["label"] for r in one} == {"minilm", "minilm + HittER frozen, link head"}


def test_report_breakdown_from_predictions(tmp_path):
    # Seed 1 as kgqa.train writes it, seed 2 gzipped as bench/results keeps it.
    for seed, flags in ((1, [(True, True), (False, True), (True, False)]),
                        (2, [(True, True), (True, True), (False, False)])):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(result(seed, 0.5, total=3)))
        lines = "".join(json.dumps({"correct": c, "answer_is_neighbour": n}) + "\n"
                        for c, n in flags)
        if seed == 1:
            (d / "predictions.test.jsonl").write_text(lines)
        else:
            (d / "predictions.test.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    from kgqa.report import find_run_results
    row = build_report(find_run_results([tmp_path]))["rows"][0]
    assert row["breakdown"]["neighbour"]["questions"] == 2
    assert row["breakdown"]["neighbour"]["accuracy"] == pytest.approx(75.0)  # (50 + 100) / 2
    assert row["breakdown"]["other"]["accuracy"] == pytest.approx(50.0)  # (100 + 0) / 2
