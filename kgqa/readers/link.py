"""The link reader (``model.reader=link``, ``link-confidence``): HittER itself answers the
question by link prediction (not in the paper).

The copy head (:mod:`kgqa.readers.copy`) points at the topic's neighbours, so whatever reads the
neighbour list gains, a randomly initialised HittER too (issue "knowledge that helps": its
untrained control keeps most of the gain). This head reads no neighbour list itself: its
answer comes from HittER's link prediction (HittER reading the topic's first ``max_neighbours``
neighbours as its context, as in link prediction), so it is only as good as HittER's knowledge.

* The question asks for the object of an unknown relation of its topic t (the released data
  gives none). Each relation id in [0, 2R) (r >= R: the reciprocal, "(?, r - R, t)") is scored
  from the question vector q (the mean LM state at its [MASK] positions): a linear map of q
  plus the match of q with a key read from the relation's text through the LM's word
  embeddings (mean over its word pieces, projected, plus the direction; as the copy head's
  name keys), so that "where was ... born" can find "place of birth" although no training
  question asked it. A softmax over the relations t has in the train graph (either direction;
  at most 58 in FB15K-237) gives ``p(r | q, t)``. The topic's relations say nothing of its
  neighbours.
* HittER scores every entity for each query (t, r, ?) as in link prediction (with its own
  number of context neighbours, the batch's first ``max_neighbours`` of the topic), and
  ``p_KG(e) = sum_r p(r | q, t) softmax_e(s(t, r, e) / T)`` with a learned temperature T.
* Only entities whose name has as many word pieces as the question has [MASK] tokens are
  candidates (as for the copy head); ``p_KG`` is renormalised over the C of them and put on
  their names' word pieces (:meth:`kgqa.readers.names.NameReader.on_names`): ``m_KG(v)`` at each
  mask, and ``m_U(v)`` for the uniform distribution over the same candidates.
* HittER's opinion enters as a product of experts, not as a mixture:
  ``logits = LM logits + beta * (log(1 + C m_KG(v)) - log(1 + C m_U(v)))``, a boost for the
  word pieces HittER finds likelier than chance and nothing for the others (a piece that no
  candidate's name holds gets 0), with ``beta = w . q + b`` per question, zero at the start:
  the model starts as exactly the plain LM. (A first version mixed the two softmaxes,
  ``(1 - lam) p_LM + lam p_KG`` as the copy head does: HittER's confident wrong answers then
  won the argmax: WebQSP filtered dev accuracy 0.26 after 13 of 20 epochs, the plain LM 0.53.
  A weak link predictor is useful as a prior that reorders the LM's own candidates.)
* With ``confidence`` (``link-confidence``), beta also reads three figures of how sure
  the head is, each in [0, 1] or a logit, through weights zero at the start: the best relation
  logit (does any relation of the topic match the question?), the certainty of
  ``p(r | q, t)`` (1 - its entropy / log of the topic's relation count) and of HittER's answer
  (its KL divergence from the uniform over the candidates / log C). The figures are detached:
  they steer beta, not the relation map. Why: on FreebaseQA filtered (seed 333) the plain
  head lost 12 of the 141 questions whose answer is not a neighbour of the topic (14.2%
  against the LM's 22.7%) while gaining on the others (``bench/link_probe.py``).

With HittER frozen only the relation map, the temperature and beta learn from the questions;
with an untrained HittER ``p_KG`` is near uniform over the candidates, the boost near zero.

The frequency-prior control (``model.kg_init=frequency``, ``frequency_prior=True``) asks no
HittER: s(t, r, e) = log(1 + how often e answers r in the train graph), the same for every topic
(the relation-frequency baseline of :mod:`hitter_core.baselines`, test MRR 0.2334 on FB15K-237
against 0.29-0.31 for the CPU HittERs). What the link head gains beyond it is what HittER knows
beyond answer priors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from kgqa.lm import embedding_width, word_pieces
from kgqa.readers.base import Explanation, Fact, ReaderInput, ReaderOutput
from kgqa.readers.names import NameReader, mask_queries
from kgqa.verbalise import relation_texts


class LinkReader(NameReader):
    """Reads the question's relation, lets HittER predict the object, copies its name."""

    def __init__(self, lm_config: PreTrainedConfig, kg_config: Any,
                 confidence: bool = False, frequency_prior: bool = False) -> None:
        num_entities, num_relations = kg_config.num_entities, kg_config.num_relations
        super().__init__(num_entities, num_relations)
        self.max_neighbours = kg_config.max_neighbours  # HittER's own context width
        d = lm_config.hidden_size
        self.relation = nn.Linear(d, 2 * num_relations)  # which relation the question asks
        self.query = nn.Linear(d, d)  # ... and its match with the relation texts
        self.relation_key = nn.Linear(embedding_width(lm_config), d)
        self.direction = nn.Embedding(2, d)  # (t, r, ?) or its reciprocal (?, r, t)
        nn.init.normal_(self.direction.weight, std=lm_config.initializer_range)
        for linear in (self.relation, self.query, self.relation_key):
            nn.init.normal_(linear.weight, std=lm_config.initializer_range)
            nn.init.zeros_(linear.bias)
        self.gate = nn.Linear(d, 1)  # beta: zero at the start, the plain LM exactly
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.confidence = None  # beta's reading of the head's certainty (module docstring)
        if confidence:
            self.confidence = nn.Linear(3, 1)
            nn.init.zeros_(self.confidence.weight)
            nn.init.zeros_(self.confidence.bias)
        self.log_temperature = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed broadcasts no 0-d
        # (E, 2R) True where entity e has relation r (r >= R: incoming edges) in the train graph.
        self.register_buffer("entity_relations",
                             torch.zeros(num_entities, 2 * num_relations, dtype=torch.bool))
        self.frequency_prior = frequency_prior  # the control: no HittER (module docstring)
        if frequency_prior:  # (2R, E) log(1 + how often e answers (?, r, ?) in train)
            self.register_buffer("log_counts", torch.zeros(2 * num_relations, num_entities))

    def set_tables(self, kg: Any, tokenizer: Any) -> None:
        self.set_entity_names(word_pieces(kg.entity_names, tokenizer))
        self.set_relation_names(word_pieces(relation_texts(kg), tokenizer))
        self.set_graph(kg.train)

    def set_graph(self, train: torch.Tensor) -> None:
        """The relations each entity has, from the (T, 3) train triples (head, relation, tail):
        (h, r, t) lets h ask (h, r, ?) and t ask (t, r + R, ?)."""
        R = self.entity_relations.shape[1] // 2
        table = torch.zeros_like(self.entity_relations)
        table[train[:, 0], train[:, 1]] = True
        table[train[:, 2], train[:, 1] + R] = True
        self.entity_relations.copy_(table)
        if self.frequency_prior:
            counts = torch.zeros_like(self.log_counts)
            ones = torch.ones(len(train))
            counts.index_put_((train[:, 1], train[:, 2]), ones, accumulate=True)  # (t, r, ?)
            counts.index_put_((train[:, 1] + R, train[:, 0]), ones, accumulate=True)  # reciprocal
            self.log_counts.copy_(counts.log1p())

    def queries(self, topics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The link-prediction queries of topics (B_kg,): (Q,) the row and (Q,) the relation of
        each (t, r, ?) with r one of the topic's relations."""
        rows, relations = self.entity_relations[topics].nonzero(as_tuple=True)
        return rows, relations

    def answer_probs(self, relation_probs: torch.Tensor, query_rows: torch.Tensor,
                     query_relations: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B_kg, E) p_KG(e) = sum_r p(r | q, t) softmax_e(s(t, r, e) / T), over all entities
        (not yet restricted to the candidates), from the (B_kg, 2R) relation probabilities and
        the (Q,) queries with HittER's (Q, E) scores (:meth:`queries`)."""
        predicted = torch.softmax(scores.float() / self.log_temperature.exp(), dim=1)  # (Q, E)
        weight = relation_probs[query_rows, query_relations]  # (Q,)
        return predicted.new_zeros(len(relation_probs), scores.shape[1]).index_add(
            0, query_rows, weight[:, None] * predicted)  # (B_kg, E)

    @staticmethod
    @torch.no_grad()
    def certainty(relation_logits: torch.Tensor, relation_probs: torch.Tensor,
                  asked: torch.Tensor, p_kg: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
        """(B_kg, 3): the best relation logit, 1 - H(p(r | q, t)) / log(relations) and
        KL(p_KG || uniform over the C candidates) / log C (0 where there is one choice or
        none), from the (B_kg, 2R) relation logits (-inf off the topic's relations) and
        probabilities, the (B_kg, 2R) relations asked and the (B_kg, E) p_KG and candidates."""
        has = asked.any(1)
        best = relation_logits.max(1).values.where(has, 0.0)  # (B_kg,)
        n = asked.sum(1).float()
        h_r = -(relation_probs * relation_probs.clamp_min(1e-30).log()).sum(1)
        sure_r = torch.where(n > 1, 1 - h_r / n.clamp(min=2).log(), 0.0)
        C = fits.sum(1).float()
        kl = (p_kg * (p_kg.clamp_min(1e-30) * C[:, None]).log()).sum(1)
        sure_kg = torch.where(C > 1, kl / C.clamp(min=2).log(), 0.0)
        return torch.stack([best, sure_r, sure_kg], dim=1)

    def predict_links(self, x: ReaderInput
                      ) -> tuple[torch.Tensor, ...] | None:
        """HittER's link prediction for every relation of every topic: ``(kg_rows (B_kg,),
        topics (B_kg,), query_rows (Q,), query_relations (Q,), scores (Q, E))``, each query
        reading the batch's first ``max_neighbours`` (HittER's own number) of the topic's
        neighbours; None without a topic."""
        if x.topic_entity is None:
            return None
        kg_rows = (x.topic_entity >= 0).nonzero().squeeze(1)  # (B_kg,)
        if not len(kg_rows):
            return None
        topics = x.topic_entity[kg_rows]
        query_rows, query_relations = self.queries(topics)  # (Q,), (Q,)
        neighbours = {}
        if x.kg_entities is not None and x.kg_relations is not None and x.kg_mask is not None:
            n, at = self.max_neighbours, kg_rows[query_rows]
            neighbours = dict(nbr_entities=x.kg_entities[at, :n],
                              nbr_relations=x.kg_relations[at, :n],
                              nbr_mask=x.kg_mask[at, :n])  # (Q, n) each
        if self.frequency_prior:  # the control: answer priors, the same for every topic
            return kg_rows, topics, query_rows, query_relations, self.log_counts[query_relations]
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.kg_grad):
            scores = x.hitter(topics[query_rows], query_relations, **neighbours).scores
        return kg_rows, topics, query_rows, query_relations, scores  # scores (Q, E)

    def forward(self, x: ReaderInput) -> ReaderOutput:
        """Asks HittER (``x.hitter``) about every relation of each topic. Evidence:
        ``relation_probs`` (B_kg, 2R) p(r | q, t), the relation the head reads in each
        question, and ``gate`` (B_kg,) beta, the weight of HittER's opinion."""
        links = self.predict_links(x)
        if links is None:
            return ReaderOutput(torch.log_softmax(x.lm_logits.float(), dim=-1))
        return self.read_links(x, *links)

    def read_links(self, x: ReaderInput, kg_rows: torch.Tensor, topics: torch.Tensor,
                   query_rows: torch.Tensor, query_relations: torch.Tensor,
                   scores: torch.Tensor) -> ReaderOutput:
        """The answer from HittER's link predictions (:meth:`predict_links`): kg_rows (B_kg,)
        the rows with a topic, topics (B_kg,), the queries (Q,) and scores (Q, E)."""
        lm_logits, rows, batch_size = x.lm_logits, x.rows, x.batch_size
        q, counts, slot = mask_queries(x.mask_states, rows, batch_size)  # (B, D), (B,), (M,)
        q = q[kg_rows]  # (B_kg, D)
        asked = self.entity_relations[topics]  # (B_kg, 2R) the topic's relations
        R = len(self.relation_length)
        keys = self.relation_keys(x.word_embeddings, torch.arange(2 * R, device=q.device))
        relation_logits = self.relation(q) + self.query(q) @ keys.T / math.sqrt(q.shape[1])
        relation_logits = relation_logits.float().masked_fill(~asked, float("-inf"))
        has_relation = asked.any(1)  # (B_kg,)
        relation_logits = relation_logits.masked_fill(~has_relation[:, None], 0.0)  # no NaN
        relation_probs = torch.softmax(relation_logits, dim=1) * asked  # (B_kg, 2R)

        p_kg = self.answer_probs(relation_probs, query_rows, query_relations, scores)
        fits = self.name_length[None, :] == counts[kg_rows][:, None]  # (B_kg, E)
        fits = fits & has_relation[:, None]  # a topic without relations: no opinion
        p_kg = p_kg * fits
        p_kg = p_kg / p_kg.sum(1).clamp_min(1e-30)[:, None]  # 0 for a row without candidates
        C = fits.sum(1)  # (B_kg,) candidates
        uniform = fits / C.clamp(min=1)[:, None]  # (B_kg, E)
        E, V = scores.shape[1], lm_logits.shape[1]
        entities = torch.arange(E, device=scores.device).expand_as(p_kg)
        with_kg, i, m_kg = self.on_names(rows, slot, batch_size, kg_rows, entities, p_kg, V)
        _, _, m_u = self.on_names(rows, slot, batch_size, kg_rows, entities, uniform, V)
        c = C[i].to(m_kg.dtype)[:, None]  # (M_kg, 1)
        boost = torch.log1p(c * m_kg) - torch.log1p(c * m_u)  # (M_kg, V)
        beta = self.gate(q).squeeze(1).float()  # (B_kg,)
        if self.confidence is not None:
            sure = self.certainty(relation_logits, relation_probs, asked, p_kg, fits)
            beta = beta + self.confidence(sure).squeeze(1)
        logits = lm_logits.float().index_add(0, with_kg, beta[i][:, None] * boost)  # (M, V)
        return ReaderOutput(torch.log_softmax(logits, dim=-1), kg_rows,
                            {"relation_probs": relation_probs, "gate": beta})

    def explain(self, evidence, batch, kg, top_k, adapter_weights=None):
        if not evidence or kg is None:
            return None
        p, R = evidence["relation_probs"][0], kg.num_relations  # (2R,)
        name = kg.entity_names[int(batch["topic_entity"][0])]
        facts = []
        for r in p.topk(min(top_k, int((p > 0).sum()))).indices.tolist():
            fact = (f"({name}, {kg.relations[r]}, ?)" if r < R
                    else f"(?, {kg.relations[r - R]}, {name})")  # (topic, r, ?), (?, r - R, topic)
            facts.append(Fact("?", fact, float(p[r])))
        return Explanation("the relations HittER was asked", facts, "HittER's weight beta",
                           float(evidence["gate"][0]))
