"""What link prediction gives with nothing learned: the floor every MRR is read against.

:class:`RelationFrequencyScorer` ranks every entity, for a query (s, r, ?), by how often it is
an answer of relation r in the train triples: the tail of r for a tail query, the head of r
for a head query (the reciprocal relation r + R). The source entity is ignored, so every query
of a relation gets the same ranking, and ties (entities with equal counts, most of them never
seen with r) get their mean rank, as every scorer does (``hitter_core.ranking``). Filtered test
MRR: 0.2334 on FB15K-237, 0.0256 on WN18RR (bench/RESULTS.md). Run it as
``python -m hitter_core.evaluate --baseline frequency --dataset fb15k-237``.
"""

from __future__ import annotations

import torch

from hitter_core.data import KnowledgeGraph

BASELINES = ("frequency",)  # hitter_core.evaluate --baseline


class RelationFrequencyScorer:
    """A :class:`hitter_core.evaluate.Scorer`: scores (B, E) = the number of train triples in
    which each entity answers the query's relation (a (2R, E) count table)."""

    def __init__(self, kg: KnowledgeGraph) -> None:
        head, rel, tail = kg.train.to("cpu", torch.long).unbind(1)  # (T,) each
        R, E = kg.num_relations, kg.num_entities
        counts = torch.zeros(2 * R * E, dtype=torch.float32)  # row r: answers of (?, r, ?)
        ones = torch.ones(len(rel))
        counts.index_add_(0, rel * E + tail, ones)  # tail queries (s, r, ?) -> t
        counts.index_add_(0, (rel + R) * E + head, ones)  # head queries (t, r + R, ?) -> h
        self.counts = counts.view(2 * R, E)

    def __call__(self, sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        return self.counts.to(sources.device)[relations]  # (B, E)
