"""What the heads that answer with entity names share (:mod:`kgqa.readers.copy`,
:mod:`kgqa.readers.link`): the word pieces of every entity's name and relation's text, the
question vector at the [MASK] positions, the keys read from relation texts, and
:meth:`NameReader.on_names`, which puts weights over entities on their names' word pieces."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kgqa.readers.base import KGReader

MAX_NAME_PIECES = 8  # longer entity names are never answered (90% of answers have <= 3 pieces)


def mask_queries(mask_states: torch.Tensor, rows: torch.Tensor, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask states (M, D) in row-major order and their rows (M,) -> the question vectors
    q (B, D) (mean state at each question's [MASK] positions), the masks per question (B,) and
    each mask's slot k (M,) (the k-th [MASK] of its question)."""
    M, D = mask_states.shape
    counts = torch.bincount(rows, minlength=batch_size)  # (B,) masks per question
    first = torch.cumsum(counts, 0) - counts  # (B,) index of each row's first mask
    slot = torch.arange(M, device=rows.device) - first[rows]  # (M,)
    q = torch.zeros(batch_size, D, dtype=mask_states.dtype, device=rows.device)
    q = q.index_add(0, rows, mask_states) / counts.clamp(min=1)[:, None]  # (B, D)
    return q, counts, slot


def mean_embedding(word_embeddings: nn.Embedding, pieces: torch.Tensor,
                   length: torch.Tensor) -> torch.Tensor:
    """(n, D): the mean word embedding of each of n texts given as (n, P) word pieces, the
    first (n,) ``length`` of each real (an empty text: zeros)."""
    keep = torch.arange(pieces.shape[1], device=pieces.device) < length[..., None]
    weights = keep / length.clamp(min=1)[..., None]  # (n, P): 1/length, 0 = padding
    table = word_embeddings.weight
    return F.embedding_bag(pieces, table, mode="sum", per_sample_weights=weights.to(table.dtype))


def piece_table(pieces: Sequence[Sequence[int]], keep: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) word pieces, zero-padded, and (n,) their number: the first (``keep="first"``) or
    last P pieces of each sequence."""
    table = torch.zeros(len(pieces), MAX_NAME_PIECES, dtype=torch.long)
    length = torch.zeros(len(pieces), dtype=torch.long)
    for i, ids in enumerate(pieces):
        ids = list(ids)[:MAX_NAME_PIECES] if keep == "first" else list(ids)[-MAX_NAME_PIECES:]
        if ids:
            table[i, : len(ids)] = torch.as_tensor(ids)
            length[i] = len(ids)
    return table, length


class NameReader(KGReader):
    """A head that answers with entity names: the word pieces of every entity's name and, with
    ``num_relations``, of every relation's text (saved with the model). A head that reads
    relation texts also has ``relation_key`` (from the word embeddings' width to D) and
    ``direction`` (2 x D) for :meth:`relation_keys`."""

    def __init__(self, num_entities: int, num_relations: int = 0) -> None:
        super().__init__()
        # (E, P) word pieces of each entity's name and (E,) their number (0 = never answered).
        self.register_buffer("name_pieces", torch.zeros(num_entities, MAX_NAME_PIECES).long())
        self.register_buffer("name_length", torch.zeros(num_entities, dtype=torch.long))
        if num_relations:  # heads that read relation texts
            # (R, P) word pieces of each relation's text (its last P), (R,) their number.
            self.register_buffer("relation_pieces",
                                 torch.zeros(num_relations, MAX_NAME_PIECES).long())
            self.register_buffer("relation_length",
                                 torch.zeros(num_relations, dtype=torch.long))

    def set_entity_names(self, pieces: Sequence[Sequence[int]]) -> None:
        """``pieces[e]``: the word pieces of entity e's name (as the cloze answers are made)."""
        if len(pieces) != len(self.name_length):
            raise ValueError(f"{len(pieces)} names for {len(self.name_length)} entities")
        table, length = piece_table(pieces, keep="first")
        whole = length == torch.tensor([len(p) for p in pieces])  # longer names: cut to P
        self.name_pieces.copy_(table)
        self.name_length.copy_(torch.where(whole, length, 0))  # a cut name is never answered

    def set_relation_names(self, pieces: Sequence[Sequence[int]]) -> None:
        """``pieces[r]``: the word pieces of relation r's text (heads that read them)."""
        if len(pieces) != len(self.relation_length):
            raise ValueError(f"{len(pieces)} texts for {len(self.relation_length)} relations")
        table, length = piece_table(pieces, keep="last")
        self.relation_pieces.copy_(table)
        self.relation_length.copy_(length)

    def relation_keys(self, word_embeddings: nn.Embedding, relations: torch.Tensor
                      ) -> torch.Tensor:
        """(..., D) keys of relation ids (...,) in [0, 2R): the projected mean word embedding
        of the relation's text (every text embedded once) plus its direction; ids >= R are
        the reciprocal relations, the same text read the other way."""
        R = len(self.relation_length)
        texts = self.relation_key(mean_embedding(word_embeddings, self.relation_pieces,
                                                 self.relation_length))  # (R, D)
        return texts[relations % R] + self.direction((relations >= R).long())

    def on_names(self, rows: torch.Tensor, slot: torch.Tensor, batch_size: int,
                 kg_rows: torch.Tensor, entities: torch.Tensor, weights: torch.Tensor,
                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights over entities -> weights over word pieces, at the masks of the questions with
        KG input (rows ``kg_rows`` (B_kg,)): at the k-th [MASK], the weight (B_kg, C) of each of
        the C candidate ``entities`` (B_kg, C) goes to the k-th word piece of its name.
        Returns (M_kg,) those masks, (M_kg,) their KG row and (M_kg, V) the weights."""
        row_to_kg = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
        row_to_kg[kg_rows] = torch.arange(len(kg_rows), device=rows.device)
        with_kg = (row_to_kg[rows] >= 0).nonzero().squeeze(1)  # (M_kg,) masks with KG input
        i = row_to_kg[rows[with_kg]]  # (M_kg,) their KG row
        k = slot[with_kg].clamp(max=MAX_NAME_PIECES - 1)[:, None]  # (M_kg, 1)
        pieces = self.name_pieces[entities[i], k]  # (M_kg, C) k-th piece of each name
        mass = weights.new_zeros(len(with_kg), vocab_size).scatter_add(1, pieces, weights[i])
        return with_kg, i, mass
