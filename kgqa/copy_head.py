"""A KG copy head: the answer is read off the topic entity's neighbours (not in the paper).

The paper's adapters (:mod:`kgqa.adapters`) add HittER's states into the LM's hidden states;
to turn a KG token into an answer the LM must then learn, from a few hundred questions, which
word pieces each of 14,541 entity vectors stands for. In the filtered splits the answer entity
is a direct neighbour of the topic for about 80% of the questions, so this head lets the model
point at a neighbour instead and copy its name (a pointer-generator, See et al. 2017):

* One attention per question over the KG tokens (the topic's neighbours as HittER's top
  context layer encodes them): query = the mean LM state at the question's [MASK] positions,
  keys = a projection of the KG tokens. Only neighbours whose name has exactly as many word
  pieces as the question has [MASK] tokens are candidates (the cloze form gives that number
  to every model, the plain LM included).
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
from transformers import BertConfig

MAX_NAME_PIECES = 8  # longer entity names are never copied (90% of answers have <= 3 pieces)


class CopyOutput(NamedTuple):
    log_probs: torch.Tensor  # (M, V) log p at the M mask positions
    attention: torch.Tensor  # (B_kg, N) weight of each KG token for each question with KG input
    gate: torch.Tensor  # (B_kg,) lam, the share of the copy distribution


class KGCopyHead(nn.Module):
    """Pointer over the topic's neighbours that copies their names into the [MASK] slots."""

    def __init__(self, lm_config: BertConfig, kg_dim: int, num_entities: int) -> None:
        super().__init__()
        d = lm_config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kg_dim, d)
        self.gate = nn.Linear(d, 1)
        for linear in (self.query, self.key, self.gate):
            nn.init.normal_(linear.weight, std=lm_config.initializer_range)
            nn.init.zeros_(linear.bias)
        # (E, P) word pieces of each entity's name and (E,) their number (0 = never copied).
        self.register_buffer("name_pieces", torch.zeros(num_entities, MAX_NAME_PIECES).long())
        self.register_buffer("name_length", torch.zeros(num_entities, dtype=torch.long))

    def set_entity_names(self, pieces: Sequence[Sequence[int]]) -> None:
        """``pieces[e]``: the word pieces of entity e's name (as the cloze answers are made)."""
        if len(pieces) != len(self.name_length):
            raise ValueError(f"{len(pieces)} names for {len(self.name_length)} entities")
        table = torch.zeros_like(self.name_pieces)
        length = torch.zeros_like(self.name_length)
        for e, ids in enumerate(pieces):
            if 0 < len(ids) <= MAX_NAME_PIECES:
                table[e, : len(ids)] = torch.as_tensor(list(ids))
                length[e] = len(ids)
        self.name_pieces.copy_(table)
        self.name_length.copy_(length)

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
    ) -> CopyOutput:
        """lm_logits (M, V) and mask_states (M, D) at the M [MASK] positions in row-major order,
        rows (M,) their batch row; kg_rows (B_kg,) the rows with KG input, kg_tokens
        (B_kg, N, D_kg) HittER's states of their neighbour tokens, kg_entities (B_kg, N) the
        neighbour entity ids, kg_mask (B_kg, N) True = real token."""
        M, D = mask_states.shape
        counts = torch.bincount(rows, minlength=batch_size)  # (B,) masks per question
        first = torch.cumsum(counts, 0) - counts  # (B,) index of each row's first mask
        slot = torch.arange(M, device=rows.device) - first[rows]  # (M,) k of the k-th mask
        q = torch.zeros(batch_size, D, dtype=mask_states.dtype, device=rows.device)
        q = q.index_add(0, rows, mask_states) / counts.clamp(min=1)[:, None]  # (B, D)
        q = q[kg_rows]  # (B_kg, D)

        scores = torch.einsum("bd,bnd->bn", self.query(q), self.key(kg_tokens))  # (B_kg, N)
        scores = scores / math.sqrt(D)
        fits = self.name_length[kg_entities] == counts[kg_rows][:, None]  # (B_kg, N)
        candidate = kg_mask & fits
        has_candidate = candidate.any(1)  # (B_kg,)
        scores = scores.masked_fill(~candidate, float("-inf"))
        scores = scores.masked_fill(~has_candidate[:, None], 0.0)  # no NaN rows
        attention = torch.softmax(scores.float(), dim=1) * candidate  # (B_kg, N)
        gate = torch.sigmoid(self.gate(q)).squeeze(1).float() * has_candidate  # (B_kg,)

        probs = torch.softmax(lm_logits.float(), dim=-1)  # (M, V)
        row_to_kg = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
        row_to_kg[kg_rows] = torch.arange(len(kg_rows), device=rows.device)
        with_kg = (row_to_kg[rows] >= 0).nonzero().squeeze(1)  # (M_kg,) masks with KG input
        if len(with_kg):
            i = row_to_kg[rows[with_kg]]  # (M_kg,) their KG row
            k = slot[with_kg].clamp(max=MAX_NAME_PIECES - 1)[:, None]  # (M_kg, 1)
            pieces = self.name_pieces[kg_entities[i], k]  # (M_kg, N) k-th piece of each name
            copy = torch.zeros_like(probs[with_kg]).scatter_add(1, pieces, attention[i])
            lam = gate[i][:, None]  # (M_kg, 1)
            probs = probs.index_copy(0, with_kg, (1 - lam) * probs[with_kg] + lam * copy)
        return CopyOutput(torch.log(probs.clamp_min(1e-30)), attention, gate)
