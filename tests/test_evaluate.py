"""Filtered evaluation in both directions: hand-ranked tiny graph, CLI, real FB15K-237."""

import json
from collections import defaultdict

import pytest
import torch

from hitter_core import evaluate as evaluate_module
from hitter_core.baselines import RelationFrequencyScorer
from hitter_core.data import load_kg
from hitter_core.evaluate import evaluate, evaluate_checkpoint, format_table, main
from hitter_core.ranking import FilterIndex

# Tiny graph (ids by first appearance): entities a b c d = 0..3, relations r1 r2 = 0, 1; R = 2.
TRAIN = ["a\tr1\tb", "a\tr1\tc", "d\tr1\tc", "b\tr2\ta"]
VALID = ["c\tr2\td"]
TEST = ["a\tr1\td", "b\tr2\td"]
A, B, C, D = range(4)
R = 2

# Scores of the four test queries over entities (a, b, c, d), with their filtered ranks.
TINY_SCORES = {
    # tail (a, r1) -> d; b, c filtered; a above: rank 2
    (A, 0): [0.5, 0.9, 0.8, 0.1],
    # head (d, r1 + R) -> a; nothing else known; a tied with b, c: rank (1 + 2 + 3) / 3 = 2
    (D, 0 + R): [0.3, 0.3, 0.3, 0.0],
    # tail (b, r2) -> d; a filtered: rank 1
    (B, 1): [0.9, 0.2, 0.1, 0.5],
    # head (d, r2 + R) -> b; c filtered; a above, tied with d: rank 1 + 1 + 1/2 = 2.5
    (D, 1 + R): [0.7, 0.4, 0.9, 0.4],
}
TAIL_RANKS, HEAD_RANKS = [2.0, 1.0], [2.0, 2.5]


def tiny_scorer(sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
    # A KeyError here means a query was formed wrongly (e.g. head query without r + R).
    queries = zip(sources.tolist(), relations.tolist(), strict=True)
    return torch.tensor([TINY_SCORES[query] for query in queries])


def _constant(sources, relations):
    return torch.zeros(len(sources), 4)


@pytest.fixture
def tiny_kg(tmp_path):
    directory = tmp_path / "tiny"
    directory.mkdir()
    for split, lines in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return load_kg(directory)


def test_tiny_graph_both_directions(tiny_kg):
    m = evaluate(tiny_scorer, tiny_kg, "test", progress=False, return_ranks=True)
    assert m["ranks"].tolist() == TAIL_RANKS + HEAD_RANKS
    assert m["tail"]["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["head"]["mrr"] == pytest.approx((1 / 2 + 1 / 2.5) / 2)
    assert m["both"]["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 2 + 1 / 2.5) / 4)
    assert (m["tail"]["hits@1"], m["head"]["hits@1"], m["both"]["hits@1"]) == (0.5, 0.0, 0.25)
    assert m["head"]["hits@3"] == 1.0 and m["both"]["mean_rank"] == pytest.approx(7.5 / 4)
    assert (m["tail"]["count"], m["head"]["count"], m["both"]["count"]) == (2, 2, 4)
    assert m["filter_splits"] == ["train", "valid", "test"]
    assert m["per_relation"] == {
        "r1": {"count": 1, "mrr": pytest.approx(0.5), "hits@10": 1.0},
        "r2": {"count": 1, "mrr": pytest.approx((1 + 1 / 2.5) / 2), "hits@10": 1.0},
    }


def test_batch_size_does_not_change_ranks(tiny_kg):
    full = evaluate(tiny_scorer, tiny_kg, progress=False, return_ranks=True)
    for batch_size in (1, 3):
        m = evaluate(tiny_scorer, tiny_kg, batch_size=batch_size, progress=False, return_ranks=True)
        assert torch.equal(m["ranks"], full["ranks"])


def test_valid_filtering_without_test(tiny_kg):
    # Valid queries: tail (c, r2) -> d, head (d, r2 + R) -> c. Constant scores: all tied.
    without_test = FilterIndex.build(tiny_kg, ("train", "valid"))
    m = evaluate(_constant, tiny_kg, "valid", without_test, progress=False, return_ranks=True)
    assert m["ranks"].tolist() == [2.5, 2.5]  # nothing else known: mean of 1..4
    m = evaluate(_constant, tiny_kg, "valid", progress=False, return_ranks=True)
    assert m["ranks"].tolist() == [2.5, 2.0]  # test answer b of (d, r2 + R) now filtered


def test_bad_scorer_output_is_rejected(tiny_kg):
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda s, p: torch.zeros(len(s), 3), tiny_kg, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(lambda s, p: torch.full((len(s), 4), float("nan")), tiny_kg, progress=False)


def test_format_table(tiny_kg):
    m = evaluate(tiny_scorer, tiny_kg, progress=False)
    table = format_table(m, per_relation=True)
    lines = table.splitlines()
    assert lines[0].split() == ["MRR", "H@1", "H@3", "H@10", "MR", "count"]
    assert lines[1].split() == ["tail", "0.7500", "0.5000", "1.0000", "1.0000", "1.5", "2"]
    assert lines[3].split()[:2] == ["both", "0.6000"]
    assert any(line.split() == ["r2", "1", "0.7000", "1.0000"] for line in lines)


def _fake_loader(tiny_kg, scorer=tiny_scorer):
    calls = []

    def load(checkpoint, data_dir, device):
        calls.append((checkpoint, data_dir, device))
        return scorer, tiny_kg

    return load, calls


def test_evaluate_checkpoint_with_loader(tiny_kg, tmp_path):
    load, calls = _fake_loader(tiny_kg)
    m = evaluate_checkpoint("ckpt", data_dir=tmp_path, load=load, progress=False)
    assert calls == [("ckpt", tmp_path, torch.device("cpu"))]
    assert m["checkpoint"] == "ckpt" and m["dataset"] == "tiny" and m["split"] == "test"
    assert m["both"]["mrr"] == pytest.approx(0.6)


def test_cli_main(tiny_kg, tmp_path, monkeypatch, capsys):
    load, _ = _fake_loader(tiny_kg)
    monkeypatch.setattr(evaluate_module, "load_checkpoint_scorer", load)
    output = tmp_path / "out" / "metrics.json"
    argv = ["ckpt", "--data-dir", str(tmp_path), "--output", str(output), "--device", "cpu"]
    main([*argv, "--per-relation", "--no-progress", "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert "tail" in printed and "both" in printed and "r1" in printed
    saved = json.loads(output.read_text())
    assert saved["both"]["mrr"] == pytest.approx(0.6)
    assert saved["per_relation"]["r2"]["count"] == 1

    load, _ = _fake_loader(tiny_kg, _constant)
    monkeypatch.setattr(evaluate_module, "load_checkpoint_scorer", load)
    main([*argv, "--split", "valid", "--filter-splits", "train", "valid", "--no-progress"])
    saved = json.loads(output.read_text())
    assert saved["split"] == "valid" and saved["filter_splits"] == ["train", "valid"]
    assert saved["both"]["mean_rank"] == 2.5  # the test answer b is not filtered


@pytest.mark.gpu
def test_gpu_matches_cpu(tiny_kg):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    def scorer(sources, relations):
        return tiny_scorer(sources, relations).to(sources.device)

    cpu = evaluate(scorer, tiny_kg, progress=False, return_ranks=True)
    gpu = evaluate(scorer, tiny_kg, device="cuda", progress=False, return_ranks=True)
    assert torch.equal(cpu["ranks"], gpu["ranks"])


# ------------------------------------------------------------------------- FB15K-237


def _known_answers(kg):
    """(source, relation token) -> set of answers over train + valid + test, plain Python."""
    known = defaultdict(set)
    for split in ("train", "valid", "test"):
        for h, r, t in kg.splits[split].tolist():
            known[(h, r)].add(t)
            known[(t, r + kg.num_relations)].add(h)
    return known


@pytest.mark.realdata
def test_fb15k237_oracle_scores_mrr_one(fb15k237):
    """Score 1 for every test answer of the query, 0 elsewhere: after filtering the other
    (known) answers, the target is alone at the top in both directions."""
    num_r = fb15k237.num_relations
    test_answers = defaultdict(list)
    for h, r, t in fb15k237.test.tolist():
        test_answers[(h, r)].append(t)
        test_answers[(t, r + num_r)].append(h)
    assert max(len(v) for v in test_answers.values()) > 1  # the filter is really exercised

    def oracle(sources, relations):
        scores = torch.zeros(len(sources), fb15k237.num_entities)
        rows, cols = [], []
        for i, key in enumerate(zip(sources.tolist(), relations.tolist(), strict=True)):
            rows += [i] * len(test_answers[key])
            cols += test_answers[key]
        scores[rows, cols] = 1.0
        return scores

    m = evaluate(oracle, fb15k237, "test", batch_size=2048, progress=False)
    for direction in ("tail", "head", "both"):
        assert m[direction]["mrr"] == 1.0 and m[direction]["hits@1"] == 1.0, direction
    assert m["both"]["count"] == 2 * len(fb15k237.test)


@pytest.mark.realdata
def test_fb15k237_constant_scorer_matches_hand_ranks(fb15k237):
    """All scores equal: the target ties with every unfiltered entity, so its realistic rank is
    (E - #other known answers + 1) / 2, with the known answers counted in plain Python."""
    num_e, num_r = fb15k237.num_entities, fb15k237.num_relations
    known = _known_answers(fb15k237)
    expected = [
        (num_e - (len(known[(h, r)]) - 1) + 1) / 2 for h, r, _ in fb15k237.test.tolist()
    ] + [(num_e - (len(known[(t, r + num_r)]) - 1) + 1) / 2 for _, r, t in fb15k237.test.tolist()]
    expected = torch.tensor(expected, dtype=torch.float64)

    def constant(sources, relations):
        return torch.zeros(len(sources), num_e)

    m = evaluate(constant, fb15k237, "test", batch_size=2048, progress=False, return_ranks=True)
    assert torch.equal(m["ranks"], expected)
    num_t = len(fb15k237.test)
    assert m["tail"]["mrr"] == pytest.approx(float((1 / expected[:num_t]).mean()), rel=1e-12)
    assert m["head"]["mrr"] == pytest.approx(float((1 / expected[num_t:]).mean()), rel=1e-12)
    assert m["both"]["mrr"] == pytest.approx(float((1 / expected).mean()), rel=1e-12)
    # Per-relation counts add up to the split.
    assert sum(v["count"] for v in m["per_relation"].values()) == num_t


def test_cli_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a HittER checkpoint directory"):
        main([str(tmp_path / "missing"), "--no-progress"])


def test_relation_frequency_baseline_by_hand(tiny_kg, tmp_path, capsys):
    """Counts of answers per relation in train: r1 tails b 1, c 2; r1 heads a 2, d 1; r2 tails
    a 1; r2 heads b 1. Filtered ranks: (a, r1) -> d ties with a after b, c are filtered: 1.5;
    (b, r2) -> d ties with b, c after a is filtered: 2; both head queries rank first."""
    m = evaluate(RelationFrequencyScorer(tiny_kg), tiny_kg, "test", progress=False,
                 return_ranks=True)
    assert m["ranks"].tolist() == [1.5, 2.0, 1.0, 1.0]
    main(["--baseline", "frequency", "--dataset", "tiny", "--data-dir", str(tmp_path),
          "--no-progress", "--output", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["checkpoint"] == "baseline:frequency"
    assert saved["both"]["mrr"] == pytest.approx((1 / 1.5 + 1 / 2 + 2) / 4)
    for argv in ([], ["ckpt", "--baseline", "frequency", "--dataset", "tiny"],
                 ["--baseline", "frequency"], ["ckpt", "--dataset", "tiny"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "--baseline" in capsys.readouterr().err


@pytest.mark.realdata
def test_fb15k237_relation_frequency_baseline(fb15k237):
    """The floor of every FB15K-237 MRR: filtered test MRR 0.2334 with nothing learned."""
    m = evaluate(RelationFrequencyScorer(fb15k237), fb15k237, "test", batch_size=4096,
                 progress=False)
    assert m["both"]["mrr"] == pytest.approx(0.2334, abs=1e-4)
