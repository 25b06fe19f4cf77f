"""BERT masked LM enhanced with HittER through cross-attention (paper section 4, Figure 4;
appendix B).

:class:`KGEnhancedLM` composes a stock ``transformers.BertForMaskedLM``, optionally a
pretrained :class:`hitter_core.model.HittER` with the :class:`NeighbourIndex` of its graph, and
the cross-attention adapters of :mod:`kgqa.adapters`. Without HittER it is the plain LM (the
"BERT" baseline of paper Table 6) on the same code path.

KG input (REFERENCE.md "QA"): the question's topic entity and relation id (0 in the released
data). The model gathers the topic's neighbours itself: in training a fresh random subset of
``max_neighbours`` (no ground-truth removal, no neighbour drop), in evaluation the fixed first
ones; HittER runs in its representation mode (``HittER.encode``), its internal dropouts
following its own train/eval mode. A question whose topic is -1 (not in the graph) gets no KG
input and the LM's states for it are exactly those of the plain LM.

Batches are dicts of tensors: ``input_ids`` (B, L), ``attention_mask`` (B, L), optional
``token_type_ids`` (B, L), ``labels`` (B, L) (-100 except at the answer's [MASK] positions),
``topic_entity`` (B,) (-1 = none; missing = no KG input) and ``relation`` (B,) (missing = 0).
Other keys are ignored. The MLM head runs at the mask positions only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import BertConfig, BertForMaskedLM
from transformers.utils import ModelOutput

from hitter_core.model import HittER, HittERConfig
from hitter_core.neighbours import NeighbourIndex
from kgqa.adapters import (
    CrossAttentionAdapter,
    KGContext,
    KGStates,
    attach_adapters,
    check_layer_mapping,
    default_layer_mapping,
)
from kgqa.config import KGQAModelConfig, QATrainConfig, format_layer_mapping, parse_layer_mapping
from kgqa.lm import resolve_lm

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "kgqa_config.json"
FORMAT_VERSION = 1


@dataclass
class KGQAOutput(ModelOutput):
    """``logits`` (M, V) at the M mask positions of the batch in row-major (B, L) order;
    ``rows`` (M,) the batch row of each; ``labels`` (M,) the gold pieces when given; ``loss``
    the mean cross-entropy over the M positions."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    rows: torch.Tensor | None = None


class KGEnhancedLM(nn.Module):
    """A BERT masked LM whose chosen layers cross-attend to HittER's context layers."""

    def __init__(
        self,
        config: KGQAModelConfig,
        lm: BertForMaskedLM,
        hitter: HittER | None = None,
        neighbours: NeighbourIndex | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.lm = lm
        self.hitter = hitter
        self.neighbours = neighbours
        self.context = KGContext()
        self.layer_mapping: dict[int, int] = {}
        if hitter is None:
            return
        if neighbours is None:
            raise ValueError("a KG-enhanced model needs the NeighbourIndex of HittER's graph")
        num_lm, num_kg = lm.config.num_hidden_layers, hitter.config.num_context_layers
        if config.layer_mapping is None:
            self.layer_mapping = default_layer_mapping(num_lm, num_kg)
        else:
            self.layer_mapping = parse_layer_mapping(config.layer_mapping)
        check_layer_mapping(self.layer_mapping, num_lm, num_kg)
        attach_adapters(
            lm.bert.encoder.layer, self.layer_mapping, hitter.config.hidden_size, lm.config,
            self.context, config.adapter_dropout,
        )
        if config.freeze_kg:
            hitter.requires_grad_(False)
            hitter.eval()

    @classmethod
    def build(
        cls, config: KGQAModelConfig, neighbours: NeighbourIndex | None = None
    ) -> KGEnhancedLM:
        """Pretrained LM (``config.lm``) + pretrained HittER (``config.kg_checkpoint``, if any)
        + freshly initialised adapters."""
        lm = BertForMaskedLM.from_pretrained(resolve_lm(config.lm))
        hitter = None
        if config.kg_checkpoint is not None:
            hitter = HittER.from_pretrained(config.kg_checkpoint)
        return cls(config, lm, hitter, neighbours)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, torch.Tensor]) -> KGQAOutput:
        input_ids = batch["input_ids"]  # (B, L)
        labels = batch.get("labels")
        # (B, L) answer positions: labelled ones, or the [MASK] tokens when there are no labels.
        positions = input_ids == self.config.mask_token_id if labels is None else labels != -100
        states = self.encode_kg(batch.get("topic_entity"), batch.get("relation"))
        if states is not None and any(
            getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()
        ):
            # The adapters read the KG states from a context that is gone when checkpointed
            # layers are recomputed in backward.
            raise NotImplementedError("gradient checkpointing is not supported with KG input")
        with self.context.use(states):
            hidden = self.lm.bert(
                input_ids=input_ids,
                attention_mask=batch.get("attention_mask"),
                token_type_ids=batch.get("token_type_ids"),
            ).last_hidden_state  # (B, L, D)
        logits = self.lm.cls(hidden[positions])  # (M, V)
        rows = positions.nonzero()[:, 0]  # (M,)
        out = KGQAOutput(logits=logits, rows=rows)
        if labels is not None:
            out.labels = labels[positions]  # (M,)
            out.loss = F.cross_entropy(logits, out.labels)
        return out

    def encode_kg(
        self, topic_entity: torch.Tensor | None, relation: torch.Tensor | None
    ) -> KGStates | None:
        """HittER's context-layer outputs for the rows with a topic entity (None if no row
        has one, or there is no HittER)."""
        if self.hitter is None or topic_entity is None:
            return None
        rows = (topic_entity >= 0).nonzero().squeeze(1)  # (B_kg,)
        if not len(rows):
            return None
        sources = topic_entity[rows]
        relations = sources.new_zeros(len(rows)) if relation is None else relation[rows]
        nbrs = self.neighbours.gather(
            sources, self.config.max_neighbours, train=self.training
        ).to(sources.device)  # (B_kg, N) each
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_kg):
            layers, mask = self.hitter.encode(
                sources, relations, nbrs.entities, nbrs.relations, nbrs.mask
            )  # each (B_kg, 2+N, D_kg); (B_kg, 2+N)
        return KGStates(rows, layers, mask)

    def train(self, mode: bool = True) -> KGEnhancedLM:
        super().train(mode)
        if self.hitter is not None and self.config.freeze_kg:
            self.hitter.eval()  # frozen: no dropout either
        return self

    # ------------------------------------------------------------------ optimisation

    def adapters(self) -> list[CrossAttentionAdapter]:
        return [m for m in self.modules() if isinstance(m, CrossAttentionAdapter)]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(adapter parameters, pretrained parameters), trainable ones only: the new
        cross-attention modules and everything else (the LM, and HittER unless frozen)."""
        adapter_ids = {id(p) for a in self.adapters() for p in a.parameters()}
        new, pretrained = [], []
        for p in self.parameters():  # tied weights appear once
            if p.requires_grad:
                (new if id(p) in adapter_ids else pretrained).append(p)
        return new, pretrained

    def optimizer_groups(self, train: QATrainConfig) -> list[dict]:
        """AdamW parameter groups: adapters at ``lr_adapters``, the rest at ``lr_pretrained``;
        weight decay on every parameter except biases and LayerNorm weights (REFERENCE.md)."""
        no_decay = set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "bias" or isinstance(module, nn.LayerNorm):
                    no_decay.add(id(p))
        groups = []
        new, pretrained = self.parameter_groups()
        for params, lr in ((new, train.lr_adapters), (pretrained, train.lr_pretrained)):
            for decay in (True, False):
                chosen = [p for p in params if (id(p) not in no_decay) == decay]
                if chosen:
                    wd = train.weight_decay if decay else 0.0
                    groups.append({"params": chosen, "lr": lr, "weight_decay": wd})
        return groups

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``model.safetensors`` (all weights) + ``kgqa_config.json``: this model's config with
        the layer mapping actually used, the LM's and HittER's configs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        config["layer_mapping"] = (
            format_layer_mapping(self.layer_mapping) if self.hitter is not None else None
        )
        record = {
            "format": FORMAT_VERSION,
            "model": config,
            "lm_config": self.lm.config.to_dict(),
            "hitter_config": None if self.hitter is None else self.hitter.config.to_dict(),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
        save_model(self, str(directory / WEIGHTS_NAME))  # tied LM weights stored once

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, neighbours: NeighbourIndex | None = None
    ) -> KGEnhancedLM:
        """Rebuild from :meth:`save_pretrained` output without touching the original LM or
        HittER checkpoints; returned in eval mode. ``neighbours`` as for the constructor."""
        directory = Path(directory)
        record = json.loads((directory / CONFIG_NAME).read_text())
        if record.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: format {record.get('format')}, "
                             f"expected {FORMAT_VERSION}")
        lm = BertForMaskedLM(BertConfig.from_dict(record["lm_config"]))
        hitter = None
        if record["hitter_config"] is not None:
            hitter = HittER(HittERConfig.from_dict(record["hitter_config"]))
        model = cls(KGQAModelConfig(**record["model"]), lm, hitter, neighbours)
        load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        return model.eval()
