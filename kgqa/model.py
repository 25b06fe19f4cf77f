"""A masked LM that reads a pretrained HittER (paper section 4, Figure 4; appendix B).

:class:`KGEnhancedLM` is a ``transformers.PreTrainedModel`` (config :class:`KGQAConfig`, so
``save_pretrained`` / ``from_pretrained`` are the standard ones) that composes a stock masked LM
(``model.lm``: BERT as in the paper, or one of the families of :mod:`kgqa.lm`), optionally a
pretrained :class:`hitter_core.model.HittER`, and the reader ``model.reader`` names
(:mod:`kgqa.readers`): the paper's cross-attention adapters inside every second LM layer
(counted on the LM's own depth), a head at the LM's output (copy, link: ours), or both. Without
HittER it is the plain LM (the "BERT" baseline of paper Table 6) on the same code path.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from hitter_core.checkpoint import load_hitter
from hitter_core.config import HittERConfig
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from kgqa.config import KGQAConfig, format_layer_mapping, parse_layer_mapping
from kgqa.lm import (
    encoder_layers,
    load_masked_lm,
    load_tokenizer,
    masked_lm_from_config,
    mlm_logits,
    num_layers,
)
from kgqa.readers import parse_reader
from kgqa.readers.adapters import (
    CrossAttentionAdapter,
    KGContext,
    KGStates,
    attach_adapters,
    check_layer_mapping,
    default_layer_mapping,
)
from kgqa.readers.base import KGReader, LMReader, ReaderInput


@dataclass
class KGQAOutput(ModelOutput):
    """``log_probs`` (M, V) at the M mask positions of the batch in row-major (B, L) order,
    whatever the reader; ``rows`` (M,) the batch row of each; ``labels`` (M,) the gold pieces
    when given; ``loss`` their mean negative log-likelihood. ``kg_rows`` (B_kg,) the rows the
    reader's ``kg_evidence`` is about (:class:`kgqa.readers.base.ReaderOutput`)."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    kg_rows: torch.Tensor | None = None
    kg_evidence: dict[str, torch.Tensor] | None = None


class KGEnhancedLM(PreTrainedModel):
    """A masked LM reading HittER through ``config.reader`` (:mod:`kgqa.readers`): its
    adapters (if any) inside the chosen LM layers, ``head`` at the output.

    ``lm`` / ``hitter`` are pretrained modules to compose (:func:`build_model`); when absent
    they are built, randomly initialised, from ``config.lm_config`` / ``config.kg_config``
    (what ``from_pretrained`` does before loading the saved weights)."""

    config_class = KGQAConfig
    base_model_prefix = "kgqa"

    def __init__(
        self, config: KGQAConfig, lm: PreTrainedModel | None = None, hitter: HittER | None = None
    ) -> None:
        super().__init__(config)
        if lm is None:
            if config.lm_config is None:
                raise ValueError("KGQAConfig.lm_config is not set: use kgqa.model.build_model")
            lm = masked_lm_from_config(config.lm_config)
        if hitter is None and config.kg_config is not None:
            hitter = HittER(HittERConfig.from_dict(config.kg_config))
        self.lm = lm
        self.hitter = hitter
        self.context = KGContext()
        self.layer_mapping: dict[int, int] = {}
        # The tokenizer's [MASK] id, set at run time from the tokenizer (build_model,
        # load_qa_model): the mask positions of a batch without labels.
        self.mask_token_id: int | None = None
        reader = parse_reader(config.reader)
        if hitter is None and reader.reads_hitter:
            raise ValueError(f"model.reader={config.reader} reads HittER, and there is none")
        if hitter is not None and reader.adapters is not None:
            num_lm, num_kg = num_layers(lm), hitter.config.num_context_layers
            if config.layer_mapping is None:
                self.layer_mapping = default_layer_mapping(num_lm, num_kg)
            else:
                self.layer_mapping = parse_layer_mapping(config.layer_mapping)
            check_layer_mapping(self.layer_mapping, num_lm, num_kg)
            attach_adapters(encoder_layers(lm), self.layer_mapping, hitter.config.hidden_size,
                            lm.config, self.context, config.adapter_dropout,
                            gated=reader.adapters == "gated")
        options = dict(reader.options)
        if config.kg_init == "frequency":  # control: answer priors instead of HittER's scores
            options["frequency_prior"] = True
        self.head: KGReader = (LMReader() if reader.head is LMReader
                               else reader.head(lm.config, hitter.config, **options))
        self._freeze_kg()
        # What was built, so that save_pretrained writes a self-contained config.
        config.lm_config = lm.config.to_dict()
        config.kg_config = None if hitter is None else hitter.config.to_dict()
        config.layer_mapping = format_layer_mapping(self.layer_mapping) or None
        self.post_init()  # marks the composed pretrained modules' weights as initialised

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: the LM and HittER initialise themselves (or come pretrained) and
        each adapter initialises itself as BERT does (kgqa.readers.adapters), each head itself."""

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
        if self.layer_mapping or self.head.reads_states:  # what reads HittER's states
            states = self.encode_kg(topic_entity, relation, kg_entities, kg_relations, kg_mask)
        if states is not None and any(
            getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()
        ):
            # The adapters read the KG states from a context that is gone when checkpointed
            # layers are recomputed in backward.
            raise NotImplementedError("gradient checkpointing is not supported with KG input")
        with self.context.use(states):
            hidden = self.lm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            ).last_hidden_state  # (B, L, D)
        mask_states = hidden[positions]  # (M, D)
        rows = positions.nonzero()[:, 0]  # (M,)
        read = self.head(ReaderInput(
            mlm_logits(self.lm, mask_states), mask_states, rows, len(input_ids),
            self.lm.get_input_embeddings(), topic_entity, kg_entities, kg_relations,
            kg_mask, states, self.hitter, kg_grad=not self.config.freeze_kg))  # (M, V) log p
        out = KGQAOutput(log_probs=read.log_probs, rows=rows, kg_rows=read.kg_rows,
                         kg_evidence=read.evidence)
        if labels is not None:
            out.labels = labels[positions]  # (M,)
            out.loss = F.nll_loss(out.log_probs, out.labels)
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

    def _freeze_kg(self) -> None:
        if self.hitter is not None and self.config.freeze_kg:
            self.hitter.requires_grad_(False)
            self.hitter.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> KGEnhancedLM:
        """``PreTrainedModel.from_pretrained``; a frozen HittER stays frozen (loading the
        weights makes every parameter trainable again). Models saved before ``model.reader``
        load too: their config's flags name the reader (:func:`kgqa.readers.legacy_reader`)
        and their heads' weights are renamed (``copy_head.*``, ``link_head.*`` -> ``head.*``)."""
        kwargs.setdefault("key_mapping", LEGACY_WEIGHT_NAMES)
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_kg()
        return model

    def train(self, mode: bool = True) -> KGEnhancedLM:
        super().train(mode)
        if self.hitter is not None and self.config.freeze_kg:
            self.hitter.eval()  # frozen: no dropout either
        return self

    def new_modules(self) -> list[nn.Module]:
        """The new modules (trained at ``lr_new``): cross-attention adapters and the head
        (unless it has no weights: the LM's own softmax)."""
        head = [self.head] if any(True for _ in self.head.parameters()) else []
        return [m for m in self.modules() if isinstance(m, CrossAttentionAdapter)] + head


LEGACY_WEIGHT_NAMES = {r"^copy_head\.": "head.", r"^link_head\.": "head."}  # before readers


# ----------------------------------------------------------------------------- building


def build_model(config: KGQAConfig) -> tuple[KGEnhancedLM, set[str]]:
    """The pretrained LM (``config.lm``) + the pretrained HittER (``config.kg_checkpoint``, if
    any) + the reader's fresh modules. Returns the model and the names of the LM parameters
    the LM checkpoint lacked (newly initialised: the MLM head of the offline MiniLM, never
    bert-base-uncased's)."""
    config.check_reader()
    config = copy.deepcopy(config)  # the model fills in lm_config, kg_config, layer_mapping
    lm, missing = load_masked_lm(config.lm)
    fresh = {f"lm.{name}" for name in missing}
    hitter = None
    if config.kg_checkpoint is not None and config.kg_init in ("random", "frequency"):
        # Controls: the checkpoint's shape only (config.json), random weights (seeded by the
        # caller's torch seed), nothing loaded; the frequency prior reads none of it.
        hitter = load_hitter(config.kg_checkpoint, weights=False)
    elif config.kg_checkpoint is not None:
        hitter = load_hitter(config.kg_checkpoint)
    return KGEnhancedLM(config, lm, hitter), fresh


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
    tokenizer = load_tokenizer(str(model_dir))
    model.mask_token_id = tokenizer.mask_token_id
    index = None
    if model.config.kg_config is not None:
        index = build_neighbour_index(model.config.kg_config, data_dir, cache_dir)
    return model, tokenizer, index
