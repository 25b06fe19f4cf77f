"""Filtered ranking: the filter index, rank definitions and metrics (paper section 3.2,
link prediction evaluation; the filtered setting of Bordes et al. 2013).

A query is ``(source entity, relation token)`` with relation tokens in ``[0, 2R)``: a tail
query ``(s, p, ?)`` is ``(s, p)`` and a head query ``(?, p, o)`` is the reciprocal tail query
``(o, p + R)``. In the filtered setting every *other* known answer of a query (over train +
valid + test by default) is removed from the candidates before the target is ranked.

Tie policy. Several entities can score exactly the same as the target (a constant scorer, an
untrained embedding, saturated scores). Three rank definitions are given as pure functions:

* ``optimistic_rank``  = 1 + #(score > target): the target wins every tie;
* ``pessimistic_rank`` = #(score >= target), target included: it loses every tie;
* ``realistic_rank``   = the mean of the two = the mean rank of the tied block
  = 1 + #(score > target) + (#(score == target) - 1) / 2, target included in the count.

We report the realistic rank. The reference implementation (LibKGE) also used the mean rank
of the tied block but rounded it to an integer; we keep the unrounded mean, so a rank can be
fractional (e.g. 1.5), in which case it does not count as a hit at 1.

Filtered entries are set to ``-inf``. A target whose own score is ``-inf`` would therefore tie
with them; scorers must return finite scores (``evaluate`` rejects NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hitter_core.data import SPLITS, KnowledgeGraph

HITS_AT = (1, 3, 10)


@dataclass(frozen=True)
class FilterIndex:
    """Known answers of every query, stored CSR-style.

    ``keys`` (Q,) are the sorted distinct query keys ``source * 2R + relation``; the answers of
    ``keys[q]`` are ``answers[offsets[q]:offsets[q + 1]]`` (sorted, distinct).
    """

    num_entities: int
    num_relations: int  # R forward relations; relation tokens are in [0, 2R)
    splits: tuple[str, ...]  # the splits whose triples are known answers
    keys: torch.Tensor  # (Q,) int64, sorted
    offsets: torch.Tensor  # (Q + 1,) int64
    answers: torch.Tensor  # (A,) int64

    @classmethod
    def build(cls, kg: KnowledgeGraph, splits: Sequence[str] = SPLITS) -> FilterIndex:
        """Index the triples of ``splits`` (default train + valid + test, the test protocol;
        pass e.g. ``("train", "valid")`` to filter validation without test triples)."""
        if not splits:
            raise ValueError("FilterIndex.build needs at least one split")
        unknown = [s for s in splits if s not in kg.splits]
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; have {sorted(kg.splits)}")
        triples = torch.cat([kg.splits[s] for s in splits])  # (T, 3)
        num_e, num_r = kg.num_entities, kg.num_relations
        head, rel, tail = triples.unbind(1)
        sources = torch.cat([head, tail])  # (2T,)
        relations = torch.cat([rel, rel + num_r])  # tail queries, then reciprocal head queries
        answers = torch.cat([tail, head])
        # One sort of (query key, answer) pairs gives CSR order and removes duplicates.
        # Max value E * 2R * E stays far below 2**63 for any realistic graph.
        pairs = torch.unique((sources * 2 * num_r + relations) * num_e + answers)  # sorted
        pair_keys, answers = pairs // num_e, pairs % num_e
        keys, counts = torch.unique_consecutive(pair_keys, return_counts=True)
        offsets = torch.zeros(len(keys) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(num_e, num_r, tuple(splits), keys, offsets, answers)

    def to(self, device: torch.device | str) -> FilterIndex:
        """A copy whose tensors live on ``device`` (filter on the device the scores are on)."""
        return FilterIndex(
            self.num_entities,
            self.num_relations,
            self.splits,
            self.keys.to(device),
            self.offsets.to(device),
            self.answers.to(device),
        )

    def query_keys(self, sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        if bool(((relations < 0) | (relations >= 2 * self.num_relations)).any()):
            raise ValueError(f"relation tokens must lie in [0, {2 * self.num_relations})")
        return sources * (2 * self.num_relations) + relations

    def _spans(
        self, sources: torch.Tensor, relations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start offset and number of known answers of each query; (B,), (B,)."""
        qkeys = self.query_keys(sources.to(self.keys.device), relations.to(self.keys.device))
        pos = torch.searchsorted(self.keys, qkeys)  # (B,)
        pos = pos.clamp(max=len(self.keys) - 1)
        found = self.keys[pos] == qkeys
        start = self.offsets[pos]
        count = torch.where(found, self.offsets[pos + 1] - start, torch.zeros_like(start))
        return start, count

    def filter_scores(
        self,
        scores: torch.Tensor,
        sources: torch.Tensor,
        relations: torch.Tensor,
        targets: torch.Tensor,
        inplace: bool = False,
    ) -> torch.Tensor:
        """Set every known answer of each query except its target to ``-inf``.

        scores (B, E); sources, relations, targets (B,). The whole batch is filtered with one
        CSR gather and one index_put. Returns a new tensor unless ``inplace``.
        """
        batch = scores.shape[0]
        if scores.shape != (batch, self.num_entities):
            raise ValueError(f"scores must be (B, {self.num_entities}), got {tuple(scores.shape)}")
        device = self.keys.device
        start, count = self._spans(sources, relations)  # (B,), (B,)
        rows = torch.repeat_interleave(torch.arange(batch, device=device), count)  # (A_B,)
        # Answer j of query b sits at answers[start[b] + j]; the gathered list is the
        # concatenation of the spans, so shift each position by start[b] - (its offset in it).
        shift = torch.repeat_interleave(start - (torch.cumsum(count, 0) - count), count)
        cols = self.answers[torch.arange(len(rows), device=device) + shift]  # (A_B,)
        rows, cols = rows.to(scores.device), cols.to(scores.device)
        targets = targets.to(scores.device).unsqueeze(1)  # (B, 1)
        out = scores if inplace else scores.clone()
        # Filter all known answers, then put the targets' own scores back: the target is
        # never filtered although it is a known answer.
        target_scores = out.gather(1, targets)  # (B, 1)
        out[rows, cols] = float("-inf")
        out.scatter_(1, targets, target_scores)
        return out


def _compare_with_target(
    scores: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """#(score > target) and #(score == target) per row (target included); (B,), (B,)."""
    target_scores = scores.gather(1, targets.to(scores.device).unsqueeze(1))  # (B, 1)
    # int32 accumulation: E < 2**31, and it is ~2x faster than the default int64 on CPU.
    greater = (scores > target_scores).sum(1, dtype=torch.int32)
    equal = (scores == target_scores).sum(1, dtype=torch.int32)
    return greater, equal


def optimistic_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank if the target wins every tie: ``1 + #(score > target)``.

    scores (B, E), targets (B,) -> (B,) float ranks, 1 = best."""
    greater, _ = _compare_with_target(scores, targets)
    return (1 + greater).double()


def pessimistic_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank if the target loses every tie: ``#(score >= target)`` (the target counts itself).

    scores (B, E), targets (B,) -> (B,) float ranks."""
    greater, equal = _compare_with_target(scores, targets)
    return (greater + equal).double()


def realistic_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean rank of the target's tied block (the rank we report):
    ``1 + #(score > target) + (#(score == target) - 1) / 2``, with the target itself in
    ``#(score == target)``; equals the mean of the optimistic and pessimistic ranks.
    E.g. one entity above and the target tied with two others: ranks 2, 3, 4 -> 3.
    Unlike the reference (LibKGE), the mean is not rounded.

    scores (B, E), targets (B,) -> (B,) float64 ranks."""
    greater, equal = _compare_with_target(scores, targets)
    return 1 + greater.double() + (equal.double() - 1) / 2


def ranking_metrics(ranks: torch.Tensor, hits_at: Sequence[int] = HITS_AT) -> dict[str, float]:
    """MRR, Hits@k (rank <= k; a fractional realistic rank 1.5 is not a hit at 1), mean rank
    and the number of ranks. ranks (Q,) -> dict of Python numbers."""
    if ranks.numel() == 0:
        raise ValueError("ranking_metrics needs at least one rank")
    ranks = ranks.double().cpu()
    metrics: dict[str, float] = {"mrr": float((1 / ranks).mean())}
    for k in hits_at:
        metrics[f"hits@{k}"] = float((ranks <= k).double().mean())
    metrics["mean_rank"] = float(ranks.mean())
    metrics["count"] = int(ranks.numel())
    return metrics
