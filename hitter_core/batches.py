"""What one link-prediction step consumes (paper section 3.3; REFERENCE.md "Link prediction"):
the 2B queries of B training triples with freshly sampled neighbourhoods, the loss over them,
and the data order of each process (``hitter_core.train`` runs the loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hitter_core.config import HittERConfig
from hitter_core.evaluate import split_queries
from hitter_core.neighbours import NeighbourIndex, Neighbours, ground_truth_token


@dataclass
class Batch:
    """The 2B queries of B triples: tail queries first, then head queries (as in evaluate)."""

    sources: torch.Tensor  # (2B,)
    relations: torch.Tensor  # (2B,) relation tokens in [0, 2R)
    targets: torch.Tensor  # (2B,)
    neighbours: Neighbours | None  # (2B, N); None for the context-free model


def make_batch(
    triples: torch.Tensor,
    neighbour_index: NeighbourIndex,
    config: HittERConfig,
    generator: torch.Generator | None = None,
) -> Batch:
    """(B, 3) training triples -> their 2B queries with training neighbourhoods, on the
    neighbour index's device (ground-truth token removed, ``config.neighbour_drop`` applied)."""
    sources, relations, targets = split_queries(triples, config.num_relations)  # (2B,) each
    neighbours = None
    if config.use_context:
        gt_entity, gt_relation = ground_truth_token(targets, relations, config.num_relations)
        neighbours = neighbour_index.gather(
            sources, config.max_neighbours, train=True,
            exclude_entity=gt_entity, exclude_relation=gt_relation,
            drop=config.neighbour_drop, generator=generator,
            full_width=config.shape_buckets > 0,
        )
    device = neighbour_index.device
    return Batch(sources.to(device), relations.to(device), targets.to(device), neighbours)


def compute_loss(
    model: torch.nn.Module, batch: Batch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of a batch: tail-query loss + head-query loss (the reference's sum).

    ``model`` is a HittER or the DeepSpeed engine wrapping one. HittER returns the mean over
    all 2B queries, so with equal halves twice that mean is exactly the sum of the two
    directions' means; the MEP term likewise becomes twice its mean over the selected
    queries of both directions (the sum of per-direction means in expectation). Returns the
    loss and detached ``loss``, ``lp_loss`` (and ``mep_loss``) for logging.
    """
    nb = batch.neighbours
    kwargs = {}
    if nb is not None:
        kwargs = dict(nbr_entities=nb.entities, nbr_relations=nb.relations, nbr_mask=nb.mask)
    out = model(batch.sources, batch.relations, targets=batch.targets, **kwargs)
    loss = 2 * out.loss
    stats = {"loss": loss.detach(), "lp_loss": 2 * out.lp_loss.detach()}
    if out.mep_loss is not None:
        stats["mep_loss"] = 2 * out.mep_loss.detach()
    return loss, stats


def epoch_shard(
    num_triples: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Indices of the train triples this process visits in ``epoch``, in order: slice ``rank``
    of ``world_size`` equal slices of a permutation seeded by (seed, epoch); the last
    ``num_triples % world_size`` of the permutation are skipped that epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_triples, generator=generator)
    per_rank = num_triples // world_size
    return order[rank * per_rank : (rank + 1) * per_rank]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of process ``rank`` before step ``step`` (distinct for rank < 4099)."""
    return (seed * 1_000_003 + step) * 4099 + rank
