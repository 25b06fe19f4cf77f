"""python -m kgqa.ask on a QA model that learned three questions by heart. The three share one
text, so only the KG input (the topic's neighbours, read by the copy head) tells them apart:
ask answers each, shows the answer entity as the top KG evidence, and links topics by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hitter_core.neighbours import NeighbourIndex
from kgqa.ask import EntityNames, ask, main
from kgqa.batches import make_batch
from kgqa.config import KGQAConfig
from kgqa.data import QAExample
from kgqa.linker import load_linker
from kgqa.model import KGEnhancedLM, build_model

NAMES = ["paris", "france", "berlin", "germany", "rome", "italy", "europe"]
TRAIN = ["paris\tcapital_of\tfrance", "berlin\tcapital_of\tgermany", "rome\tcapital_of\titaly",
         "france\tpart_of\teurope", "germany\tpart_of\teurope", "italy\tpart_of\teurope"]
QUESTION = "what is the capital of this country?"
QUESTIONS = [(QUESTION, "france", "paris"), (QUESTION, "germany", "berlin"),
             (QUESTION, "italy", "rome")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm, toy_graph):
    root = tmp_path_factory.mktemp("ask")
    kg = toy_graph(root / "toy", TRAIN, NAMES, hitter=dict(
        hidden_size=32, intermediate_size=64, num_context_layers=1))
    config = KGQAConfig(lm=tiny_lm, kg_checkpoint=str(root / "hitter"), reader="copy",
                        freeze_kg=True, max_neighbours=8)
    model, _ = build_model(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model.mask_token_id = tokenizer.mask_token_id
    model.head.set_tables(kg, tokenizer)
    index = NeighbourIndex.build(kg, seed=model.config.kg_config["neighbour_order_seed"])
    examples = [QAExample(f"q{i}", q, kg.entity_names.index(t), a, kg.entity_names.index(a))
                for i, (q, t, a) in enumerate(QUESTIONS)]
    batch = make_batch(examples, tokenizer, index, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(root / "qa")
    tokenizer.save_pretrained(root / "qa")
    return model, tokenizer, kg, index, root


def test_answers_from_the_kg_with_evidence(trained):
    model, tokenizer, kg, index, _ = trained
    for question, topic, answer in QUESTIONS:
        got = ask(model, tokenizer, kg, index, question, kg.entity_names.index(topic),
                  max_masks=1)
        assert (got.text, got.masks, got.topic) == (answer, 1, f"{topic} ({topic})")
        assert got.evidence[0].entity == answer
        assert got.evidence[0].fact == f"({answer}, capital_of, {topic})"
        assert got.gate > 0.5 and got.alternatives
    longest = ask(model, tokenizer, kg, index, QUESTION, 1, max_masks=3)
    assert longest.score >= max(score for _, score in longest.alternatives[:2])  # best length
    plain = ask(model, tokenizer, kg, index, QUESTION, -1, max_masks=1)
    assert plain.topic is None and not plain.evidence


def test_entity_answers_name_the_entity_and_the_fact(trained):
    """With the graph's names, the answer is a whole entity name at its own piece count, with
    the triple that links it to the topic; without a likely name it says it is free text."""
    model, tokenizer, kg, index, _ = trained
    names = EntityNames(kg, tokenizer, max_masks=3)
    for question, topic, answer in QUESTIONS:
        got = ask(model, tokenizer, kg, index, question, kg.entity_names.index(topic),
                  max_masks=3, names=names)
        assert (got.text, got.entity) == (answer, f"{answer} ({answer})")
        assert got.fact == f"({answer}, capital_of, {topic})" and got.free_text is None
    unlikely = ask(model, tokenizer, kg, index, QUESTION, 1, max_masks=3, names=names,
                   min_entity_p=1.0)
    assert unlikely.entity is None and "no entity name" in unlikely.free_text


def test_topic_linking_without_qa_data_goes_by_names(trained):
    _, _, kg, _, root = trained
    linker = load_linker(root, kg)  # a toy graph: no train questions to fit on
    assert kg.entity_names[linker.link("what is the capital of Italy?").entity] == "italy"
    assert linker.link("what is the capital of spain?").entity == -1


def test_command_line(trained, capsys):
    *_, root = trained
    assert main([str(root / "qa"), QUESTION, "--topic", "italy", "--data-dir", str(root),
                 "--max-masks", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: rome (rome)") and "topic entity: italy (italy)" in out
    assert "fact: (rome, capital_of, italy)" in out and "(italy, part_of, europe)" in out
    assert main([str(root / "qa"), "what is the capital of Italy?", "--data-dir", str(root),
                 "--max-masks", "2"]) == 0
    assert "topic entity: italy (italy)" in capsys.readouterr().out  # linked


def test_a_wrong_model_directory_names_the_one_to_pass(trained, capsys):
    *_, root = trained
    from hitter_core.cli import run_cli

    assert run_cli(main, [str(root), QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a QA model directory" in err
    assert f"pass {root / 'qa'}" in err or "best/" in err


def test_link_head_evidence_is_the_relations_asked(trained, minilm_path):
    """With the link head, the evidence is the topic's relations that HittER was asked about,
    with the question's weight on each (every relation of the topic, in either direction)."""
    _, tokenizer, kg, index, root = trained
    model, _ = build_model(KGQAConfig(lm=minilm_path, kg_checkpoint=str(root / "hitter"),
                                      reader="link", freeze_kg=True))
    model.mask_token_id = tokenizer.mask_token_id
    model.head.set_tables(kg, tokenizer)
    got = ask(model.eval(), tokenizer, kg, index, QUESTION, kg.entity_names.index("france"),
              max_masks=1)
    assert {e.fact for e in got.evidence} == {"(?, capital_of, france)",
                                              "(france, part_of, ?)"}
    assert sum(e.weight for e in got.evidence) == pytest.approx(1.0)
    assert got.read == "the relations HittER was asked" and got.gate == 0.0  # beta starts at 0


def test_a_model_saved_before_readers_loads_and_answers_the_same(trained, tmp_path):
    """A QA model saved before model.reader (config.json with the old flags, the copy head's
    weights under copy_head.*) loads as reader "copy" with the same weights and answers."""
    model, tokenizer, kg, index, root = trained
    old = tmp_path / "old"
    shutil.copytree(root / "qa", old)
    config = json.loads((old / "config.json").read_text())
    del config["reader"]
    config |= {"adapter": "none", "copy_head": True, "copy_name_keys": False,
               "link_head": False, "link_confidence": False, "kg_text_length": 0}
    (old / "config.json").write_text(json.dumps(config))
    weights = load_file(old / "model.safetensors")
    save_file({k.replace("head.", "copy_head.", 1) if k.startswith("head.") else k: v
               for k, v in weights.items()}, old / "model.safetensors", metadata={"format": "pt"})
    loaded = KGEnhancedLM.from_pretrained(old).eval()
    loaded.mask_token_id = tokenizer.mask_token_id
    assert loaded.config.reader == "copy" and type(loaded.head) is type(model.head)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    question, topic, answer = QUESTIONS[0]
    got = ask(loaded, tokenizer, kg, index, question, kg.entity_names.index(topic), max_masks=1)
    assert got.text == answer and got.evidence[0].entity == answer


def test_the_length_prior_reads_the_question(trained):
    """kgqa.answer_length: naive Bayes from the question's words to the answer's piece count."""
    from kgqa.answer_length import AnswerLengths

    tokenizer = trained[1]
    examples = ([QAExample(f"c{i}", f"what is the capital of country {i}?", None, "paris", None)
                 for i in range(5)]
                + [QAExample(f"w{i}", f"who wrote book {i}?", None, "victor marie hugo", None)
                   for i in range(5)])
    lengths = AnswerLengths.fit(examples, tokenizer)
    capital, author = (lengths.log_bonus("what is the capital of spain?"),
                       lengths.log_bonus("who wrote this book?"))
    assert capital[1] > capital[3] and author[3] > author[1]
    assert AnswerLengths(None).log_bonus("who wrote this book?") == {}  # no data: no prior
