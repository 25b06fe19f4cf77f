"""Graph neighbourhoods of source entities (paper section 2.2 "the relational neighbourhood
N_G(e_src)" and section 2.3 "uniform neighbourhood sampling ... remove the ground truth").

Behaviour follows ``shared/design/REFERENCE.md`` ("Neighbourhoods"):

* Built from **train triples only**. With R relations, for a source s an outgoing edge
  (s, p, o) is the neighbour token (o, p + R) and an incoming edge (v, p, s) the token (v, p):
  every token is itself a query (entity, relation) whose answer would be s.
* Several relations joining the same ordered pair (h, t) keep only **the last one in train
  order** (the reference stored edges in a graph that overwrote earlier ones). The rule is per
  triple, so the outgoing token at h and the incoming token at t come from the same triple.
  After it, a source never holds the same token twice.
* Each source's list is shuffled once with a fixed seed. Evaluation takes the first ``max``
  tokens of that order. Training draws a fresh random ``max``-subset in random order, then
  removes the ground-truth token, then drops each remaining token with a given probability.

The index is stored CSR-style (``offsets``/``entities``/``relations``) and cached on disk under
a key derived from the triples themselves (see :meth:`NeighbourIndex.build`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from hitter_core.data import KnowledgeGraph

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the construction rule or the file layout changes
CACHE_DIR_NAME = "hitter-kgqa"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hitter-kgqa`` or ``~/.cache/hitter-kgqa`` (never the data directory,
    which may be read-only or shared)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_DIR_NAME


def ground_truth_token(
    answers: torch.Tensor, query_relations: torch.Tensor, num_relations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbour token that reveals the answer of a query (source, rel_q) -> answer.

    ``query_relations`` are in [0, 2R) (``p + R`` = head query, reciprocal relation). The
    source's token for the answer has the opposite direction: a tail query (s, p, ?) with
    answer o is the token (o, p + R) of s; a head query (o, p + R, ?) with answer s is (s, p).
    Returns ``(entities, relations)`` of shape (B,) each.
    """
    return answers, (query_relations + num_relations) % (2 * num_relations)


class Neighbours(NamedTuple):
    """A padded batch of neighbourhoods; padded entries hold 0 and ``mask`` False."""

    entities: torch.Tensor  # (B, N) int64
    relations: torch.Tensor  # (B, N) int64, relation-token ids in [0, 2R)
    mask: torch.Tensor  # (B, N) bool, True = real token

    def to(self, device: torch.device | str) -> Neighbours:
        return Neighbours(*(x.to(device) for x in self))


class NeighbourIndex:
    """Per-entity neighbour tokens in a fixed (seeded) order, CSR layout.

    Tokens of entity ``e`` are ``entities[offsets[e]:offsets[e + 1]]`` with the matching
    ``relations``; ``offsets`` is (E + 1,), ``entities``/``relations`` are (M,) int64.
    """

    def __init__(
        self,
        offsets: torch.Tensor,
        entities: torch.Tensor,
        relations: torch.Tensor,
        num_relations: int,
        seed: int = 0,
    ) -> None:
        if offsets.dim() != 1 or entities.shape != relations.shape or entities.dim() != 1:
            raise ValueError("offsets must be (E+1,), entities/relations (M,) of equal length")
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(entities):
            raise ValueError(f"offsets must run from 0 to M={len(entities)}")
        self.offsets = offsets
        self.entities = entities
        self.relations = relations
        self.num_relations = num_relations
        self.seed = seed

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_triples(
        cls, triples: torch.Tensor, num_entities: int, num_relations: int, seed: int = 0
    ) -> NeighbourIndex:
        """Build from (T, 3) (head, relation, tail) train triples; no cache involved."""
        if triples.dim() != 2 or triples.shape[1] != 3:
            raise ValueError(f"triples must be (T, 3), got {tuple(triples.shape)}")
        triples = triples.to("cpu", torch.long)
        h, p, t = triples.unbind(1)  # (T,) each
        if len(triples) and (
            int(torch.minimum(h, t).min()) < 0
            or int(torch.maximum(h, t).max()) >= num_entities
            or int(p.min()) < 0
            or int(p.max()) >= num_relations
        ):
            raise ValueError("triple ids out of range for the given entity/relation counts")

        # One triple per ordered pair (h, t): the last in train order.
        pair_ids, inverse = torch.unique(h * num_entities + t, return_inverse=True)
        last = torch.full((len(pair_ids),), -1, dtype=torch.long)
        last.scatter_reduce_(0, inverse, torch.arange(len(triples)), reduce="amax")
        kept = last.sort().values  # back to train order
        h, p, t = h[kept], p[kept], t[kept]

        sources = torch.cat([h, t])  # (M,)
        entities = torch.cat([t, h])
        relations = torch.cat([p + num_relations, p])  # outgoing p + R, incoming p

        # Seeded shuffle, then a stable sort by source: a random order within each source.
        perm = torch.randperm(len(sources), generator=torch.Generator().manual_seed(seed))
        sources, entities, relations = sources[perm], entities[perm], relations[perm]
        order = torch.sort(sources, stable=True).indices
        counts = torch.bincount(sources, minlength=num_entities)  # (E,)
        offsets = torch.zeros(num_entities + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=offsets[1:])
        return cls(offsets, entities[order], relations[order], num_relations, seed)

    @classmethod
    def build(
        cls,
        kg: KnowledgeGraph,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ) -> NeighbourIndex:
        """The index of ``kg``'s train triples, loaded from the on-disk cache when present.

        The cache key hashes the train id tensor (so it changes with the train file, and with
        a vocabulary change that renumbers it), E, R, the seed, :data:`FORMAT_VERSION` and the
        torch version (the seeded shuffle comes from torch's RNG). ``cache_dir`` defaults to
        :func:`default_cache_dir`. An unwritable cache directory or an unreadable cache file
        only logs a warning. The neighbourhood sizes (:meth:`degree_stats`) are logged.
        """
        if use_cache:
            index = cls._load_or_build(kg, seed, Path(cache_dir or default_cache_dir()))
        else:
            index = cls.from_triples(kg.train, kg.num_entities, kg.num_relations, seed)
        logger.info("neighbour index of %s: %d entities with neighbour tokens, %d without; "
                    "tokens per entity: mean %.1f, median %g, max %d",
                    kg.name, *index.degree_stats().values())  # in degree_stats' key order
        return index

    @classmethod
    def _load_or_build(cls, kg: KnowledgeGraph, seed: int, cache_dir: Path) -> NeighbourIndex:
        """The cached index of :meth:`build`: loaded when valid, else built and written."""
        key = cache_key(kg, seed)
        path = cache_dir / f"neighbours-{kg.name}-{key[:20]}.pt"
        if path.is_file():
            try:
                index = cls.load(path, expected_key=key)
                logger.info("neighbour index loaded from %s", path)
                return index
            except Exception as err:  # a corrupt or stale file is rebuilt, not fatal
                logger.warning("ignoring neighbour cache %s (%s); rebuilding", path, err)
        index = cls.from_triples(kg.train, kg.num_entities, kg.num_relations, seed)
        try:
            index.save(path, key=key)
            logger.info("neighbour index cached at %s", path)
        except OSError as err:
            logger.warning("could not write neighbour cache %s (%s)", path, err)
        return index

    def save(self, path: str | os.PathLike, key: str | None = None) -> None:
        """Write atomically (temporary file in the same directory, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT_VERSION,
            "key": key,
            "num_relations": self.num_relations,
            "seed": self.seed,
            "offsets": self.offsets.cpu(),
            "entities": self.entities.cpu(),
            "relations": self.relations.cpu(),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: str | None = None) -> NeighbourIndex:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {state.get('format')}, expected {FORMAT_VERSION}")
        if expected_key is not None and state.get("key") != expected_key:
            raise ValueError("cache key mismatch")
        return cls(
            state["offsets"], state["entities"], state["relations"],
            state["num_relations"], state["seed"],
        )

    def to(self, device: torch.device | str) -> NeighbourIndex:
        return NeighbourIndex(
            self.offsets.to(device), self.entities.to(device), self.relations.to(device),
            self.num_relations, self.seed,
        )

    # ------------------------------------------------------------------ inspection

    @property
    def num_entities(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def degrees(self) -> torch.Tensor:
        """(E,) number of neighbour tokens per entity."""
        return self.offsets[1:] - self.offsets[:-1]

    def neighbours_of(self, entity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens of one entity in the stored (evaluation) order."""
        lo, hi = int(self.offsets[entity]), int(self.offsets[entity + 1])
        return self.entities[lo:hi], self.relations[lo:hi]

    def degree_stats(self) -> dict[str, float]:
        """Neighbourhood sizes, which :meth:`build` logs: ``sources`` (entities with neighbour
        tokens), ``isolated`` (none: their queries get no context) and, over the sources, the
        ``mean``, ``median`` and ``max`` token count (0 when there are no sources)."""
        deg = self.degrees()
        deg = deg[deg > 0].double()
        some = len(deg) > 0
        return {
            "sources": len(deg),
            "isolated": self.num_entities - len(deg),
            "mean": float(deg.mean()) if some else 0.0,
            "median": float(deg.median()) if some else 0.0,
            "max": int(deg.max()) if some else 0,
        }

    def __repr__(self) -> str:
        return (
            f"NeighbourIndex({self.num_entities:,} entities, {len(self.entities):,} tokens, "
            f"R={self.num_relations}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ batched gathering

    def gather(
        self,
        sources: torch.Tensor,
        max_neighbours: int,
        *,
        train: bool = False,
        exclude_entity: torch.Tensor | None = None,
        exclude_relation: torch.Tensor | None = None,
        drop: float = 0.0,
        generator: torch.Generator | None = None,
        full_width: bool = False,
    ) -> Neighbours:
        """Neighbourhoods of a batch of (B,) sources, on the index's device.

        Evaluation (``train=False``): the first ``max_neighbours`` tokens of the stored order;
        deterministic, nothing removed or dropped (passing ``exclude_*`` or ``drop`` raises).
        Training: a fresh uniformly random subset of min(degree, max) tokens in random order,
        then the token (exclude_entity[i], exclude_relation[i]) is removed if present (see
        :func:`ground_truth_token`), then each remaining token is dropped with probability
        ``drop``. Kept tokens are moved to the front of each row.

        The width N is the largest number of kept tokens in the batch (<= max_neighbours; 0
        if no source has any), so it varies between batches; with ``full_width`` it is always
        ``max_neighbours`` (static shapes, ``HittERConfig.shape_buckets``). ``generator`` must
        live on the index's device (see :meth:`to`).
        """
        _check_gather_args(sources, max_neighbours, train, exclude_entity, exclude_relation, drop)
        sources = sources.to(self.device, torch.long)
        B = len(sources)
        start = self.offsets[sources]  # (B,)
        counts = (self.offsets[sources + 1] - start).clamp(max=max_neighbours)  # (B,)
        cols = torch.arange(max_neighbours, device=self.device)
        mask = cols < counts[:, None]  # (B, max)
        if train:
            pos = self._random_positions(self.degrees()[sources], max_neighbours, generator)
        else:
            pos = cols.expand(B, -1)
        index = torch.where(mask, start[:, None] + pos, 0)  # (B, max)
        entities, relations = self.entities[index], self.relations[index]  # (B, max)

        if train and (exclude_entity is not None or drop > 0):
            entities, relations, mask = self._remove_and_drop(
                entities, relations, mask, exclude_entity, exclude_relation, drop, generator
            )  # (B, max) each
            counts = mask.sum(1)

        n = max_neighbours if full_width else int(counts.max()) if B else 0
        mask = mask[:, :n]
        entities = entities[:, :n].masked_fill(~mask, 0)  # (B, N)
        relations = relations[:, :n].masked_fill(~mask, 0)
        return Neighbours(entities, relations, mask)

    def _remove_and_drop(
        self, entities: torch.Tensor, relations: torch.Tensor, mask: torch.Tensor,
        exclude_entity: torch.Tensor | None, exclude_relation: torch.Tensor | None, drop: float,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training steps of :meth:`gather` on sampled (B, max) tokens: unmask the
        ground-truth token, drop each token with probability ``drop``, then move the kept
        tokens to the front of each row (their order unchanged)."""
        if exclude_entity is not None:
            ex_e = exclude_entity.to(self.device)[:, None]  # (B, 1)
            ex_r = exclude_relation.to(self.device)[:, None]
            mask = mask & ~((entities == ex_e) & (relations == ex_r))
        if drop > 0:
            keep = torch.rand(mask.shape, generator=generator, device=self.device) >= drop
            mask = mask & keep
        order = (~mask).to(torch.uint8).argsort(dim=1, stable=True)  # (B, max)
        mask = mask.gather(1, order)
        return entities.gather(1, order), relations.gather(1, order), mask

    def _random_positions(
        self, degrees: torch.Tensor, k: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(B, k) distinct positions within each source's list, a uniformly random ordered
        subset of size min(degree, k) in the leading columns (the rest is arbitrary).

        Sources with degree <= 2k take the k smallest of random keys in a dense (B, 2k) table;
        hubs (degree up to thousands in FB15K-237) instead draw 3k positions with replacement
        and keep the first k distinct ones, which is again a uniform random ordered k-subset
        (sampling without replacement). Cost is O(B k log k), independent of hub degree.
        """
        B, width = len(degrees), 2 * k
        pos = torch.zeros(B, k, dtype=torch.long, device=self.device)
        if k == 0:
            return pos
        small = degrees <= width
        rows = small.nonzero().squeeze(1)
        if len(rows):
            keys = torch.rand(len(rows), width, generator=generator, device=self.device)
            cols = torch.arange(width, device=self.device)
            keys.masked_fill_(cols >= degrees[rows, None], 2.0)  # padding sorts last
            pos[rows] = keys.topk(k, dim=1, largest=False, sorted=True).indices
        rows = (~small).nonzero().squeeze(1)
        while len(rows):  # repeats only if a hub got < k distinct draws (very unlikely)
            deg = degrees[rows, None]  # (b, 1)
            u = torch.rand(len(rows), 3 * k, generator=generator, device=self.device,
                           dtype=torch.float64)
            draws = torch.minimum((u * deg).long(), deg - 1)  # (b, 3k)
            sorted_draws, order = draws.sort(dim=1, stable=True)
            repeat = torch.zeros_like(draws, dtype=torch.bool)
            repeat[:, 1:] = sorted_draws[:, 1:] == sorted_draws[:, :-1]
            first = torch.empty_like(repeat).scatter_(1, order, ~repeat)  # first occurrence
            done = first.sum(1) >= k
            chosen = first & (first.cumsum(1) <= k)  # exactly k per done row, in draw order
            pos[rows[done]] = draws[done][chosen[done]].view(-1, k)
            rows = rows[~done]
        return pos


def _check_gather_args(
    sources: torch.Tensor, max_neighbours: int, train: bool, exclude_entity: torch.Tensor | None,
    exclude_relation: torch.Tensor | None, drop: float,
) -> None:
    """Raise ValueError for arguments :meth:`NeighbourIndex.gather` does not accept."""
    if max_neighbours < 0:
        raise ValueError(f"max_neighbours must be >= 0, got {max_neighbours}")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if (exclude_entity is None) != (exclude_relation is None):
        raise ValueError("give both exclude_entity and exclude_relation, or neither")
    if not train and (exclude_entity is not None or drop > 0):
        raise ValueError("ground-truth removal and neighbour drop are training-only")
    if sources.dim() != 1:
        raise ValueError(f"sources must be (B,), got {tuple(sources.shape)}")
    if exclude_entity is not None and not (
        exclude_entity.shape == exclude_relation.shape == sources.shape
    ):
        raise ValueError("exclude_entity/exclude_relation must have the shape of sources")


def cache_key(kg: KnowledgeGraph, seed: int) -> str:
    """sha256 of everything the index depends on (see :meth:`NeighbourIndex.build`)."""
    digest = hashlib.sha256()
    header = f"v{FORMAT_VERSION}|E={kg.num_entities}|R={kg.num_relations}|seed={seed}"
    digest.update(f"{header}|torch={torch.__version__.split('+')[0]}|".encode())
    digest.update(kg.train.to("cpu", torch.long).contiguous().numpy().tobytes())
    return digest.hexdigest()
