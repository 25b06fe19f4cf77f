"""A KG copy head: the answer is read off the topic entity's neighbours (not in the paper).

The paper's adapters (:mod:`kgqa.adapters`) add HittER's states into the LM's hidden states;
to turn a KG token into an answer the LM must then learn, from a few hundred questions, which
word pieces each of 14,541 entity vectors stands for. In the filtered splits the answer entity
is a direct neighbour of the topic for about 80% of the questions, so this head lets the model
point at a neighbour instead and copy its name (a pointer-generator, See et al. 2017):

* One attention per question over the KG tokens (the topic's neighbours as HittER's top
  context layer encodes them): query = the mean LM state at the question's [MASK] positions,
  keys = a projection of the KG tokens. With ``name_keys`` (``model.copy_name_keys``) each
  key also reads the neighbour's name and its relation's text through the LM's own word
  embeddings (mean over the word pieces, projected; plus the relation's direction), so that
  the pointer can match question words ("born", "country") to neighbours it has never seen
  answer a question. Only neighbours whose name has exactly as many word pieces as the
  question has [MASK] tokens are candidates (the cloze form gives that number to every model,
  the plain LM included).
* At the k-th [MASK] the copy distribution puts each candidate's weight on the k-th word piece
  of its name; a gate ``lam = sigmoid(w . q + b)`` mixes it with the LM's softmax:
  ``p = (1 - lam) p_LM + lam p_copy``. Questions without a candidate (or without KG input)
  keep ``p_LM`` exactly.

The head returns log-probabilities, so the model's loss is their negative log-likelihood and
its top-1 prediction their argmax, as for the plain LM's logits. Entity names are tokenised
once (:meth:`KGCopyHead.set_entity_names`) and saved with the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig

MAX_NAME_PIECES = 8  # longer entity names are never copied (90% of answers have <= 3 pieces)


class CopyOutput(NamedTuple):
    log_probs: torch.Tensor  # (M, V) log p at the M mask positions
    attention: torch.Tensor  # (B_kg, N) weight of each KG token for each question with KG input
    gate: torch.Tensor  # (B_kg,) lam, the share of the copy distribution


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


class NameCopier(nn.Module):
    """What the KG heads share: the word pieces of every entity's name (and, for heads that
    read them, of every relation's text), :meth:`on_names`, which puts weights over entities on
    their names' word pieces, and :meth:`mix`, the copy head's ``p = (1 - lam) p_LM + lam
    p_copy`` (the link head combines with the LM its own way, :mod:`kgqa.link_head`)."""

    def __init__(self, num_entities: int, num_relations: int = 0) -> None:
        super().__init__()
        # (E, P) word pieces of each entity's name and (E,) their number (0 = never copied).
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
        table, length = _piece_table(pieces, keep="first")
        whole = length == torch.tensor([len(p) for p in pieces])  # longer names: cut to P
        self.name_pieces.copy_(table)
        self.name_length.copy_(torch.where(whole, length, 0))  # a cut name is never copied

    def set_relation_names(self, pieces: Sequence[Sequence[int]]) -> None:
        """``pieces[r]``: the word pieces of relation r's text (heads that read them)."""
        if len(pieces) != len(self.relation_length):
            raise ValueError(f"{len(pieces)} texts for {len(self.relation_length)} relations")
        table, length = _piece_table(pieces, keep="last")
        self.relation_pieces.copy_(table)
        self.relation_length.copy_(length)

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

    def mix(self, lm_logits: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor,
            batch_size: int, kg_rows: torch.Tensor, entities: torch.Tensor,
            weights: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """(M, V) log-probabilities: the LM's softmax with the candidates' ``weights`` on their
        names' word pieces (:meth:`on_names`) mixed in at ``gate`` (B_kg,). Masks without KG
        input keep the LM's softmax exactly."""
        probs = torch.softmax(lm_logits.float(), dim=-1)  # (M, V)
        with_kg, i, copy = self.on_names(rows, slot, batch_size, kg_rows, entities, weights,
                                         probs.shape[1])
        if len(with_kg):
            lam = gate[i][:, None]  # (M_kg, 1)
            probs = probs.index_copy(0, with_kg, (1 - lam) * probs[with_kg] + lam * copy)
        return torch.log(probs.clamp_min(1e-30))


class KGCopyHead(NameCopier):
    """Pointer over the topic's neighbours that copies their names into the [MASK] slots."""

    def __init__(self, lm_config: BertConfig, kg_dim: int, num_entities: int,
                 num_relations: int = 0, name_keys: bool = False) -> None:
        super().__init__(num_entities, num_relations if name_keys else 0)
        d = lm_config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kg_dim, d)
        self.gate = nn.Linear(d, 1)
        linears = [self.query, self.key, self.gate]
        self.name_keys = name_keys
        if name_keys:
            self.name_key = nn.Linear(d, d)  # the neighbour's name
            self.relation_key = nn.Linear(d, d)  # its relation's text
            self.direction = nn.Embedding(2, d)  # forward (t, r, e) or reciprocal (e, r, t)
            nn.init.normal_(self.direction.weight, std=lm_config.initializer_range)
            linears += [self.name_key, self.relation_key]
        for linear in linears:
            nn.init.normal_(linear.weight, std=lm_config.initializer_range)
            nn.init.zeros_(linear.bias)
        # name_key_length: the first <= P pieces of each name that the keys read (longer too).
        if name_keys:
            self.register_buffer("name_key_length", torch.zeros(num_entities, dtype=torch.long))

    def set_entity_names(self, pieces: Sequence[Sequence[int]]) -> None:
        super().set_entity_names(pieces)
        if self.name_keys:
            self.name_key_length.copy_(_piece_table(pieces, keep="first")[1])

    def _text_keys(self, word_embeddings: nn.Embedding, kg_entities: torch.Tensor,
                   kg_relations: torch.Tensor) -> torch.Tensor:
        """(B_kg, N, D): what the neighbours' names and relation texts add to the keys. Each
        distinct entity's name and every relation's text are embedded and projected once and
        then gathered (a batch holds ~4,000 neighbour tokens, the graph 237 relations)."""
        R = len(self.relation_length)
        entities, inverse = torch.unique(kg_entities, return_inverse=True)  # (U,), (B_kg, N)
        names = self.name_key(mean_embedding(word_embeddings, self.name_pieces[entities],
                                             self.name_key_length[entities]))  # (U, D)
        texts = self.relation_key(mean_embedding(word_embeddings, self.relation_pieces,
                                                 self.relation_length))  # (R, D)
        # ids >= R are the reciprocal relations: the same text, the other direction.
        return (names[inverse] + texts[kg_relations % R]
                + self.direction((kg_relations >= R).long()))  # (B_kg, N, D)

    def forward(
        self,
        lm_logits: torch.Tensor,
        mask_states: torch.Tensor,
        rows: torch.Tensor,
        batch_size: int,
        kg_rows: torch.Tensor,
        kg_tokens: torch.Tensor,
        kg_entities: torch.Tensor,
        kg_mask: torch.Tensor,
        kg_relations: torch.Tensor | None = None,
        word_embeddings: nn.Embedding | None = None,
    ) -> CopyOutput:
        """lm_logits (M, V) and mask_states (M, D) at the M [MASK] positions in row-major order,
        rows (M,) their batch row; kg_rows (B_kg,) the rows with KG input, kg_tokens
        (B_kg, N, D_kg) HittER's states of their neighbour tokens, kg_entities (B_kg, N) the
        neighbour entity ids, kg_mask (B_kg, N) True = real token; with ``name_keys``,
        kg_relations (B_kg, N) their relation ids and the LM's word embeddings."""
        D = mask_states.shape[1]
        q, counts, slot = mask_queries(mask_states, rows, batch_size)  # (B, D), (B,), (M,)
        q = q[kg_rows]  # (B_kg, D)

        keys = self.key(kg_tokens)  # (B_kg, N, D)
        if self.name_keys:
            if kg_relations is None or word_embeddings is None:
                raise ValueError("name_keys needs kg_relations and the LM's word embeddings")
            keys = keys + self._text_keys(word_embeddings, kg_entities, kg_relations)
        scores = torch.einsum("bd,bnd->bn", self.query(q), keys)  # (B_kg, N)
        scores = scores / math.sqrt(D)
        fits = self.name_length[kg_entities] == counts[kg_rows][:, None]  # (B_kg, N)
        candidate = kg_mask & fits
        has_candidate = candidate.any(1)  # (B_kg,)
        scores = scores.masked_fill(~candidate, float("-inf"))
        scores = scores.masked_fill(~has_candidate[:, None], 0.0)  # no NaN rows
        attention = torch.softmax(scores.float(), dim=1) * candidate  # (B_kg, N)
        gate = torch.sigmoid(self.gate(q)).squeeze(1).float() * has_candidate  # (B_kg,)

        log_probs = self.mix(lm_logits, rows, slot, batch_size, kg_rows, kg_entities, attention,
                             gate)
        return CopyOutput(log_probs, attention, gate)


def mean_embedding(word_embeddings: nn.Embedding, pieces: torch.Tensor,
                   length: torch.Tensor) -> torch.Tensor:
    """(n, D): the mean word embedding of each of n texts given as (n, P) word pieces, the
    first (n,) ``length`` of each real (an empty text: zeros)."""
    keep = torch.arange(pieces.shape[1], device=pieces.device) < length[..., None]
    weights = keep / length.clamp(min=1)[..., None]  # (n, P): 1/length, 0 = padding
    table = word_embeddings.weight
    return F.embedding_bag(pieces, table, mode="sum", per_sample_weights=weights.to(table.dtype))


def _piece_table(pieces: Sequence[Sequence[int]], keep: str) -> tuple[torch.Tensor, torch.Tensor]:
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
