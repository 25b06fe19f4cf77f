"""BERT masked LM enhanced with HittER through cross-attention (paper section 4, Figure 4;
appendix B).

:class:`KGEnhancedLM` is a ``transformers.PreTrainedModel`` (config :class:`KGQAConfig`, so
``save_pretrained`` / ``from_pretrained`` are the standard ones) that composes a stock
``BertForMaskedLM``, optionally a pretrained :class:`hitter_core.model.HittER`, and the
cross-attention adapters of :mod:`kgqa.adapters`. Without HittER it is the plain LM (the
"BERT" baseline of paper Table 6) on the same code path.

KG input (REFERENCE.md "QA"): the question's topic entity, its relation id (0 in the released
data) and the topic's neighbours, gathered where batches are made
(:class:`kgqa.batches.ClozeCollator`: a fresh random subset in training, the fixed first ones
in evaluation). HittER runs in its representation mode (``HittER.encode``), its internal
dropouts following its own train/eval mode. A question whose topic is -1 (not in the graph)
gets no KG input and the LM's states for it are exactly those of the plain LM.

Batch keys (tensors): ``input_ids`` (B, L), ``attention_mask`` (B, L), optional
``token_type_ids`` (B, L), ``labels`` (B, L) (-100 except at the answer's [MASK] positions;
without labels the [MASK] tokens, :attr:`KGEnhancedLM.mask_token_id`), ``topic_entity`` (B,)
(-1 = none; missing = no KG input), ``relation`` (B,) (missing = 0) and the neighbourhoods
``kg_entities``, ``kg_relations``, ``kg_mask`` (B, N). Other keys are ignored. The MLM head
runs at the mask positions only.

:func:`build_model` is the one builder (pretrained LM + pretrained HittER + new adapters);
:func:`load_qa_model` loads a saved QA model with its tokenizer and its graph's neighbourhoods.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedModel
from transformers.utils import ModelOutput

from hitter_core.checkpoint import load_hitter
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from kgqa.adapters import (
    CrossAttentionAdapter,
    KGContext,
    KGStates,
    attach_adapters,
    check_layer_mapping,
    default_layer_mapping,
)
from kgqa.config import KGQAConfig, format_layer_mapping, parse_layer_mapping
from kgqa.copy_head import KGCopyHead
from kgqa.link_head import KGLinkHead
from kgqa.lm import resolve_lm
from kgqa.verbalise import relation_texts


@dataclass
class KGQAOutput(ModelOutput):
    """``logits`` (M, V) at the M mask positions of the batch in row-major (B, L) order;
    ``rows`` (M,) the batch row of each; ``labels`` (M,) the gold pieces when given; ``loss``
    the mean cross-entropy over the M positions."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    # With the copy head (kgqa.copy_head): ``logits`` are log-probabilities, ``kg_attention``
    # (B_kg, N) the weight of each neighbour for each question with KG input (rows
    # ``kg_rows``), ``kg_gate`` (B_kg,) the share of the copy distribution.
    # With the link head (kgqa.link_head): log-probabilities too, ``kg_gate`` and
    # ``kg_relation_probs`` (B_kg, 2R) the relation the head reads in each question.
    kg_rows: torch.Tensor | None = None
    kg_attention: torch.Tensor | None = None
    kg_gate: torch.Tensor | None = None
    kg_relation_probs: torch.Tensor | None = None


class KGEnhancedLM(PreTrainedModel):
    """A BERT masked LM whose chosen layers cross-attend to HittER's context layers.

    ``lm`` / ``hitter`` are pretrained modules to compose (:func:`build_model`); when absent
    they are built, randomly initialised, from ``config.lm_config`` / ``config.kg_config``
    (what ``from_pretrained`` does before loading the saved weights)."""

    config_class = KGQAConfig
    base_model_prefix = "kgqa"

    def __init__(
        self, config: KGQAConfig, lm: BertForMaskedLM | None = None, hitter: HittER | None = None
    ) -> None:
        super().__init__(config)
        if lm is None:
            if config.lm_config is None:
                raise ValueError("KGQAConfig.lm_config is not set: use kgqa.model.build_model")
            lm = BertForMaskedLM(BertConfig.from_dict(config.lm_config))
        if hitter is None and config.kg_config is not None:
            hitter = HittER(HittERConfig.from_dict(config.kg_config))
        self.lm = lm
        self.hitter = hitter
        self.context = KGContext()
        self.layer_mapping: dict[int, int] = {}
        # The tokenizer's [MASK] id, set at run time from the tokenizer (build_model,
        # load_qa_model): the mask positions of a batch without labels.
        self.mask_token_id: int | None = None
        if hitter is not None:
            num_lm, num_kg = lm.config.num_hidden_layers, hitter.config.num_context_layers
            if config.layer_mapping is None:
                self.layer_mapping = default_layer_mapping(num_lm, num_kg)
            else:
                self.layer_mapping = parse_layer_mapping(config.layer_mapping)
            check_layer_mapping(self.layer_mapping, num_lm, num_kg)
            if config.adapter == "none":
                self.layer_mapping = {}
            else:
                attach_adapters(
                    lm.bert.encoder.layer, self.layer_mapping, hitter.config.hidden_size,
                    lm.config, self.context, config.adapter_dropout,
                    gated=config.adapter == "gated",
                )
        self.copy_head: KGCopyHead | None = None
        if config.copy_head and hitter is not None:  # like the adapters: unused without KG
            self.copy_head = KGCopyHead(
                lm.config, hitter.config.hidden_size, hitter.config.num_entities,
                hitter.config.num_relations, name_keys=config.copy_name_keys)
        self.link_head: KGLinkHead | None = None
        if config.link_head and hitter is not None:
            self.link_head = KGLinkHead(lm.config, hitter.config.num_entities,
                                        hitter.config.num_relations,
                                        confidence=config.link_confidence)
        self._freeze_kg()
        # What was built, so that save_pretrained writes a self-contained config.
        config.lm_config = lm.config.to_dict()
        config.kg_config = None if hitter is None else hitter.config.to_dict()
        config.layer_mapping = (
            format_layer_mapping(self.layer_mapping) if hitter is not None else None
        )
        self.post_init()  # marks the composed pretrained modules' weights as initialised

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: the LM and HittER initialise themselves (or come pretrained) and
        each adapter initialises itself as BERT does (kgqa.adapters)."""

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        topic_entity: torch.Tensor | None = None,
        relation: torch.Tensor | None = None,
        kg_entities: torch.Tensor | None = None,
        kg_relations: torch.Tensor | None = None,
        kg_mask: torch.Tensor | None = None,
        **_: Any,  # other batch keys (answer_entity, num_masks)
    ) -> KGQAOutput:
        if labels is not None:
            positions = labels != -100  # (B, L) answer positions
        elif self.mask_token_id is not None:
            positions = input_ids == self.mask_token_id  # (B, L)
        else:
            raise ValueError("a batch without labels needs model.mask_token_id (the "
                             "tokenizer's [MASK] id) to find the answer positions")
        states = None
        if self.layer_mapping or self.copy_head is not None:  # what reads HittER's states
            states = self.encode_kg(topic_entity, relation, kg_entities, kg_relations, kg_mask)
        if states is not None and any(
            getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()
        ):
            # The adapters read the KG states from a context that is gone when checkpointed
            # layers are recomputed in backward.
            raise NotImplementedError("gradient checkpointing is not supported with KG input")
        with self.context.use(states):
            hidden = self.lm.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            ).last_hidden_state  # (B, L, D)
        logits = self.lm.cls(hidden[positions])  # (M, V)
        rows = positions.nonzero()[:, 0]  # (M,)
        out = KGQAOutput(logits=logits, rows=rows)
        if self.copy_head is not None and states is not None:
            copied = self.copy_head(
                logits, hidden[positions], rows, len(input_ids), states.rows,
                states.layers[-1][:, 2:],  # (B_kg, N, D_kg): the neighbour tokens
                kg_entities[states.rows], states.mask[:, 2:],
                kg_relations[states.rows], self.lm.bert.embeddings.word_embeddings,
            )
            out.logits, out.kg_rows = copied.log_probs, states.rows
            out.kg_attention, out.kg_gate = copied.attention, copied.gate
        links = self.predict_links(topic_entity, kg_entities, kg_relations, kg_mask)
        if links is not None:
            kg_rows, topics, query_rows, query_relations, scores = links
            linked = self.link_head(logits, hidden[positions], rows, len(input_ids), kg_rows,
                                    topics, query_rows, query_relations, scores,
                                    self.lm.bert.embeddings.word_embeddings)
            out.logits, out.kg_rows = linked.log_probs, kg_rows
            out.kg_gate, out.kg_relation_probs = linked.gate, linked.relation_probs
        if labels is not None:
            out.labels = labels[positions]  # (M,)
            if out.kg_gate is not None:  # log-probabilities of a KG head's mixture
                out.loss = F.nll_loss(out.logits, out.labels)
            else:
                out.loss = F.cross_entropy(logits, out.labels)
        return out

    def encode_kg(
        self,
        topic_entity: torch.Tensor | None,
        relation: torch.Tensor | None,
        kg_entities: torch.Tensor | None,
        kg_relations: torch.Tensor | None,
        kg_mask: torch.Tensor | None,
    ) -> KGStates | None:
        """HittER's context-layer outputs for the rows with a topic entity (None if no row
        has one, or there is no HittER). Neighbourhoods are (B, N), padded with mask False."""
        if self.hitter is None or topic_entity is None:
            return None
        rows = (topic_entity >= 0).nonzero().squeeze(1)  # (B_kg,)
        if not len(rows):
            return None
        if kg_entities is None or kg_relations is None or kg_mask is None:
            raise ValueError("questions with a topic entity need kg_entities, kg_relations "
                             "and kg_mask (kgqa.batches.ClozeCollator gathers them)")
        sources = topic_entity[rows]  # (B_kg,)
        relations = sources.new_zeros(len(rows)) if relation is None else relation[rows]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_kg):
            layers, mask = self.hitter.encode(
                sources, relations, kg_entities[rows], kg_relations[rows], kg_mask[rows]
            )  # each (B_kg, 2+N, D_kg); (B_kg, 2+N)
        return KGStates(rows, layers, mask)

    def predict_links(
        self,
        topic_entity: torch.Tensor | None,
        kg_entities: torch.Tensor | None,
        kg_relations: torch.Tensor | None,
        kg_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...] | None:
        """For the link head: HittER's link prediction for every relation of every topic,
        ``(kg_rows (B_kg,), topics (B_kg,), query_rows (Q,), query_relations (Q,),
        scores (Q, E))``, each query reading the first ``max_neighbours`` (HittER's own) of
        the topic's neighbours; None without the head or a topic."""
        if self.link_head is None or topic_entity is None:
            return None
        kg_rows = (topic_entity >= 0).nonzero().squeeze(1)  # (B_kg,)
        if not len(kg_rows):
            return None
        topics = topic_entity[kg_rows]
        query_rows, query_relations = self.link_head.queries(topics)  # (Q,), (Q,)
        neighbours = {}
        if kg_entities is not None and kg_relations is not None and kg_mask is not None:
            n, at = self.hitter.config.max_neighbours, kg_rows[query_rows]
            neighbours = dict(nbr_entities=kg_entities[at, :n], nbr_relations=kg_relations[at, :n],
                              nbr_mask=kg_mask[at, :n])  # (Q, n) each
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_kg):
            scores = self.hitter(topics[query_rows], query_relations, **neighbours).scores
        return kg_rows, topics, query_rows, query_relations, scores  # scores (Q, E)

    def _freeze_kg(self) -> None:
        if self.hitter is not None and self.config.freeze_kg:
            self.hitter.requires_grad_(False)
            self.hitter.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> KGEnhancedLM:
        """``PreTrainedModel.from_pretrained``; a frozen HittER stays frozen (loading the
        weights makes every parameter trainable again)."""
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_kg()
        return model

    def train(self, mode: bool = True) -> KGEnhancedLM:
        super().train(mode)
        if self.hitter is not None and self.config.freeze_kg:
            self.hitter.eval()  # frozen: no dropout either
        return self

    def adapters(self) -> list[nn.Module]:
        """The new modules (trained at ``lr_adapters``): cross-attention adapters, KG heads."""
        new = [m for m in self.modules() if isinstance(m, CrossAttentionAdapter)]
        return new + [m for m in (self.copy_head, self.link_head) if m is not None]


# ----------------------------------------------------------------------------- building


def build_model(config: KGQAConfig) -> tuple[KGEnhancedLM, set[str]]:
    """The pretrained LM (``config.lm``) + the pretrained HittER (``config.kg_checkpoint``, if
    any) + freshly initialised adapters. Returns the model and the names of the LM parameters
    the LM checkpoint lacked (newly initialised: the MLM head of the offline MiniLM, never
    bert-base-uncased's)."""
    config = copy.deepcopy(config)  # the model fills in lm_config, kg_config, layer_mapping
    # float32 weights whatever the checkpoint holds (transformers 5 keeps a bf16 checkpoint in
    # bf16): bf16 runs as autocast over fp32 master weights (hitter_core.distributed).
    lm, info = BertForMaskedLM.from_pretrained(resolve_lm(config.lm), output_loading_info=True,
                                               dtype=torch.float32)
    missing = set(info["missing_keys"])
    names: dict[int, list[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):  # tied weights: several names
        names.setdefault(id(p), []).append(name)
    fresh = {f"lm.{ns[0]}" for ns in names.values() if all(n in missing for n in ns)}
    hitter = None
    if config.kg_checkpoint is not None and config.kg_init == "random":
        # Control: the checkpoint's shape only (config.json), random weights (seeded by the
        # caller's torch seed), nothing loaded.
        hitter = load_hitter(config.kg_checkpoint, weights=False)
    elif config.kg_checkpoint is not None:
        hitter = load_hitter(config.kg_checkpoint)
    return KGEnhancedLM(config, lm, hitter), fresh


def name_pieces(names: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Word pieces of every name (entities, relation texts), tokenised as the cloze answers are
    (:func:`kgqa.batches.build_cloze_dataset`), for the copy head's name tables."""
    return tokenizer(list(names), add_special_tokens=False)["input_ids"]


def set_head_tables(model: KGEnhancedLM, kg: KnowledgeGraph, tokenizer: Any) -> None:
    """Give the KG heads (if any) the word pieces of the graph's entity names and, for the copy
    head's name-aware keys and the link head, of its relation texts; the link head also each
    entity's relations."""
    if model.copy_head is not None:
        model.copy_head.set_entity_names(name_pieces(kg.entity_names, tokenizer))
        if model.copy_head.name_keys:
            model.copy_head.set_relation_names(name_pieces(relation_texts(kg), tokenizer))
    if model.link_head is not None:
        model.link_head.set_entity_names(name_pieces(kg.entity_names, tokenizer))
        model.link_head.set_relation_names(name_pieces(relation_texts(kg), tokenizer))
        model.link_head.set_graph(kg.train)


def build_neighbour_index(
    kg_config: dict[str, Any], data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None, kg: KnowledgeGraph | None = None,
) -> NeighbourIndex:
    """The neighbour index of HittER's graph (``kg``, or ``kg_config["dataset"]`` loaded from
    ``data_dir``, default $KGQA_DATA_DIR) in the order HittER was trained with (its
    neighbour-order seed); cached under ``cache_dir``."""
    hitter = HittERConfig.from_dict(kg_config)
    if kg is None:
        kg = load_kg(Path(data_dir or default_data_dir()) / hitter.dataset)
    if (hitter.num_entities, hitter.num_relations) != (kg.num_entities, kg.num_relations):
        raise ValueError(
            f"HittER has {hitter.num_entities} entities and {hitter.num_relations} relations, "
            f"{kg.name} {kg.num_entities} and {kg.num_relations}"
        )
    return NeighbourIndex.build(kg, seed=hitter.neighbour_order_seed, cache_dir=cache_dir)


def load_qa_model(
    model_dir: str | os.PathLike, data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[KGEnhancedLM, Any, NeighbourIndex | None]:
    """A saved QA model (``save_pretrained`` directory, with its tokenizer) ready for use, in
    eval mode: ``(model, tokenizer, neighbour_index)``; the index is None for a no-KG model.
    Batches for it: :func:`kgqa.batches.make_batch`."""
    model = KGEnhancedLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.mask_token_id = tokenizer.mask_token_id
    index = None
    if model.config.kg_config is not None:
        index = build_neighbour_index(model.config.kg_config, data_dir, cache_dir)
    return model, tokenizer, index
