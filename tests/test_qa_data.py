"""QA data: readers, HittER's selection rule, full/filtered/dev splits, cloze inputs, prepare CLI.

Real-data tests compare our splits with HittER's released files; the official FreebaseQA JSON
is not available here, so its reader is tested on a small hand-made file in that format.
"""

import json
import random

import pytest
import torch

from hitter_core.data import DataFormatError
from kgqa import batches as qa_batches
from kgqa.batches import IGNORE_INDEX, ClozeCollator, build_cloze_dataset
from kgqa.data import filtered, load_examples, save_examples, split_dev
from kgqa.qa_readers import (
    HITTER_PLACEHOLDER_ID,
    QAExample,
    read_freebaseqa_json,
    read_freebaseqa_tab,
    read_hitter_json,
    read_webqsp,
    select_examples,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def entity_index(fb15k237):
    return fb15k237.entity_index()


@pytest.fixture(scope="module")
def webqsp(data_root, entity_index):
    return {
        split: select_examples(read_webqsp(data_root / f"webqsp/WebQSP.{split}.json"), entity_index)
        for split in ("train", "test")
    }


def _hitter(data_root, dataset, variant, split, num_entities=14541):
    path = data_root / dataset / "hitter_format" / variant / f"{split}.json"
    return read_hitter_json(path, num_entities)


def _key(e: QAExample):
    return (e.question_id, e.topic_entity, e.answer_entity, e.answer, e.relation)


TOY_INDEX = {"/m/0t1": 0, "/m/0t2": 1, "/m/0a1": 2, "/m/0a2": 3}


def _fbqa_question(qid, parses, text="Who?"):
    return {
        "Question-ID": qid,
        "RawQuestion": text,
        "ProcessedQuestion": text.lower(),
        "Parses": [
            {
                "Parse-Id": f"{qid}.P{i}",
                "PotentialTopicEntityMention": "x",
                "TopicEntityName": "x",
                "TopicEntityMid": topic,
                "InferentialChain": "a.b.c",
                "Answers": [{"AnswersMid": m, "AnswersName": names} for m, names in answers],
            }
            for i, (topic, answers) in enumerate(parses)
        ],
    }


def _write_fbqa(path, questions):
    path.write_text(json.dumps({"Dataset": "FreebaseQA-eval", "Version": "1.0",
                                "Questions": questions}))
    return path


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_webqsp_filtered_equals_hitter_release(data_root, webqsp):
    for split, expected in (("train", 850), ("test", 484)):
        ours = filtered(webqsp[split].examples)
        theirs = _hitter(data_root, "webqsp", "relphormer-filtered", split).examples
        assert len(ours) == len(theirs) == expected
        # Same question ids (WebQTest-600 corrected), topics, answers and answer names.
        assert sorted(map(_key, ours)) == sorted(map(_key, theirs))
    ids = [e.question_id for e in filtered(webqsp["test"].examples)]
    assert "WebQTest-600" in ids and "WebQTest-0" not in ids


@pytest.mark.realdata
def test_webqsp_full_equals_hitter_release_except_empty_names(data_root, webqsp):
    for split, raw, kept in (("train", 3098, 2985), ("test", 1639, 1571)):
        sel = webqsp[split]
        assert sel.num_questions == raw
        assert len(sel.examples) == kept
        assert sum(map(len, sel.skipped.values())) == raw - kept
        release = _hitter(data_root, "webqsp", "relphormer", split).examples
        theirs = {e.question_id: _key(e) for e in release}
        # HittER's 2,997 / 1,582 also hold 12 / 11 questions whose answer name is empty (zero
        # masks); the reader drops those, so what remains must agree example by example ...
        assert len(theirs) == kept
        ours = {e.question_id: _key(e) for e in sel.examples}
        assert ours.keys() == theirs.keys()
        diff = {k for k in ours if ours[k] != theirs[k]}
        # ... except where the answer really is /m/0q96, whose id 14540 the release also uses
        # as "not in the KG" (the HittER reader reads it as None).
        assert diff == {"train": {"WebQTrn-3734"}, "test": set()}[split]
        for k in diff:
            assert ours[k][2] == HITTER_PLACEHOLDER_ID and theirs[k][2] is None
            assert ours[k][:2] + ours[k][3:] == theirs[k][:2] + theirs[k][3:]
        assert sel.skipped.keys() <= {"no answer", "no answer name"}


@pytest.mark.realdata
def test_hitter_release_counts_and_placeholder(data_root):
    for dataset, split, full, filt in (
        ("freebaseqa", "train", None, 3713),
        ("freebaseqa", "dev", 3994, 743),
        ("freebaseqa", "test", 3996, 755),
        ("webqsp", "train", 2997, 850),
        ("webqsp", "test", 1582, 484),
    ):
        f = _hitter(data_root, dataset, "relphormer-filtered", split)
        assert len(f.examples) == filt and all(e.in_graph for e in f.examples)
        assert {e.relation for e in f.examples} == {0}
        if full is None:
            continue
        sel = _hitter(data_root, dataset, "relphormer", split)
        assert sel.num_questions == full
        # 14540 read as "not in the KG": the in-graph part of the full file is the filtered file.
        assert sorted(map(_key, filtered(sel.examples))) == sorted(map(_key, f.examples))
        assert all(HITTER_PLACEHOLDER_ID not in (e.topic_entity, e.answer_entity)
                   for e in sel.examples)


@pytest.mark.realdata
def test_freebaseqa_prerelease_tab(data_root, entity_index):
    root = data_root / "freebaseqa" / "prerelease_2017"
    dev = select_examples(read_freebaseqa_tab(root / "FreebaseQA-dev.tab"), entity_index)
    ev = select_examples(read_freebaseqa_tab(root / "FreebaseQA-eval.tab"), entity_index)
    assert len(filtered(dev.examples)) == 743  # HittER: 743
    assert len(filtered(ev.examples)) == 757  # HittER: 755 (released set differs slightly)
    assert ev.num_questions == 4000 and ev.examples[0].question_id == "FreebaseQA-eval-tab-0"
    # Where the question text matches HittER's dev file, topic and answer agree.
    theirs = {e.question.replace('"', ""): e for e in
              _hitter(data_root, "freebaseqa", "relphormer-filtered", "dev").examples}
    pairs = [(e, theirs[e.question.replace('"', "")]) for e in filtered(dev.examples)
             if e.question.replace('"', "") in theirs]
    assert len(pairs) > 650
    assert all(a.topic_entity == b.topic_entity and a.answer_entity == b.answer_entity
               and a.answer == b.answer for a, b in pairs)


@pytest.mark.realdata
def test_cloze_labels_come_from_answer_names(data_root, tokenizer):
    path = data_root / "freebaseqa/hitter_format/relphormer-filtered/test.json"
    released = json.loads(path.read_text())
    examples = read_hitter_json(path, 14541).examples
    ds = build_cloze_dataset(examples, tokenizer)
    assert len(ds) == 755
    n_not_pieces = 0
    for row, rel in zip(ds, released, strict=True):
        pieces = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        # Same ids as HittER's string, RawQuestion + "[MASK]" * n + "." (WordPiece).
        hitter_text = rel["RawQuestion"] + "[MASK]" * len(pieces) + "."
        assert row["input_ids"] == tokenizer(hitter_text)["input_ids"]
        assert [t for t in row["labels"] if t != IGNORE_INDEX] == pieces
        n_not_pieces += any(t >= len(tokenizer) for t in rel["AnswerEntity"])
    assert n_not_pieces > 100  # the stored ids are often Relphormer entity tokens


@pytest.mark.realdata
def test_prepare_writes_splits_and_counts(data_root, fb15k237, tmp_path):
    from kgqa.prepare import counts_table, prepare

    out = tmp_path / "qa"
    result = prepare(data_root, out, kg=fb15k237)
    table = counts_table(result)
    assert (out / "counts.md").read_text() == table
    assert "| webqsp | train | WebQSP.train.json | 3,098 |" in table
    assert "| 2,985 | 850 | 2,997 / 850 |" in table
    assert "| freebaseqa | filtered | 3,343 | 370 | 755 | 743 |" in table
    assert any("no full split" in m for m in result.messages)  # FreebaseQA full train
    full_train = load_examples(out / "webqsp/full/train.jsonl")
    full_dev = load_examples(out / "webqsp/full/dev.jsonl")
    filt_dev = load_examples(out / "webqsp/filtered/dev.jsonl")
    assert len(full_train) + len(full_dev) == 2985
    assert not {e.question_id for e in full_train} & {e.question_id for e in full_dev}
    assert {e.question_id for e in filt_dev} == {e.question_id for e in filtered(full_dev)}
    assert len(load_examples(out / "freebaseqa/full/test.jsonl")) == 3996
    skipped = json.loads((out / "webqsp/skipped.json").read_text())
    assert "WebQTrn-228" in skipped["WebQSP.train.json"]["no answer name"]


# ----------------------------------------------------------------------------- hand-made files


def test_freebaseqa_json_reader_and_rule(tmp_path):
    path = _write_fbqa(tmp_path / "FreebaseQA-eval.json", [
        # parse 0: topic in KG, first answer not; parse 1 satisfies the rule -> parse 1.
        _fbqa_question("FreebaseQA-eval-0", [
            ("m.0t1", [("m.0zz", ["nope"]), ("m.0a1", ["alpha"])]),
            ("m.0t2", [("m.0a2", ["beta"])]),
        ]),
        # no parse satisfies it -> the last parse; topic kept only where it is in the KG.
        _fbqa_question("FreebaseQA-eval-1", [
            ("m.0t1", [("m.0zz", ["first"])]),
            ("m.0yy", [("m.0a1", ["last"])]),
        ]),
        _fbqa_question("FreebaseQA-eval-2", [("m.0t1", [("m.0a1", [])])]),  # no answer name
        _fbqa_question("FreebaseQA-eval-3", [(None, [("m.0a2", ["  gamma "])])]),
    ])
    sel = select_examples(read_freebaseqa_json(path), TOY_INDEX, source="toy")
    assert sel.num_questions == 4
    assert [_key(e) for e in sel.examples] == [
        ("FreebaseQA-eval-0", 1, 3, "beta", 0),
        ("FreebaseQA-eval-1", None, 2, "last", 0),
        ("FreebaseQA-eval-3", None, 3, "gamma", 0),
    ]
    assert sel.skipped == {"no answer name": ["FreebaseQA-eval-2"]}
    assert [e.question_id for e in filtered(sel.examples)] == ["FreebaseQA-eval-0"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q: q.pop("RawQuestion"), "FreebaseQA-eval-0: missing field 'RawQuestion'"),
        (lambda q: q["Parses"][0].pop("Answers"), "FreebaseQA-eval-0: missing field 'Answers'"),
        (lambda q: q["Parses"][0].update(TopicEntityMid="/m/0t1"), "malformed Freebase MID"),
        (lambda q: q.update(RawQuestion="  "), "FreebaseQA-eval-0: the question text"),
    ],
)
def test_freebaseqa_json_bad_input_names_question(tmp_path, mutate, message):
    q = _fbqa_question("FreebaseQA-eval-0", [("m.0t1", [("m.0a1", ["alpha"])])])
    mutate(q)
    with pytest.raises(DataFormatError, match=message):
        read_freebaseqa_json(_write_fbqa(tmp_path / "bad.json", [q]))


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"Questions": [')
    with pytest.raises(DataFormatError, match="broken.json: malformed JSON"):
        read_webqsp(broken)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_freebaseqa_json(tmp_path / "absent.json")
    dup = [_fbqa_question("q-1", [("m.0t1", [("m.0a1", ["a"])])])] * 2
    with pytest.raises(DataFormatError, match="q-1 occurs twice"):
        select_examples(read_freebaseqa_json(_write_fbqa(tmp_path / "dup.json", dup)), TOY_INDEX)
    tab = tmp_path / "FreebaseQA-dev.tab"
    tab.write_text("a\tb\tm.0t1\tp\tnull\tm.0a1\talpha\tQ one?\nonly\tthree\tfields\n")
    with pytest.raises(DataFormatError, match="FreebaseQA-dev.tab:2: expected 8"):
        read_freebaseqa_tab(tab)


def test_webqsp_reader_value_answers_and_missing_fields(tmp_path):
    def question(qid, answers):
        return {"QuestionId": qid, "RawQuestion": "when?", "Parses": [
            {"TopicEntityMid": "m.0t1", "Answers": answers}]}

    good = [
        question("WebQTrn-1", [{"AnswerType": "Value", "AnswerArgument": "1945",
                                "EntityName": None}]),
        question("WebQTrn-2", [{"AnswerType": "Entity", "AnswerArgument": "m.0a1",
                                "EntityName": "Alpha"}]),
    ]
    path = tmp_path / "WebQSP.train.json"
    path.write_text(json.dumps({"Version": "1.0", "Questions": good}))
    sel = select_examples(read_webqsp(path), TOY_INDEX)
    assert sel.skipped == {"no answer name": ["WebQTrn-1"]}
    assert [_key(e) for e in sel.examples] == [("WebQTrn-2", 0, 2, "Alpha", 0)]
    bad = [question("WebQTrn-3", [{"AnswerType": "Entity", "AnswerArgument": "m.0a1"}])]
    path.write_text(json.dumps({"Questions": bad}))
    with pytest.raises(DataFormatError, match="WebQTrn-3: missing field 'EntityName'"):
        read_webqsp(path)
    bad = [question("WebQTrn-4", [{"AnswerType": "Entity", "AnswerArgument": "m.0a1",
                                   "EntityName": 7}])]
    path.write_text(json.dumps({"Questions": bad}))
    with pytest.raises(DataFormatError, match="WebQTrn-4: answer name 7 is a int"):
        read_webqsp(path)
    path.write_bytes(b'{"Questions": ["\xff"]}')
    with pytest.raises(DataFormatError, match="WebQSP.train.json: not valid UTF-8 at byte 16"):
        read_webqsp(path)


def test_hitter_reader_bad_ids_and_empty_answers(tmp_path):
    def example(qid, topic=3, answer=2, name="x"):
        return {"QuestionID": qid, "RawQuestion": "q?", "TopicEntityID": topic,
                "TopicEntityName": "t", "AnswerEntity": [1], "AnswerEntityName": name,
                "AnswerEntityID": answer, "RelationID": 0}

    path = tmp_path / "test.json"
    path.write_text(json.dumps([example("a"), example("b", name=""), example("c", topic=9)]))
    sel = read_hitter_json(path, num_entities=10, placeholder_id=9)
    assert [_key(e) for e in sel.examples] == [("a", 3, 2, "x", 0), ("c", None, 2, "x", 0)]
    assert sel.skipped == {"no answer name": ["b"]}
    path.write_text(json.dumps([example("a"), example("d", answer=10)]))
    with pytest.raises(DataFormatError, match="d: AnswerEntityID 10 is not an entity id"):
        read_hitter_json(path, num_entities=10)


# ----------------------------------------------------------------------------- splits, files


def _toy_examples(n):
    return [QAExample(f"q-{i}", f"question {i}?", i % 3 or None, f"answer {i}", i % 2 or None)
            for i in range(n)]


def test_split_dev_is_deterministic_disjoint_and_subset_consistent():
    examples = _toy_examples(5000)
    train, dev = split_dev(examples)
    assert 0.08 < len(dev) / len(examples) < 0.12
    assert len(train) + len(dev) == len(examples)
    assert not {e.question_id for e in train} & {e.question_id for e in dev}
    shuffled = random.Random(0).sample(examples, len(examples))
    assert {e.question_id for e in split_dev(shuffled)[1]} == {e.question_id for e in dev}
    # The filtered dev split is the filtered part of the full dev split.
    assert split_dev(filtered(examples))[1] == filtered(dev)
    assert split_dev(examples, salt="other")[1] != dev
    with pytest.raises(ValueError):
        split_dev(examples, fraction=1.0)


def test_jsonl_roundtrip_and_bad_lines(tmp_path):
    examples = _toy_examples(5)
    assert save_examples(examples, tmp_path / "x/train.jsonl") == 5
    assert load_examples(tmp_path / "x/train.jsonl") == examples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": "q", "question": "?"}) + "\n")
    with pytest.raises(DataFormatError, match="bad.jsonl:1: missing field"):
        load_examples(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataFormatError, match="bad.jsonl:1: malformed JSON"):
        load_examples(bad)


# ----------------------------------------------------------------------------- cloze


def test_cloze_layout(tokenizer):
    examples = [
        QAExample("q1", "who wrote hamlet?", 5, "William Shakespeare", 7),
        QAExample("q2", "where is paris?", None, "France", None, relation=0),
        QAExample("q3", "what?", 1, "\x07", 2),  # no word piece: dropped
    ]
    ds = build_cloze_dataset(examples, tokenizer)
    assert ds["question_id"] == ["q1", "q2"]
    row = ds[0]
    pieces = tokenizer("William Shakespeare", add_special_tokens=False)["input_ids"]
    question = tokenizer("who wrote hamlet?", add_special_tokens=False)["input_ids"]
    mask, dot = tokenizer.mask_token_id, tokenizer.convert_tokens_to_ids(".")
    expected = [tokenizer.cls_token_id, *question, *[mask] * len(pieces), dot,
                tokenizer.sep_token_id]
    assert row["input_ids"] == expected
    assert row["labels"] == [IGNORE_INDEX] * (1 + len(question)) + pieces + [IGNORE_INDEX] * 2
    assert row["num_masks"] == len(pieces) and row["attention_mask"] == [1] * len(expected)
    assert (row["topic_entity"], row["answer_entity"]) == (5, 7)
    assert (ds[1]["topic_entity"], ds[1]["answer_entity"], ds[1]["relation"]) == (-1, -1, 0)
    with pytest.raises(DataFormatError, match="q4: 2 mask tokens"):
        build_cloze_dataset([QAExample("q4", "is [MASK] x?", 1, "paris", 2)], tokenizer)


def test_cloze_cache_is_reused_and_keyed(tokenizer, tmp_path, monkeypatch):
    examples = _toy_examples(20)
    first = build_cloze_dataset(examples, tokenizer, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("cloze-*.arrow"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(qa_batches, "_cloze_batch", fail)
    again = build_cloze_dataset(examples, tokenizer, cache_dir=tmp_path)
    assert again["labels"] == first["labels"]
    with pytest.raises(AssertionError, match="tokenized again"):  # other data: new key
        build_cloze_dataset(examples[:10], tokenizer, cache_dir=tmp_path)


def test_collate_pads(tokenizer):
    ds = build_cloze_dataset(_toy_examples(3)[:1] + [
        QAExample("long", "a much longer question with many words?", 2, "x y z", None)
    ], tokenizer)
    batch = ClozeCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 < n1
    assert batch["input_ids"][0, n0:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].sum() == n0
    assert batch["labels"][0, n0:].eq(IGNORE_INDEX).all()
    assert torch.equal(batch["answer_entity"], torch.tensor([-1, -1]))
    assert torch.equal(batch["num_masks"], torch.tensor([ds[0]["num_masks"], 3]))
    assert "kg_entities" not in batch  # no neighbour index: the no-KG model's batches


# ----------------------------------------------------------------------------- sources, prepare


@pytest.mark.realdata
def test_load_qa_splits_prepares_once_then_reads(data_root, fb15k237, tmp_path, monkeypatch):
    """Training reads the prepared splits: prepared into the cache on first use, read back
    from there afterwards (the source files are not parsed again)."""
    from kgqa import prepare as qa_prepare
    from kgqa.prepare import load_qa_splits

    splits = load_qa_splits(data_root, "webqsp", "filtered", cache_dir=tmp_path, kg=fb15k237)
    assert {k: len(v) for k, v in splits.items()} == {"train": 751, "dev": 99, "test": 484}
    (prepared,) = (tmp_path / "qa-splits").iterdir()
    assert load_examples(prepared / "webqsp/filtered/dev.jsonl") == splits["dev"]

    def fail(*args, **kwargs):
        raise AssertionError("prepared again instead of reading the cache")

    monkeypatch.setattr(qa_prepare, "prepare", fail)
    again = load_qa_splits(data_root, "webqsp", "filtered", cache_dir=tmp_path)
    assert again == splits
    with pytest.raises(FileNotFoundError, match="no train split.*FreebaseQA-train.json"):
        load_qa_splits(data_root, "freebaseqa", "full", cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="prepared again"):  # another dev fraction
        load_qa_splits(data_root, "webqsp", "filtered", dev_fraction=0.2, cache_dir=tmp_path)


def test_prepare_from_official_freebaseqa_json(tmp_path):
    """The official-JSON path end to end, on a toy KG and hand-made FreebaseQA files."""
    from kgqa.prepare import prepare

    data = tmp_path / "data"
    (data / "fb15k-237").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (data / "fb15k-237" / f"{split}.txt").write_text("/m/0t1\t/r\t/m/0a1\n/m/0t2\t/r\t/m/0a2\n")
    (data / "freebaseqa").mkdir()
    for name in ("train", "dev", "eval"):
        questions = [
            _fbqa_question(f"FreebaseQA-{name}-{i}", [(topic, [(answer, [f"answer {i}"])])])
            for i, (topic, answer) in enumerate(
                [("m.0t1", "m.0a1"), ("m.0t2", "m.0zz"), ("m.0t2", "m.0a2")] * 10
            )
        ]
        questions.append(_fbqa_question(f"FreebaseQA-{name}-x", [("m.0t1", [("m.0a1", [])])]))
        _write_fbqa(data / "freebaseqa" / f"FreebaseQA-{name}.json", questions)
    out = tmp_path / "out"
    sources = prepare(data, out)
    assert not [m for m in sources.messages if m.startswith("freebaseqa")]
    full = {s: load_examples(out / f"freebaseqa/full/{s}.jsonl") for s in ("train", "dev", "test")}
    assert len(full["train"]) + len(full["dev"]) == 30 and len(full["test"]) == 30
    assert len(load_examples(out / "freebaseqa/filtered/official-dev.jsonl")) == 20
    assert json.loads((out / "freebaseqa/skipped.json").read_text())["FreebaseQA-eval.json"] == {
        "no answer name": ["FreebaseQA-eval-x"]
    }
    assert any("webqsp train: no full split" in m for m in sources.messages)
    with pytest.raises(ValueError, match="inside the data directory"):
        prepare(data, data / "out")
