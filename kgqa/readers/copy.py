"""The copy reader (``model.reader=copy``, ``copy-names``): the answer is read off the topic
entity's neighbours (not in the paper).

The paper's adapters (:mod:`kgqa.readers.adapters`) add HittER's states into the LM's hidden states;
to turn a KG token into an answer the LM must then learn, from a few hundred questions, which
word pieces each of 14,541 entity vectors stands for. In the filtered splits the answer entity
is a direct neighbour of the topic for about 80% of the questions, so this head lets the model
point at a neighbour instead and copy its name (a pointer-generator, See et al. 2017):

* One attention per question over the KG tokens (the topic's neighbours as HittER's top
  context layer encodes them): query = the mean LM state at the question's [MASK] positions,
  keys = a projection of the KG tokens. With ``name_keys`` (``copy-names``) each
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
once (:meth:`CopyReader.set_tables`) and saved with the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from kgqa.lm import embedding_width, word_pieces
from kgqa.readers.base import Explanation, ReaderInput, ReaderOutput, neighbour_facts
from kgqa.readers.names import NameReader, mask_queries, mean_embedding, piece_table
from kgqa.verbalise import relation_texts


def mix(reader: NameReader, lm_logits: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor,
        batch_size: int, kg_rows: torch.Tensor, entities: torch.Tensor, weights: torch.Tensor,
        gate: torch.Tensor) -> torch.Tensor:
    """(M, V) log-probabilities ``(1 - lam) p_LM + lam p_copy``: the LM's softmax with the
    candidates' ``weights`` on their names' word pieces (:meth:`NameReader.on_names`) mixed in
    at ``gate`` (B_kg,). Masks without KG input keep the LM's softmax exactly."""
    probs = torch.softmax(lm_logits.float(), dim=-1)  # (M, V)
    with_kg, i, copy = reader.on_names(rows, slot, batch_size, kg_rows, entities, weights,
                                       probs.shape[1])
    if len(with_kg):
        lam = gate[i][:, None]  # (M_kg, 1)
        probs = probs.index_copy(0, with_kg, (1 - lam) * probs[with_kg] + lam * copy)
    return torch.log(probs.clamp_min(1e-30))


class CopyReader(NameReader):
    """Pointer over the topic's neighbours that copies their names into the [MASK] slots."""

    reads_states = True  # the neighbour tokens of HittER's top context layer

    def __init__(self, lm_config: PreTrainedConfig, kg_config: Any,
                 name_keys: bool = False) -> None:
        num_entities, num_relations = kg_config.num_entities, kg_config.num_relations
        super().__init__(num_entities, num_relations if name_keys else 0)
        d = lm_config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kg_config.hidden_size, d)
        self.gate = nn.Linear(d, 1)
        linears = [self.query, self.key, self.gate]
        self.name_keys = name_keys
        if name_keys:
            self.name_key = nn.Linear(embedding_width(lm_config), d)  # the neighbour's name
            self.relation_key = nn.Linear(embedding_width(lm_config), d)  # its relation's text
            self.direction = nn.Embedding(2, d)  # forward (t, r, e) or reciprocal (e, r, t)
            nn.init.normal_(self.direction.weight, std=lm_config.initializer_range)
            linears += [self.name_key, self.relation_key]
        for linear in linears:
            nn.init.normal_(linear.weight, std=lm_config.initializer_range)
            nn.init.zeros_(linear.bias)
        # name_key_length: the first <= P pieces of each name that the keys read (longer too).
        if name_keys:
            self.register_buffer("name_key_length", torch.zeros(num_entities, dtype=torch.long))

    def set_tables(self, kg: Any, tokenizer: Any) -> None:
        self.set_entity_names(word_pieces(kg.entity_names, tokenizer))
        if self.name_keys:
            self.set_relation_names(word_pieces(relation_texts(kg), tokenizer))

    def set_entity_names(self, pieces: Sequence[Sequence[int]]) -> None:
        super().set_entity_names(pieces)
        if self.name_keys:
            self.name_key_length.copy_(piece_table(pieces, keep="first")[1])

    def _text_keys(self, word_embeddings: nn.Embedding, kg_entities: torch.Tensor,
                   kg_relations: torch.Tensor) -> torch.Tensor:
        """(B_kg, N, D): what the neighbours' names and relation texts add to the keys. Each
        distinct entity's name and every relation's text are embedded and projected once and
        then gathered (a batch holds ~4,000 neighbour tokens, the graph 237 relations)."""
        entities, inverse = torch.unique(kg_entities, return_inverse=True)  # (U,), (B_kg, N)
        names = self.name_key(mean_embedding(word_embeddings, self.name_pieces[entities],
                                             self.name_key_length[entities]))  # (U, D)
        return names[inverse] + self.relation_keys(word_embeddings, kg_relations)

    def forward(self, x: ReaderInput) -> ReaderOutput:
        """Reads HittER's top-layer states of the neighbour tokens (``x.states``), the neighbour
        ids and, with ``name_keys``, their relations and the LM's word embeddings. Evidence:
        ``attention`` (B_kg, N) the pointer's weight on each neighbour, ``gate`` (B_kg,) lam,
        the share of the copy distribution."""
        states, rows, B = x.states, x.rows, x.batch_size
        if states is None:  # no question of the batch has a topic
            return ReaderOutput(torch.log_softmax(x.lm_logits.float(), dim=-1))
        kg_rows = states.rows
        kg_tokens = states.layers[-1][:, 2:]  # (B_kg, N, D_kg): the neighbour tokens
        kg_entities, kg_mask = x.kg_entities[kg_rows], states.mask[:, 2:]  # (B_kg, N) each
        D = x.mask_states.shape[1]
        q, counts, slot = mask_queries(x.mask_states, rows, B)  # (B, D), (B,), (M,)
        q = q[kg_rows]  # (B_kg, D)

        keys = self.key(kg_tokens)  # (B_kg, N, D)
        if self.name_keys:
            keys = keys + self._text_keys(x.word_embeddings, kg_entities,
                                          x.kg_relations[kg_rows])
        scores = torch.einsum("bd,bnd->bn", self.query(q), keys)  # (B_kg, N)
        scores = scores / math.sqrt(D)
        fits = self.name_length[kg_entities] == counts[kg_rows][:, None]  # (B_kg, N)
        candidate = kg_mask & fits
        has_candidate = candidate.any(1)  # (B_kg,)
        scores = scores.masked_fill(~candidate, float("-inf"))
        scores = scores.masked_fill(~has_candidate[:, None], 0.0)  # no NaN rows
        attention = torch.softmax(scores.float(), dim=1) * candidate  # (B_kg, N)
        gate = torch.sigmoid(self.gate(q)).squeeze(1).float() * has_candidate  # (B_kg,)

        log_probs = mix(self, x.lm_logits, rows, slot, B, kg_rows, kg_entities, attention, gate)
        return ReaderOutput(log_probs, kg_rows, {"attention": attention, "gate": gate})

    def explain(self, evidence, batch, kg, top_k, adapter_weights=None):
        if not evidence or kg is None:
            return None
        return Explanation("the neighbours read most",
                           neighbour_facts(evidence["attention"][0], batch, kg, top_k),
                           "copy gate", float(evidence["gate"][0]))
