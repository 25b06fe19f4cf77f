"""The topic linker (kgqa.linker) and the user setting (kgqa.user_setting): on a toy graph the
relation a question asks picks its topic among the entities it names; on the real data the
linker finds the annotated topic as often as it did when it was fit (WebQSP >= 90%), and a KG
model answering the test questions as a user would gives entity names and a summary."""

import json
import shutil

import pytest
import torch

from hitter_core.config import HittERConfig
from hitter_core.data import load_kg
from hitter_core.model import HittER
from kgqa.config import KGQAConfig
from kgqa.data import QAExample
from kgqa.linker import AliasTable, TopicLinker, load_linker, normalise
from kgqa.model import build_model
from kgqa.prepare import load_qa_splits
from kgqa.report import build_report, find_run_results, format_markdown
from kgqa.user_setting import linker_accuracy, user_setting

TRAIN = ["paris\tcapital_of\tfrance", "berlin\tcapital_of\tgermany", "rome\tcapital_of\titaly",
         "madrid\tcapital_of\tspain", "france\tpart_of\teurope", "germany\tpart_of\teurope",
         "italy\tpart_of\teurope", "spain\tpart_of\teurope", "europe\tpart_of\tearth"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_graph):
    return toy_graph(tmp_path_factory.mktemp("toy"), TRAIN)


def test_aliases_match_normalised_text(toy):
    aliases = AliasTable.build(toy)
    assert normalise("L.A. Confidential & Co") == "l a confidential and co"
    assert normalise("L.A.", keep_gaps=False) == "la"
    assert set(aliases.entities["paris"]) == {toy.entity_names.index("paris")}


def test_the_relation_asked_picks_the_topic(toy):
    """"... capital of italy in europe?" names italy and europe; by names alone the entity
    with more relations (europe) wins; fit on questions that ask for a capital, the linker
    picks the entity that has one (italy)."""
    e = toy.entity_names.index
    train = [QAExample(f"q{i}", f"what is the capital of {c}?", e(c), a, e(a))
             for i, (c, a) in enumerate([("france", "paris"), ("germany", "berlin"),
                                         ("spain", "madrid")] * 4)]
    train += [QAExample(f"p{i}", f"which continent is {c} part of?", e(c), "europe",
                        e("europe")) for i, c in enumerate(["france", "germany", "spain"] * 4)]
    aliases = AliasTable.build(toy)
    question = "what is the capital of italy in europe?"
    assert TopicLinker.by_names(toy, aliases).link(question).entity == e("europe")
    fit = TopicLinker.fit(toy, aliases, train, folds=2)
    assert fit.link(question).entity == e("italy")
    assert fit.link("which continent is italy part of?").entity == e("italy")


@pytest.mark.realdata
def test_the_linker_finds_the_annotated_topic(data_root, fb15k237):
    linker = load_linker(data_root, fb15k237)
    webqsp = load_qa_splits(data_root, "webqsp", "filtered", kg=fb15k237)["test"]
    assert linker_accuracy(linker, webqsp)["accuracy"] >= 0.89  # 90.5% (438/484) when fit
    link = linker.link("what is the capital of Somalia?")
    assert fb15k237.entity_names[link.entity] == "Somalia"


@pytest.mark.realdata
def test_the_user_setting_answers_with_entities(data_root, fb15k237, tiny_lm, tmp_path):
    """A (random) link-head model over a (random) FB15K-237 HittER: every answer an entity name
    or marked free text, the files written, the report's user-setting table filled."""
    torch.manual_seed(0)
    HittER(HittERConfig(dataset="fb15k-237", num_entities=fb15k237.num_entities,
                        num_relations=fb15k237.num_relations, hidden_size=32,
                        num_attention_heads=2, intermediate_size=64, num_context_layers=1,
                        max_neighbours=4)).save_pretrained(tmp_path / "hitter")
    model, _ = build_model(KGQAConfig(lm=tiny_lm, kg_checkpoint=str(tmp_path / "hitter"),
                                      reader="link", freeze_kg=True, max_neighbours=4))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model.head.set_tables(fb15k237, tokenizer)
    run = tmp_path / "run"
    model.save_pretrained(run / "best")
    tokenizer.save_pretrained(run / "best")
    (run / "metrics.json").write_text(json.dumps({
        "dataset": "webqsp", "split": "filtered", "lm": "tiny", "kg": "frozen", "seed": 1,
        "variant": {"reader": "link", "protocol": {
            "epochs": 1, "lr_new": 1e-3, "lr_pretrained": 1e-4, "batch_size": 4,
            "max_train_examples": 8, "max_eval_examples": 6}},
        "test": {"accuracy": 0.5, "correct": 3, "total": 6}}))
    summary = user_setting(run, data_root, max_masks=2)
    assert summary["total"] == 6 and summary["protocol_accuracy"] == 0.5
    records = [json.loads(line) for line in (run / "predictions.user.test.jsonl").open()]
    assert len(records) == 6 and all(r["entity"] or r["predicted"] for r in records)
    assert summary["entity_answers"] == sum(r["entity"] is not None for r in records) / 6
    table = format_markdown(build_report(find_run_results([run])))
    assert "User setting" in table and "| webqsp filtered |" in table
    # The plain LM with --names ranks the graph's names too (kgqa.ask --names)
    plain, _ = build_model(KGQAConfig(lm=tiny_lm, reader="none"))
    plain.save_pretrained(tmp_path / "plain" / "best")
    tokenizer.save_pretrained(tmp_path / "plain" / "best")
    shutil.copy(run / "metrics.json", tmp_path / "plain" / "metrics.json")
    named = user_setting(tmp_path / "plain", data_root, max_masks=2, names=True,
                         min_entity_p=1e-9)
    assert named["entity_answers"] == 1.0 and named["total"] == 6


def test_an_entity_without_train_triples_is_never_the_topic(tmp_path):
    """HittER has no neighbourhood to read for it (it crashed the link head's forward)."""
    for split in ("train", "valid", "test"):
        extra = ["lisbon\tcapital_of\tportugal"] if split == "test" else []
        (tmp_path / f"{split}.txt").write_text("\n".join(TRAIN + extra) + "\n")
    kg = load_kg(tmp_path)
    linker = TopicLinker.by_names(kg, AliasTable.build(kg))
    assert linker.link("what is the capital of portugal?").entity == -1
    assert kg.entity_names[linker.link("what is the capital of spain?").entity] == "spain"
