"""KG-enhanced masked LM (kgqa/model.py, kgqa/readers/adapters.py, kgqa/config.py, kgqa/batches.py):
the layer mapping, equivalence with the stock BertForMaskedLM when no KG input flows, padding
invariance, neighbourhoods drawn where batches are made, frozen vs co-trained HittER, parameter
groups, save_pretrained / from_pretrained round trips and a few questions overfitted.

The LM is the offline MiniLM (6 layers, width 384; its MLM head is freshly initialised, so
every model here is deep-copied from one loaded LM to share that head); HittER is a tiny
random one (width 32) over a small random graph.
"""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, BertForMaskedLM

from hitter_core.config import HittERConfig
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from kgqa.batches import ClozeCollator, make_batch
from kgqa.config import KGQAConfig, QATrainConfig, format_layer_mapping, parse_layer_mapping
from kgqa.model import KGEnhancedLM, build_model
from kgqa.qa_readers import QAExample
from kgqa.readers.adapters import CrossAttentionAdapter, KGAttention, default_layer_mapping
from kgqa.train import optimizer_groups

E, R = 30, 4  # tiny graph


@pytest.fixture(scope="module")
def base_lm(minilm_path):
    return BertForMaskedLM.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def neighbours():
    g = torch.Generator().manual_seed(0)
    heads, tails = torch.randint(E, (120,), generator=g), torch.randint(E, (120,), generator=g)
    triples = torch.stack([heads, torch.randint(R, (120,), generator=g), tails], dim=1)
    return NeighbourIndex.from_triples(triples, E, R)


def tiny_hitter(context_layers: int = 6, seed: int = 0) -> HittER:
    torch.manual_seed(seed)
    return HittER(HittERConfig(
        num_entities=E, num_relations=R, hidden_size=32, num_attention_heads=4,
        intermediate_size=64, num_entity_layers=1, num_context_layers=context_layers,
    ))


def make_model(base_lm, neighbours, kg=True, **config) -> KGEnhancedLM:
    torch.manual_seed(1)  # adapter init
    hitter = tiny_hitter() if kg else None
    config.setdefault("reader", "paper" if kg else "none")
    model = KGEnhancedLM(KGQAConfig(lm="minilm", **config), copy.deepcopy(base_lm), hitter)
    return model.eval()


def cloze_batch(tokenizer, questions, answers, topics, neighbours=None, max_neighbours=50):
    """RawQuestion + [MASK] * pieces(answer) + "." with the pieces as labels, and the topics'
    first neighbours (kgqa.batches.make_batch, the helper users have)."""
    examples = [
        QAExample(f"q{i}", q, None if t < 0 else t, a, None)
        for i, (q, a, t) in enumerate(zip(questions, answers, topics, strict=True))
    ]
    return make_batch(examples, tokenizer, neighbours, max_neighbours)


@pytest.fixture(scope="module")
def batch(tokenizer, neighbours):
    return cloze_batch(
        tokenizer,
        ["what is the capital of france?", "who wrote hamlet?", "where was obama born?",
         "what language do they speak in brazil?"],
        ["paris", "william shakespeare", "honolulu", "portuguese"],
        [3, -1, 7, 12],
        neighbours,
    )


def stock_logits(base_lm, batch):
    """The plain BertForMaskedLM's log-probabilities at the labelled positions, (M, V)."""
    with torch.no_grad():
        logits = base_lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
        ).logits  # (B, L, V)
    return logits[batch["labels"] != -100].log_softmax(-1)


# ---------------------------------------------------------------------- layer mapping


def test_default_mapping_is_the_papers_for_bert_base():
    paper = {3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4, 9: 5, 10: 5, 11: 6, 12: 6}
    assert default_layer_mapping(12, 6) == paper


@pytest.mark.parametrize("depths, expected", [
    ((6, 6), {2: 2, 4: 4, 6: 6}),  # shallow LM: every second layer, same relative depth
    ((6, 2), {5: 2, 6: 2}),  # two LM layers per KG layer, from the top
    ((6, 3), {3: 2, 4: 2, 5: 3, 6: 3}),
    ((4, 6), {2: 3, 4: 6}),
    ((6, 1), {5: 1, 6: 1}),  # a single KG layer cannot be skipped
    ((24, 6), {15 + i: 2 + i // 2 for i in range(10)}),
])
def test_default_mapping_other_depths(depths, expected):
    assert default_layer_mapping(*depths) == expected


def test_default_mapping_never_uses_the_first_kg_layer():
    for lm in range(1, 25):
        for kg in range(2, 9):
            mapping = default_layer_mapping(lm, kg)
            assert mapping and 1 not in mapping.values()
            assert set(mapping) <= set(range(1, lm + 1)) and max(mapping.values()) <= kg


def test_parse_and_format_layer_mapping():
    assert parse_layer_mapping("3:2, 4:2,12:6") == {3: 2, 4: 2, 12: 6}
    assert parse_layer_mapping({"4": 2, "3": "2"}) == {3: 2, 4: 2}
    assert format_layer_mapping({4: 2, 3: 2}) == "3:2,4:2"
    for bad in ("3-2", "3:x", "0:1", "3:1,3:2"):
        with pytest.raises(ValueError):
            parse_layer_mapping(bad)


def test_explicit_mapping_places_the_adapters(base_lm, neighbours):
    model = make_model(base_lm, neighbours, layer_mapping="1:6,5:3")
    wrapped = {
        i + 1: layer.attention.kg_layer for i, layer in enumerate(model.lm.bert.encoder.layer)
        if isinstance(layer.attention, KGAttention)
    }
    assert wrapped == {1: 6, 5: 3} == model.layer_mapping
    assert len(model.new_modules()) == 2
    with pytest.raises(ValueError, match="out of range"):
        make_model(base_lm, neighbours, layer_mapping="7:2")
    with pytest.raises(ValueError, match="out of range"):
        make_model(base_lm, neighbours, layer_mapping="2:7")


# ---------------------------------------------------------------------- equivalence


def test_baseline_equals_stock_lm_at_mask_positions(base_lm, neighbours, batch):
    model = make_model(base_lm, neighbours, kg=False)
    with torch.no_grad():
        out = model(**batch)
    expected = stock_logits(base_lm, batch)
    assert out.log_probs.shape == expected.shape
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-5)


def test_no_kg_rows_are_unchanged_in_a_mixed_batch(base_lm, neighbours, batch):
    model = make_model(base_lm, neighbours)
    with torch.no_grad():
        out = model(**batch)
        none = model(**{**batch, "topic_entity": torch.full((4,), -1)})
    expected = stock_logits(base_lm, batch)
    torch.testing.assert_close(none.log_probs, expected, rtol=1e-5, atol=1e-5)  # adapters idle
    plain = batch["topic_entity"][out.rows] < 0  # (M,) positions of the no-KG question
    assert plain.any() and not plain.all()
    torch.testing.assert_close(out.log_probs[plain], expected[plain], rtol=1e-5, atol=1e-5)
    # ... while the KG does reach the other questions.
    assert (out.log_probs[~plain] - expected[~plain]).abs().max() > 1e-2


def test_kg_padding_changes_nothing(base_lm, neighbours, batch):
    """A question's logits do not depend on the other questions of the batch (whose
    neighbourhoods set the KG padding width)."""
    degrees = neighbours.degrees()
    small, big = int(degrees.argmin()), int(degrees.argmax())
    assert degrees[small] < degrees[big]
    model = make_model(base_lm, neighbours)
    collate = ClozeCollator(0, neighbours, max_neighbours=50)
    one = {k: v[:1] for k, v in batch.items()}
    two = {k: v[:1].repeat(2, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    one_topic, two_topics = torch.tensor([small]), torch.tensor([small, big])
    with torch.no_grad():
        alone = model(**{**one, "topic_entity": one_topic,
                         **collate.gather(one_topic)}).log_probs
        padded = model(**{**two, "topic_entity": two_topics, **collate.gather(two_topics)})
    torch.testing.assert_close(padded.log_probs[padded.rows == 0], alone, rtol=1e-4, atol=1e-4)


def test_adapter_masks_kg_padding():
    from transformers import BertConfig

    config = BertConfig(hidden_size=16, num_attention_heads=4, attention_probs_dropout_prob=0.0)
    adapter = CrossAttentionAdapter(config, kg_dim=8).eval()
    x, kg = torch.randn(2, 5, 16), torch.randn(2, 3, 8)  # (B, L, D), (B, T, D_kg)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    noisy = torch.where(mask[..., None], kg, torch.randn_like(kg) * 100)
    torch.testing.assert_close(adapter(x, kg, mask), adapter(x, noisy, mask))
    assert not torch.allclose(adapter(x, kg, mask), adapter(x, noisy, torch.ones_like(mask)))


def test_neighbourhoods_follow_train_and_eval_batches(neighbours):
    """Evaluation batches: the fixed first ``max_neighbours`` of the topic; training batches:
    a fresh random subset each call, reproducible from the collator's seed. Rows without a
    topic get only padding."""
    hub = int(neighbours.degrees().argmax())
    assert neighbours.degrees()[hub] > 6
    topics = torch.tensor([-1, hub, -1])

    def draws(collate, n=4):
        return [collate.gather(topics) for _ in range(n)]

    fixed = draws(ClozeCollator(0, neighbours, max_neighbours=3))
    assert fixed[0]["kg_mask"].tolist() == [[False] * 3, [True] * 3, [False] * 3]
    first = neighbours.neighbours_of(hub)[0][:3]
    assert fixed[0]["kg_entities"][1].tolist() == first.tolist()
    assert all(torch.equal(d["kg_entities"], fixed[0]["kg_entities"]) for d in fixed)
    train = draws(ClozeCollator(0, neighbours, max_neighbours=3, train=True, seed=5))
    again = draws(ClozeCollator(0, neighbours, max_neighbours=3, train=True, seed=5))
    assert len({tuple(d["kg_entities"][1].tolist()) for d in train}) > 1  # fresh draws
    for x, y in zip(train, again, strict=True):  # seeded: reproducible
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not train[0]["kg_mask"][[0, 2]].any()


# ---------------------------------------------------------------------- outputs


def test_logits_only_at_mask_positions(base_lm, neighbours, batch, tokenizer):
    model = make_model(base_lm, neighbours)
    model.mask_token_id = tokenizer.mask_token_id  # set from the tokenizer at run time
    with torch.no_grad():
        out = model(**batch)
        unlabelled = model(**{k: v for k, v in batch.items() if k != "labels"})
    pieces = [len(tokenizer(a, add_special_tokens=False)["input_ids"])
              for a in ["paris", "william shakespeare", "honolulu", "portuguese"]]
    assert out.log_probs.shape == (sum(pieces), base_lm.config.vocab_size)
    assert out.rows.tolist() == [i for i, n in enumerate(pieces) for _ in range(n)]
    assert out.labels.tolist() == batch["labels"][batch["labels"] != -100].tolist()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(unlabelled.log_probs, out.log_probs)  # [MASK] ids: the positions
    assert unlabelled.loss is None


# ---------------------------------------------------------------------- training set-up


@pytest.mark.parametrize("freeze_kg", [True, False])
def test_frozen_or_cotrained_hitter(base_lm, neighbours, batch, freeze_kg):
    model = make_model(base_lm, neighbours, freeze_kg=freeze_kg).train()
    assert model.hitter.training is not freeze_kg  # frozen HittER stays in eval mode
    model(**batch).loss.backward()
    hitter_params = list(model.hitter.parameters())
    got_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in hitter_params]
    assert not any(got_grad) if freeze_kg else any(got_grad)
    assert all(p.grad is not None for a in model.new_modules() for p in a.parameters())

    train = QATrainConfig()
    lr_of = {id(p): g["lr"] for g in optimizer_groups(model, train) for p in g["params"]}
    adapters = {id(p) for a in model.new_modules() for p in a.parameters()}
    assert adapters and all(lr_of[i] == train.lr_new for i in adapters)
    assert all(lr_of[id(p)] == train.lr_pretrained
               for p in model.lm.bert.encoder.layer[0].parameters())
    assert bool(set(map(id, hitter_params)) & set(lr_of)) is not freeze_kg
    assert set(lr_of) == {id(p) for p in model.parameters() if p.requires_grad}


def test_optimizer_groups(base_lm, neighbours):
    model = make_model(base_lm, neighbours)
    train = QATrainConfig()
    groups = optimizer_groups(model, train)
    adapter = model.new_modules()[0]
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(adapter.query.weight)]["lr"] == train.lr_new == 5e-5
    assert by_param[id(adapter.query.weight)]["weight_decay"] == 0.01
    assert by_param[id(adapter.query.bias)]["weight_decay"] == 0.0
    assert by_param[id(adapter.norm.weight)]["weight_decay"] == 0.0
    word = model.lm.bert.embeddings.word_embeddings.weight
    assert by_param[id(word)] == {"params": by_param[id(word)]["params"], "lr": 5e-6,
                                  "weight_decay": 0.01}
    assert by_param[id(model.hitter.context_layers[0].attn_norm.weight)]["weight_decay"] == 0.0
    assert len(by_param) == sum(len(g["params"]) for g in groups)  # each parameter once


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kg", [True, False])
def test_save_pretrained_round_trips_exactly(neighbours, batch, tokenizer, tmp_path, kg):
    """The standard save_pretrained / from_pretrained: same logits bit for bit, the layer
    mapping actually used and the freeze flag kept, tied LM weights tied again."""
    overrides = {"reader": "none"}
    if kg:
        tiny_hitter().save_pretrained(tmp_path / "hitter")
        overrides = dict(kg_checkpoint=str(tmp_path / "hitter"), layer_mapping="4:3,6:6",
                         freeze_kg=True, reader="paper")
    model, fresh = build_model(KGQAConfig(lm="minilm", **overrides))
    assert "lm.cls.predictions.transform.dense.weight" in fresh  # MiniLM has no MLM head
    model.eval().save_pretrained(tmp_path / "qa")
    tokenizer.save_pretrained(tmp_path / "qa")
    loaded = KGEnhancedLM.from_pretrained(tmp_path / "qa").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).log_probs, model(**batch).log_probs,
                                   rtol=0, atol=0)
    lm = loaded.lm
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight
    saved = json.loads((tmp_path / "qa" / "config.json").read_text())
    assert saved["model_type"] == "hitter-kgqa" and saved["lm_config"]["hidden_size"] == 384
    if kg:
        assert loaded.layer_mapping == {4: 3, 6: 6} and saved["layer_mapping"] == "4:3,6:6"
        assert saved["kg_config"]["hidden_size"] == 32
        assert not any(p.requires_grad for p in loaded.hitter.parameters())  # freeze_kg kept
    else:
        assert saved["kg_config"] is None and saved["layer_mapping"] is None


def test_load_qa_model_finds_tokenizer_and_neighbourhoods(tmp_path, data_root, fb15k237):
    """One call loads a saved QA model with its tokenizer and its graph's neighbour index."""
    from kgqa.model import load_qa_model

    hitter = HittER(HittERConfig(
        num_entities=fb15k237.num_entities, num_relations=fb15k237.num_relations,
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_entity_layers=1,
        num_context_layers=2,
    ))
    hitter.save_pretrained(tmp_path / "hitter")
    model, _ = build_model(KGQAConfig(lm="minilm", kg_checkpoint=str(tmp_path / "hitter")))
    model.save_pretrained(tmp_path / "qa")
    from transformers import AutoTokenizer

    from kgqa.lm import resolve_lm

    AutoTokenizer.from_pretrained(resolve_lm("minilm")).save_pretrained(tmp_path / "qa")
    loaded, tok, index = load_qa_model(tmp_path / "qa", data_root, cache_dir=tmp_path / "c")
    assert not loaded.training and loaded.mask_token_id == tok.mask_token_id
    assert index.num_entities == fb15k237.num_entities
    example = QAExample("q", "what is the capital of france?", 5, "paris", None)
    batch = make_batch([example], tok, index, loaded.config.max_neighbours)
    assert batch["kg_mask"].shape[0] == 1 and batch["kg_mask"].any()
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch).loss)


# ---------------------------------------------------------------------- overfit


def test_overfits_a_few_questions(base_lm, neighbours, tokenizer):
    """Eight cloze questions (two without a KG entity) learned to 100% accuracy, where a
    question counts only if every masked piece is right (REFERENCE.md)."""
    questions = [
        ("what is the capital of france?", "paris", 3),
        ("who wrote hamlet?", "william shakespeare", 5),
        ("where was barack obama born?", "honolulu", 7),
        ("what language is spoken in brazil?", "portuguese", 12),
        ("which river flows through cairo?", "the nile", -1),
        ("who painted the mona lisa?", "leonardo da vinci", 20),
        ("what currency does japan use?", "yen", -1),
        ("who discovered penicillin?", "alexander fleming", 29),
    ]
    batch = cloze_batch(tokenizer, *zip(*questions, strict=True), neighbours)
    model = make_model(base_lm, neighbours).train()
    # The vocabulary matrix (tied to the MLM decoder, half of MiniLM) stays fixed: it halves
    # the optimiser's work and the head's transform and bias are enough to fit.
    model.lm.bert.embeddings.word_embeddings.requires_grad_(False)
    torch.manual_seed(0)
    train = QATrainConfig(lr_new=1e-3, lr_pretrained=5e-4)
    optimizer = torch.optim.AdamW(optimizer_groups(model, train))
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if loss.item() < 0.05:
            break
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    wrong = torch.zeros(len(questions)).index_add_(
        0, out.rows, (out.log_probs.argmax(-1) != out.labels).float()
    )  # (B,) wrong pieces per question
    assert (wrong == 0).all(), f"loss {loss.item():.3f}, wrong pieces {wrong.tolist()}"
