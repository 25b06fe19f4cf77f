"""Tests of the neighbourhood index (hitter_core/neighbours.py): token construction, the
duplicate-pair rule, evaluation determinism, training sampling, ground-truth removal, drop,
padding, and the on-disk cache. Tiny hand-made graphs plus real FB15K-237 / WN18RR."""

import logging
from pathlib import Path

import pytest
import torch

from hitter_core.data import KnowledgeGraph, load_kg
from hitter_core.neighbours import (
    NeighbourIndex,
    Neighbours,
    cache_key,
    ground_truth_token,
)


def make_kg(train, valid=((0, 0, 0),), num_entities=5, num_relations=2) -> KnowledgeGraph:
    return KnowledgeGraph(
        name="tiny",
        directory=Path("/nonexistent"),
        entities=[f"e{i}" for i in range(num_entities)],
        relations=[f"r{i}" for i in range(num_relations)],
        entity_names=[f"e{i}" for i in range(num_entities)],
        splits={
            "train": torch.tensor(train, dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.long),
            "test": torch.tensor(valid, dtype=torch.long),
        },
    )


def token_set(index: NeighbourIndex, entity: int) -> set[tuple[int, int]]:
    ents, rels = index.neighbours_of(entity)
    assert len(ents) == len(set(zip(ents.tolist(), rels.tolist(), strict=True)))  # no repeats
    return set(zip(ents.tolist(), rels.tolist(), strict=True))


# R = 2: outgoing tokens carry relation p + 2, incoming tokens p.
TINY_TRAIN = [
    (0, 0, 1),  # same ordered pair (0, 1) as the next triple: dropped, the later one is kept
    (0, 1, 1),
    (2, 0, 0),
    (1, 1, 0),  # reverse pair (1, 0) is a different ordered pair: kept
    (3, 0, 3),  # self-loop: both an outgoing and an incoming token at 3
]
TINY_VALID = [(0, 0, 4), (4, 1, 2)]  # entity 4 occurs only outside train


@pytest.fixture
def tiny() -> NeighbourIndex:
    kg = make_kg(TINY_TRAIN, TINY_VALID)
    return NeighbourIndex.from_triples(kg.train, kg.num_entities, kg.num_relations, seed=0)


def test_token_construction(tiny):
    assert token_set(tiny, 0) == {(1, 3), (2, 0), (1, 1)}
    assert token_set(tiny, 1) == {(0, 1), (0, 3)}
    assert token_set(tiny, 2) == {(0, 2)}
    assert token_set(tiny, 3) == {(3, 2), (3, 0)}
    assert token_set(tiny, 4) == set()  # valid/test edges never enter the index
    assert tiny.degrees().tolist() == [3, 2, 1, 2, 0]
    assert tiny.offsets.tolist() == [0, 3, 5, 6, 8, 8]
    assert tiny.entities.dtype == tiny.relations.dtype == tiny.offsets.dtype == torch.long


def test_duplicate_pair_keeps_last_in_train_order():
    swapped = [TINY_TRAIN[1], TINY_TRAIN[0], *TINY_TRAIN[2:]]
    kg = make_kg(swapped)
    index = NeighbourIndex.from_triples(kg.train, kg.num_entities, kg.num_relations)
    assert token_set(index, 0) == {(1, 2), (2, 0), (1, 1)}  # relation 0 now came last
    assert token_set(index, 1) == {(0, 0), (0, 3)}


def test_seeded_shuffle_is_fixed_and_seed_dependent():
    train = [(0, r, t) for r in range(2) for t in range(1, 40)]
    kg = make_kg(train, num_entities=40)
    orders = [
        NeighbourIndex.from_triples(kg.train, 40, 2, seed=s).neighbours_of(0)[0].tolist()
        for s in (0, 0, 1)
    ]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2]) == list(range(1, 40))
    assert orders[0] != sorted(orders[0])  # actually shuffled, not in train order


def test_out_of_range_ids_rejected():
    with pytest.raises(ValueError, match="out of range"):
        NeighbourIndex.from_triples(torch.tensor([[0, 2, 1]]), 5, 2)


def test_ground_truth_token_by_hand():
    R = 3
    # tail query (s, p=1, ?) answer 7 -> token (7, 1 + R); head query (o, p + R = 5, ?)
    # answer 9 -> token (9, 2)
    ents, rels = ground_truth_token(torch.tensor([7, 9]), torch.tensor([1, 5]), R)
    assert ents.tolist() == [7, 9]
    assert rels.tolist() == [4, 2]


def test_ground_truth_token_is_in_the_sources_neighbourhood(tiny):
    # For triple (2, 0, 0): the tail query from 2 and the head query from 0 both find it.
    R = 2
    ents, rels = ground_truth_token(torch.tensor([0, 2]), torch.tensor([0, 0 + R]), R)
    assert (int(ents[0]), int(rels[0])) in token_set(tiny, 2)
    assert (int(ents[1]), int(rels[1])) in token_set(tiny, 0)


def test_eval_is_first_k_of_stored_order_and_padding_masked(tiny):
    nb = tiny.gather(torch.tensor([0, 4, 2, 3]), max_neighbours=2)
    assert isinstance(nb, Neighbours)
    assert nb.entities.shape == nb.relations.shape == nb.mask.shape == (4, 2)
    assert nb.mask.sum(1).tolist() == [2, 0, 1, 2]  # min(degree, max)
    for row, src in enumerate([0, 4, 2, 3]):
        ents, rels = tiny.neighbours_of(src)
        k = int(nb.mask[row].sum())
        assert nb.entities[row, :k].tolist() == ents[:k].tolist()
        assert nb.relations[row, :k].tolist() == rels[:k].tolist()
    assert (nb.entities[~nb.mask] == 0).all() and (nb.relations[~nb.mask] == 0).all()
    wide = tiny.gather(torch.tensor([0, 4]), max_neighbours=10)
    assert wide.mask.shape == (2, 3)  # width = largest count in the batch, not the max
    assert tiny.gather(torch.tensor([4]), 10).mask.shape == (1, 0)
    assert tiny.gather(torch.tensor([], dtype=torch.long), 10).mask.shape == (0, 0)


def test_eval_refuses_training_operations(tiny):
    with pytest.raises(ValueError, match="training-only"):
        tiny.gather(torch.tensor([0]), 5, drop=0.5)
    with pytest.raises(ValueError, match="training-only"):
        tiny.gather(torch.tensor([0]), 5, exclude_entity=torch.tensor([1]),
                    exclude_relation=torch.tensor([3]))
    with pytest.raises(ValueError, match="both"):
        tiny.gather(torch.tensor([0]), 5, train=True, exclude_entity=torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        tiny.gather(torch.tensor([0, 1]), 5, train=True, exclude_entity=torch.tensor([1]),
                    exclude_relation=torch.tensor([3]))


def test_training_exclusion_on_tiny_graph(tiny):
    # Source 0 holds (1, 3) and (1, 1): only the exact (entity, relation) token goes.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        nb = tiny.gather(torch.tensor([0, 0]), 5, train=True, generator=g,
                         exclude_entity=torch.tensor([1, 5]),
                         exclude_relation=torch.tensor([3, 3]))
        row0 = set(zip(nb.entities[0][nb.mask[0]].tolist(),
                       nb.relations[0][nb.mask[0]].tolist(), strict=True))
        assert row0 == {(2, 0), (1, 1)}
        assert int(nb.mask[1].sum()) == 3  # absent token: nothing removed
        assert nb.mask.tolist() == [[True, True, False], [True, True, True]]
        assert (nb.entities[~nb.mask] == 0).all()


def _sample_frequencies(index, source, k, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = index.gather(torch.full((draws,), source), k, train=True, generator=g)
    ents, rels = index.neighbours_of(source)
    code = ents * 2 * index.num_relations + rels
    batch = nb.entities * 2 * index.num_relations + nb.relations  # (B, N)
    assert nb.mask.all() and nb.mask.shape == (draws, min(k, len(ents)))
    # every row is a subset of the source's tokens without repeats
    assert torch.isin(batch, code).all()
    assert (batch.sort(1).values.diff(dim=1) != 0).all()
    anywhere = (batch[:, :, None] == code).any(1).double().mean(0)  # (D,)
    first = (batch[:, :1] == code).double().mean(0)  # (D,)
    return anywhere, first


@pytest.mark.parametrize("degree", [5, 9, 30])  # dense path (<= 2k) and hub path (> 2k)
def test_training_subsets_are_uniform(degree):
    k, draws = 4, 20000
    kg = make_kg([(0, 0, t) for t in range(1, degree + 1)], num_entities=degree + 1)
    index = NeighbourIndex.from_triples(kg.train, kg.num_entities, kg.num_relations)
    anywhere, first = _sample_frequencies(index, 0, k, draws)
    p = min(k, degree) / degree
    tol = 5 * (p * (1 - p) / draws) ** 0.5 + 1e-9
    assert (anywhere - p).abs().max() < tol
    q = 1 / degree
    assert (first - q).abs().max() < 5 * (q * (1 - q) / draws) ** 0.5


def test_training_randomness_and_reproducibility():
    kg = make_kg([(0, 0, t) for t in range(1, 60)], num_entities=60)
    index = NeighbourIndex.from_triples(kg.train, kg.num_entities, kg.num_relations)
    src = torch.zeros(8, dtype=torch.long)
    a = index.gather(src, 10, train=True, generator=torch.Generator().manual_seed(3))
    b = index.gather(src, 10, train=True, generator=torch.Generator().manual_seed(3))
    c = index.gather(src, 10, train=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.entities, b.entities) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.entities, c.entities)
    assert len({tuple(row) for row in a.entities.tolist()}) > 1  # rows differ from each other
    assert not torch.equal(index.gather(src, 10, train=True).entities,
                           index.gather(src, 10, train=True).entities)


# --------------------------------------------------------------------------- cache


def write_dataset(directory: Path, train, valid=(("a", "r", "b"),)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.txt").write_text("".join("\t".join(t) + "\n" for t in train))
    for split in ("valid", "test"):
        (directory / f"{split}.txt").write_text("".join("\t".join(t) + "\n" for t in valid))
    return directory


TINY_FILE = [("a", "r", "b"), ("b", "s", "c"), ("c", "r", "a"), ("a", "s", "c")]


def test_cache_roundtrip_and_reuse(tmp_path, monkeypatch):
    kg = load_kg(write_dataset(tmp_path / "ds", TINY_FILE))
    cache = tmp_path / "cache"
    built = NeighbourIndex.build(kg, cache_dir=cache)
    files = list(cache.glob("neighbours-ds-*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although a cache file exists")

    monkeypatch.setattr(NeighbourIndex, "from_triples", no_build)
    loaded = NeighbourIndex.build(kg, cache_dir=cache)
    for name in ("offsets", "entities", "relations"):
        assert torch.equal(getattr(built, name), getattr(loaded, name))
    assert loaded.num_relations == kg.num_relations
    src = torch.arange(kg.num_entities)
    for x, y in zip(built.gather(src, 2), loaded.gather(src, 2), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(AssertionError, match="rebuilt"):  # a different seed is another key
        NeighbourIndex.build(kg, seed=1, cache_dir=cache)


def test_cache_key_follows_train_file(tmp_path):
    kg = load_kg(write_dataset(tmp_path / "ds", TINY_FILE))
    key = cache_key(kg, 0)
    assert cache_key(load_kg(tmp_path / "ds"), 0) == key  # stable for the same content
    assert cache_key(kg, 1) != key
    write_dataset(tmp_path / "ds", [*TINY_FILE, ("b", "r", "a")])
    changed = load_kg(tmp_path / "ds")
    assert cache_key(changed, 0) != key
    NeighbourIndex.build(kg, cache_dir=tmp_path / "cache")
    index = NeighbourIndex.build(changed, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert len(index.entities) == 2 * 5


def test_corrupt_cache_is_rebuilt(tmp_path):
    kg = load_kg(write_dataset(tmp_path / "ds", TINY_FILE))
    cache = tmp_path / "cache"
    good = NeighbourIndex.build(kg, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    again = NeighbourIndex.build(kg, cache_dir=cache)
    assert torch.equal(again.entities, good.entities)
    assert NeighbourIndex.load(path).entities.tolist() == good.entities.tolist()  # rewritten


def test_default_cache_dir_is_not_the_data_dir(tmp_path, monkeypatch):
    from hitter_core.neighbours import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hitter-kgqa"
    kg = load_kg(write_dataset(tmp_path / "ds", TINY_FILE))
    NeighbourIndex.build(kg)
    assert len(list((tmp_path / "xdg" / "hitter-kgqa").glob("*.pt"))) == 1
    assert not list((tmp_path / "ds").glob("*.pt"))


def test_degree_stats_logged_when_built(tiny, caplog):
    # Degrees 3, 2, 1, 2, 0: four sources (lower median 2) and one isolated entity.
    stats = {"sources": 4, "isolated": 1, "mean": 2.0, "median": 2.0, "max": 3}
    assert tiny.degree_stats() == stats
    empty = NeighbourIndex.from_triples(torch.zeros(0, 3, dtype=torch.long), 3, 2)
    assert empty.degree_stats() == {"sources": 0, "isolated": 3, "mean": 0.0, "median": 0.0,
                                    "max": 0}
    with caplog.at_level(logging.INFO, logger="hitter_core.neighbours"):
        NeighbourIndex.build(make_kg(TINY_TRAIN, TINY_VALID), use_cache=False)
    assert "neighbour index of tiny: 4 entities with neighbour tokens, 1 without; tokens per " \
           "entity: mean 2.0, median 2, max 3" in caplog.text


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(request, tmp_path_factory):
    """(kg, index built through the cache) for one real dataset."""
    kg = request.getfixturevalue(request.param)
    cache = tmp_path_factory.mktemp(f"cache-{request.param}")
    return kg, NeighbourIndex.build(kg, cache_dir=cache), cache


def train_queries(kg, size, generator):
    """A batch of 2 * size training queries (tail and head query of each triple)."""
    R = kg.num_relations
    h, p, t = kg.train[torch.randint(len(kg.train), (size,), generator=generator)].unbind(1)
    sources, relations, answers = torch.cat([h, t]), torch.cat([p, p + R]), torch.cat([t, h])
    return sources, *ground_truth_token(answers, relations, R)


@pytest.mark.realdata
@pytest.mark.parametrize("real", ["fb15k237", "wn18rr"], indirect=True)
def test_real_tokens_are_train_edges(real):
    kg, index, _ = real
    E, R = kg.num_entities, kg.num_relations
    h, p, t = kg.train.unbind(1)
    train_codes = (h * R + p) * E + t
    src = torch.repeat_interleave(torch.arange(E), index.degrees())  # (M,)
    out = index.relations >= R
    head = torch.where(out, src, index.entities)
    tail = torch.where(out, index.entities, src)
    codes = (head * R + index.relations % R) * E + tail
    assert torch.isin(codes, train_codes).all()
    assert len(index.entities) == 2 * len(torch.unique(h * E + t))  # one token per pair and end
    seen = torch.zeros(E, dtype=torch.bool)
    seen[h] = True
    seen[t] = True
    assert torch.equal(index.degrees() > 0, seen)  # valid/test-only entities have none
    # Of several relations joining one ordered pair, the last in train order is kept.
    last = {}
    for head_, rel_, tail_ in kg.train.tolist():
        last[head_, tail_] = rel_
    pairs = zip(src[out].tolist(), index.entities[out].tolist(), strict=True)
    expected = [last[pair] for pair in pairs]
    assert expected == (index.relations[out] - R).tolist()


@pytest.mark.realdata
@pytest.mark.parametrize("real", ["fb15k237", "wn18rr"], indirect=True)
def test_real_ground_truth_never_in_training_batch(real):
    kg, index, _ = real
    g = torch.Generator().manual_seed(0)
    max_n = 50 if kg.name == "fb15k-237" else 12
    present_total = 0
    for _ in range(20):
        sources, ex_e, ex_r = train_queries(kg, 512, g)
        state = g.get_state()
        nb = index.gather(sources, max_n, train=True, generator=g,
                          exclude_entity=ex_e, exclude_relation=ex_r)
        hit = nb.mask & (nb.entities == ex_e[:, None]) & (nb.relations == ex_r[:, None])
        assert not hit.any()
        assert nb.mask.shape[1] <= max_n
        # Same draws without exclusion: the token is there exactly where one fewer was kept.
        g.set_state(state)
        full = index.gather(sources, max_n, train=True, generator=g)
        present = (full.mask & (full.entities == ex_e[:, None])
                   & (full.relations == ex_r[:, None])).any(1)
        assert torch.equal(full.mask.sum(1) - nb.mask.sum(1), present.long())
        counts = index.degrees()[sources].clamp(max=max_n)
        assert torch.equal(full.mask.sum(1), counts)
        present_total += int(present.sum())
    assert present_total > 0.3 * 20 * 1024  # the removal did real work


@pytest.mark.realdata
@pytest.mark.parametrize("real", ["fb15k237", "wn18rr"], indirect=True)
def test_real_eval_deterministic_and_survives_cache_reload(real):
    kg, index, cache = real
    sources = torch.randint(kg.num_entities, (2000,), generator=torch.Generator().manual_seed(1))
    a, b = index.gather(sources, 50), index.gather(sources, 50)
    reloaded = NeighbourIndex.build(kg, cache_dir=cache)
    c = reloaded.gather(sources, 50)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    counts = index.degrees()[sources].clamp(max=50)
    assert torch.equal(a.mask.sum(1), counts)
    assert a.mask.shape[1] == int(counts.max()) <= 50
    assert (a.entities[~a.mask] == 0).all() and (a.relations[~a.mask] == 0).all()
    for row in range(0, 2000, 97):
        ents, rels = index.neighbours_of(int(sources[row]))
        k = int(counts[row])
        assert torch.equal(a.entities[row, :k], ents[:k])
        assert torch.equal(a.relations[row, :k], rels[:k])


@pytest.mark.realdata
@pytest.mark.parametrize("real", ["fb15k237"], indirect=True)
def test_real_drop_rate(real):
    kg, index, _ = real
    g = torch.Generator().manual_seed(2)
    sources, ex_e, ex_r = train_queries(kg, 2048, g)
    state = g.get_state()
    before = index.gather(sources, 50, train=True, generator=g,
                          exclude_entity=ex_e, exclude_relation=ex_r)
    g.set_state(state)
    after = index.gather(sources, 50, train=True, generator=g, drop=0.3,
                         exclude_entity=ex_e, exclude_relation=ex_r)
    kept = after.mask.sum() / before.mask.sum()  # ~ 90k tokens: std of the rate ~ 0.0015
    assert abs(float(kept) - 0.7) < 0.01
    assert (after.mask.sum(1) <= before.mask.sum(1)).all()
    assert after.mask.shape[1] <= 50 and (after.entities[~after.mask] == 0).all()
    # kept tokens are a subset of the undropped ones, and sit at the front of their row
    assert after.mask.long().diff(dim=1).le(0).all()
    code = lambda nb: torch.where(nb.mask, nb.entities * 1000 + nb.relations, -1)  # noqa: E731
    for row in range(0, len(sources), 101):
        kept_row = set(code(after)[row].tolist()) - {-1}
        assert kept_row <= set(code(before)[row].tolist())
