"""The interface every KG reader implements (:mod:`kgqa.readers`).

A reader answers at the [MASK] positions from the LM's output and whatever it reads of HittER:
:meth:`KGReader.forward` takes a :class:`ReaderInput` and returns a :class:`ReaderOutput`,
log-probabilities over the vocabulary at every mask plus the reader's evidence for the
questions with KG input; :meth:`KGReader.explain` turns that evidence into the facts that
``kgqa.ask`` prints. :class:`LMReader`, the LM's own softmax, is the reader of the plain LM and
of the models whose HittER enters through cross-attention adapters inside the LM layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class ReaderInput:
    """What a reader may read, for a batch of B questions with M [MASK] positions."""

    lm_logits: torch.Tensor  # (M, V) the LM's logits at the masks, row-major (B, L) order
    mask_states: torch.Tensor  # (M, D) the LM's last hidden states there
    rows: torch.Tensor  # (M,) the batch row of each mask
    batch_size: int  # B
    word_embeddings: nn.Embedding  # the LM's, to read names and relation texts
    topic_entity: torch.Tensor | None = None  # (B,) -1 = none
    kg_entities: torch.Tensor | None = None  # (B, N) the topics' neighbours (kgqa.batches)
    kg_relations: torch.Tensor | None = None  # (B, N)
    kg_mask: torch.Tensor | None = None  # (B, N) True = real neighbour
    states: Any = None  # KGStates of HittER's context layers (readers with reads_states)
    hitter: nn.Module | None = None  # HittER itself (readers that ask it for link predictions)
    kg_grad: bool = False  # whether HittER is trained (co-trained) in this forward


@dataclass
class ReaderOutput:
    log_probs: torch.Tensor  # (M, V) log p at the masks
    kg_rows: torch.Tensor | None = None  # (B_kg,) the rows the evidence is about
    evidence: dict[str, torch.Tensor] = field(default_factory=dict)  # reader's own, per KG row


@dataclass
class Fact:
    """One line of evidence: a triple of the graph (or a query) and its weight."""

    entity: str  # the entity it names ("?" for a query)
    fact: str  # "(head, relation, tail)"
    weight: float


@dataclass
class Explanation:
    """What a reader read for one question: a title, its gate (name and value) if it has one,
    and the facts it weighed most."""

    read: str
    facts: list[Fact]
    gate_name: str | None = None
    gate: float | None = None


class KGReader(nn.Module):
    """Base class of the readers. Subclasses set ``reads_states`` when they read HittER's
    context-layer states (``ReaderInput.states``), override :meth:`forward`, and, where they
    have tables from the graph, :meth:`set_tables`."""

    reads_states: ClassVar[bool] = False

    def forward(self, x: ReaderInput) -> ReaderOutput:
        raise NotImplementedError

    def set_tables(self, kg: Any, tokenizer: Any) -> None:
        """Fill what the reader keeps from the graph (names, relations); saved with the
        model. Called once when a model is built for a graph."""

    def explain(self, evidence: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                kg: Any, top_k: int, adapter_weights: torch.Tensor | None = None
                ) -> Explanation | None:
        """What the reader read for the first question of ``batch``, from its ``evidence``
        (:attr:`ReaderOutput.evidence`; empty when no question had KG input), if anything.
        ``adapter_weights`` (T,): the adapters' attention from its masks over its KG tokens
        ([GCLS], topic, neighbours), averaged over heads, masks and layers."""
        return None


class LMReader(KGReader):
    """The LM answers alone: its softmax. Where HittER enters through adapters, their attention
    from the masks over the topic's neighbours (``adapter_weights`` (T,), averaged over
    heads, masks and adapter layers, captured by ``kgqa.ask``) is the evidence."""

    def forward(self, x: ReaderInput) -> ReaderOutput:
        return ReaderOutput(torch.log_softmax(x.lm_logits.float(), dim=-1))

    def explain(self, evidence, batch, kg, top_k, adapter_weights=None):
        if adapter_weights is None or kg is None:
            return None
        neighbours = adapter_weights[2:]  # (N,): not [GCLS] and the topic token
        return Explanation("the neighbours read most",
                           neighbour_facts(neighbours, batch, kg, top_k))


def neighbour_facts(weights: torch.Tensor, batch: dict[str, torch.Tensor], kg: Any,
                    top_k: int) -> list[Fact]:
    """The ``top_k`` heaviest of the first question's neighbours under ``weights`` (N,), each
    as the edge it stands for: token (e, r) of topic t is (e, r, t), or for r >= R the outgoing
    edge (t, r - R, e) (:mod:`hitter_core.neighbours`)."""
    ents, rels, mask = batch["kg_entities"][0], batch["kg_relations"][0], batch["kg_mask"][0]
    topic, R = kg.entity_names[int(batch["topic_entity"][0])], kg.num_relations
    w = weights.masked_fill(~mask, 0.0)
    facts = []
    for i in w.topk(min(top_k, int(mask.sum()))).indices.tolist():
        r, e = int(rels[i]), kg.entity_names[int(ents[i])]
        fact = (f"({e}, {kg.relations[r]}, {topic})" if r < R
                else f"({topic}, {kg.relations[r - R]}, {e})")
        facts.append(Fact(e, fact, float(w[i])))
    return facts
