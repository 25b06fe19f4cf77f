"""Rank definitions, metrics and the filter index on hand-made cases."""

import math

import pytest
import torch

from hitter_core.data import load_kg
from hitter_core.ranking import (
    FilterIndex,
    optimistic_rank,
    pessimistic_rank,
    ranking_metrics,
    realistic_rank,
)

NEG_INF = float("-inf")

# Entities a, b, c, d get ids 0..3 and relations r1, r2 ids 0, 1 (first appearance); R = 2.
TRAIN = ["a\tr1\tb", "a\tr1\tc", "d\tr1\tc", "b\tr2\ta", "a\tr1\tb"]  # last line: a duplicate
VALID = ["c\tr2\td"]
TEST = ["a\tr1\td", "b\tr2\td"]
A, B, C, D = range(4)
R1, R2 = 0, 1
R = 2


def write_tiny_graph(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return load_kg(directory)


@pytest.fixture
def tiny_kg(tmp_path):
    return write_tiny_graph(tmp_path / "tiny")


def known_answers(index: FilterIndex, source: int, relation: int) -> list[int]:
    """The known answers of one query as ``filter_scores`` applies them: filter one row of
    zeros per possible target; an entity is a known answer iff some row filters it out (a
    known answer is kept only in the row where it is the target)."""
    E = index.num_entities
    queries = torch.full((E,), source), torch.full((E,), relation)
    filtered = index.filter_scores(torch.zeros(E, E), *queries, torch.arange(E)) == NEG_INF
    return filtered.any(0).nonzero().squeeze(1).tolist()


# ------------------------------------------------------------------------------- ranks


def test_ranks_with_ties_one_above():
    # Target (index 1) tied with two others, one entity above: tied block holds ranks 2, 3, 4.
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    targets = torch.tensor([1])
    assert optimistic_rank(scores, targets).tolist() == [2.0]
    assert pessimistic_rank(scores, targets).tolist() == [4.0]
    assert realistic_rank(scores, targets).tolist() == [3.0]
    # Any member of the tied block gets the same rank.
    assert realistic_rank(scores, torch.tensor([3])).tolist() == [3.0]


def test_ranks_batch_mixed_cases():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2],  # no tie: target 2 is second
            [7.0, 7.0, 7.0, 7.0],  # all tied: mean of 1..4
            [NEG_INF, 0.0, NEG_INF, -3.0],  # filtered (-inf) entries rank below the target
            [1.0, 2.0, 2.0, 0.0],  # target tied with one other at the top: mean of 1, 2
        ]
    )
    targets = torch.tensor([2, 0, 3, 2])
    assert optimistic_rank(scores, targets).tolist() == [2.0, 1.0, 2.0, 1.0]
    assert pessimistic_rank(scores, targets).tolist() == [2.0, 4.0, 2.0, 2.0]
    assert realistic_rank(scores, targets).tolist() == [2.0, 2.5, 2.0, 1.5]


def test_ranking_metrics_by_hand():
    ranks = torch.tensor([1.0, 1.5, 3.0, 10.0, 20.0])
    m = ranking_metrics(ranks)
    assert m["mrr"] == pytest.approx((1 + 1 / 1.5 + 1 / 3 + 1 / 10 + 1 / 20) / 5)
    assert m["hits@1"] == pytest.approx(1 / 5)  # a realistic rank of 1.5 is not a hit at 1
    assert m["hits@3"] == pytest.approx(3 / 5)
    assert m["hits@10"] == pytest.approx(4 / 5)
    assert m["mean_rank"] == pytest.approx(35.5 / 5)
    assert m["count"] == 5
    with pytest.raises(ValueError):
        ranking_metrics(torch.tensor([]))


# -------------------------------------------------------------------------- filter index


def test_filter_index_answers(tiny_kg):
    index = FilterIndex.build(tiny_kg)
    assert (index.num_entities, index.num_relations) == (4, 2)
    expected = {
        (A, R1): [B, C, D],  # train (duplicate b counted once) + test d
        (D, R1): [C],
        (B, R2): [A, D],
        (C, R2): [D],  # valid
        # Head queries through the reciprocal relation hold the heads.
        (B, R1 + R): [A],
        (C, R1 + R): [A, D],
        (D, R1 + R): [A],
        (A, R2 + R): [B],
        (D, R2 + R): [B, C],  # test b, valid c
    }
    for (source, relation), answers in expected.items():
        assert known_answers(index, source, relation) == answers, (source, relation)
    assert len(index.keys) == len(expected)
    assert known_answers(index, C, R1) == []  # unknown query
    assert torch.equal(index.keys, index.keys.sort().values)


def test_filter_index_from_chosen_splits(tiny_kg):
    index = FilterIndex.build(tiny_kg, ("train", "valid"))
    assert index.splits == ("train", "valid")
    assert known_answers(index, A, R1) == [B, C]  # test answer d not known
    assert known_answers(index, D, R2 + R) == [C]
    with pytest.raises(ValueError):
        FilterIndex.build(tiny_kg, ("train", "dev"))


def test_filter_scores(tiny_kg):
    index = FilterIndex.build(tiny_kg)
    scores = torch.arange(16, dtype=torch.float32).reshape(4, 4)  # (B, E)
    sources = torch.tensor([A, C, D, B])
    relations = torch.tensor([R1, R1, R2 + R, R2])
    targets = torch.tensor([D, B, B, A])
    filtered = index.filter_scores(scores, sources, relations, targets)
    expected = scores.clone()
    expected[0, [B, C]] = NEG_INF  # (a, r1): known b, c, d; target d kept
    # row 1: (c, r1) has no known answer: untouched
    expected[2, C] = NEG_INF  # (d, r2^-1): known b, c; target b kept
    expected[3, D] = NEG_INF  # (b, r2): known a, d; target a kept although it is known
    assert torch.equal(filtered, expected)
    assert torch.equal(scores, torch.arange(16, dtype=torch.float32).reshape(4, 4))

    # Batched equals one query at a time.
    for i in range(4):
        one = index.filter_scores(
            scores[i : i + 1], sources[i : i + 1], relations[i : i + 1], targets[i : i + 1]
        )
        assert torch.equal(one[0], filtered[i])

    inplace = scores.clone()
    out = index.filter_scores(inplace, sources, relations, targets, inplace=True)
    assert out.data_ptr() == inplace.data_ptr() and torch.equal(inplace, expected)


def test_filter_scores_checks_inputs(tiny_kg):
    index = FilterIndex.build(tiny_kg)
    one = torch.tensor([A])
    with pytest.raises(ValueError):
        index.filter_scores(torch.zeros(1, 4), one, torch.tensor([2 * R]), one)
    with pytest.raises(ValueError):
        index.filter_scores(torch.zeros(1, 5), one, torch.tensor([R1]), one)


def test_filtered_realistic_rank(tiny_kg):
    """Filtering then ranking: unfiltered rank 4 becomes 2 once the other answers are gone."""
    index = FilterIndex.build(tiny_kg)
    scores = torch.tensor([[0.5, 0.9, 0.8, 0.1]])  # query (a, r1), target d
    query = (torch.tensor([A]), torch.tensor([R1]), torch.tensor([D]))
    assert realistic_rank(scores, query[2]).item() == 4.0
    filtered = index.filter_scores(scores, *query)
    assert realistic_rank(filtered, query[2]).item() == 2.0
    assert math.isinf(filtered[0, B]) and filtered[0, D] == pytest.approx(0.1)
