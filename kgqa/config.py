"""Configuration of the KG-enhanced masked LM and of its QA fine-tuning (paper section 4 and
appendix B).

Two sections, read by the configuration system both stages share
(:func:`hitter_core.sections.load_sections`; presets ``recipes/configs/qa-*.yaml`` hold only
differences, ``section.key=value`` overrides on the command line):

* ``model``: :class:`KGQAConfig`, the ``transformers`` config of
  :class:`kgqa.model.KGEnhancedLM` (saved as ``config.json`` with every QA checkpoint);
* ``train``: :class:`QATrainConfig`, the QA fine-tuning run.

Defaults are the paper's runs; where the paper is silent they follow
``shared/design/REFERENCE.md`` ("QA (``kgqa``)"), cited field by field. Every field holds one
hyper-parameter that lives nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from hitter_core.sections import ConfigError
from kgqa.lm import DEFAULT_LM
from kgqa.readers import LEGACY_FIELDS, legacy_reader, parse_reader


@strict
class KGQAConfig(PreTrainedConfig):
    """What :class:`kgqa.model.KGEnhancedLM` is built from (paper section 4, Figure 4).

    ``lm_config`` and ``kg_config`` are filled by :func:`kgqa.model.build_model` from the
    loaded LM and HittER (``None`` until then; ``kg_config`` stays ``None`` without KG), and
    ``layer_mapping`` then holds the mapping actually used, so a saved model rebuilds from its
    ``config.json`` alone."""

    model_type = "hitter-kgqa"
    LEGACY_FIELDS = LEGACY_FIELDS  # accepted in saved files only (hitter_core.sections)

    # Language model: a Hub id or local directory of a masked LM of the families in
    # kgqa.lm.FAMILIES (``minilm`` = the offline test LM). Paper section 4: BERT-base, uncased.
    lm: str = DEFAULT_LM
    # HittER checkpoint directory (``HittER.save_pretrained``); None = the no-KG baseline,
    # the plain LM ("BERT" row of paper Table 6). Paper: the best FB15K-237 model.
    kg_checkpoint: str | None = None
    # False = HittER co-trained with the LM at the pretrained learning rate (REFERENCE.md);
    # True = HittER frozen: no gradient and kept in eval mode.
    freeze_kg: bool = False
    # Which HittER context layer each LM layer's adapter attends to, both 1-based, "lm:kg" pairs
    # such as "3:2,4:2,5:3". None = kgqa.readers.adapters.default_layer_mapping (the paper's for
    # 12/6 layers).
    layer_mapping: str | None = None
    # Dropout after the adapter's output projection; None = the LM's hidden_dropout_prob
    # (appendix B: the cross-attention follows the BERT configuration). Its attention-
    # probability dropout is always the LM's attention_probs_dropout_prob.
    adapter_dropout: float | None = None
    # Neighbours per topic entity given to HittER (REFERENCE.md: up to 50); read where batches
    # are made (kgqa.batches.ClozeCollator).
    max_neighbours: int = 50
    # How the LM reads HittER: a name of kgqa.readers.READERS, or an adapter reader and a head
    # joined by "+" ("paper+link"). Paper: its cross-attention adapters. "none" (the plain LM)
    # and "text" read no HittER (kg_checkpoint null); the others need one (check_reader).
    reader: str = "paper"
    # Controls: "random" = a HittER of the checkpoint's shape, randomly initialised (seeded by
    # train.seed), no pretrained weight loaded: does the gain need HittER's pretraining?
    # "frequency" = the link head reads, instead of HittER's scores, how often each entity
    # answers the relation in the train graph (log counts; hitter_core.baselines, test MRR
    # 0.2334 on FB15K-237): does HittER know more than answer priors? (link readers only)
    kg_init: Literal["pretrained", "random", "frequency"] = "pretrained"
    # The "text" reader (kgqa.verbalise): the topic's first neighbours, verbalised, are appended
    # to the question, which is kept within this many word pieces.
    kg_text_length: int = 128
    # Set by the builder, not by users: the LM's config.to_dict(), HittERConfig.to_dict().
    lm_config: dict[str, Any] | None = None
    kg_config: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        legacy = {k: kwargs.pop(k) for k in LEGACY_FIELDS if k in kwargs}
        if legacy:  # a model saved before model.reader (its config.json holds the old flags)
            self.reader = legacy_reader(legacy | {"kg_text_length": self.kg_text_length},
                                        has_hitter=self.kg_checkpoint is not None)
            if self.kg_text_length == 0:  # 0 was "off", which the reader now says
                self.kg_text_length = type(self).kg_text_length
        super().__post_init__(**kwargs)

    def validate_kgqa(self) -> None:
        if self.max_neighbours < 0:
            raise ValueError(f"max_neighbours must be >= 0, got {self.max_neighbours}")
        if self.adapter_dropout is not None and not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.layer_mapping is not None:
            parse_layer_mapping(self.layer_mapping)  # fail early on a malformed string
        parse_reader(self.reader)  # a known reader or combination
        if self.kg_text_length < 1:
            raise ValueError(f"kg_text_length must be >= 1, got {self.kg_text_length}")

    def check_reader(self) -> None:
        """Raise unless the reader and ``kg_checkpoint`` agree: a reader of HittER needs a
        checkpoint, ``none`` and ``text`` take none. Checked when a model is built, not by the
        config itself, so that presets name a reader and the checkpoint comes at run time."""
        reader = parse_reader(self.reader)
        if reader.reads_hitter and self.kg_checkpoint is None:
            raise ConfigError(f"model.reader={self.reader} reads HittER: set "
                              f"model.kg_checkpoint (or model.reader=none for the plain LM)")
        if not reader.reads_hitter and self.kg_checkpoint is not None:
            raise ConfigError(f"model.reader={self.reader} reads no HittER: choose a reader "
                              f"(paper, link, ...; kgqa.readers) or set model.kg_checkpoint=null")
        if self.kg_init == "frequency" and not reader.link_prediction:
            raise ConfigError(f"model.kg_init=frequency replaces HittER's link-prediction scores: "
                              f"a reader of scores alone (link, link-confidence), not "
                              f"{self.reader}")


@strict
@dataclass
class QATrainConfig:
    """QA fine-tuning (appendix B; REFERENCE.md "Training"): hyper-parameters and run
    settings. One run = one dataset, one split, one seed (recipes loop over seeds)."""

    RENAMED_FIELDS = {"lr_adapters": "lr_new"}  # old name -> new, read in saved files only

    dataset: Literal["webqsp", "freebaseqa"] = "webqsp"
    # "full" = all questions, "filtered" = topic and answer both in FB15K-237 (paper Table 5).
    split: Literal["full", "filtered"] = "filtered"
    data_dir: str | None = None  # None = $KGQA_DATA_DIR
    output_dir: str = "runs/qa"
    # Prepared splits, cloze datasets, neighbour index; None = ~/.cache/hitter-kgqa.
    cache_dir: str | None = None
    # Appendix B: Adam(W) at 5e-5 for the new cross-attention modules (here: every module new
    # to the model, the reader's adapters and head, and LM weights its checkpoint lacks) and
    # 5e-6 for every pretrained weight (BERT and, co-trained, HittER).
    lr_new: float = 5e-5
    lr_pretrained: float = 5e-6
    # REFERENCE.md: weight decay 0.01 except biases and LayerNorm weights.
    weight_decay: float = 0.01
    # Appendix B / REFERENCE.md: linear warm-up over the first 10% of steps, then linear decay
    # (hitter_core.optim.warmup_steps).
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # REFERENCE.md: gradient clipping 1.0
    batch_size: int = 16  # appendix B; per process
    eval_batch_size: int = 64  # questions per dev / test forward pass (no effect on results)
    epochs: int = 20  # appendix B
    seed: int = 333  # REFERENCE.md; paper Table 6: mean and std over five seeds
    # The reference selected its checkpoint on the test set; we hold out this share of train
    # as a dev split, select on it and report test once (REFERENCE.md, last point).
    dev_fraction: float = 0.1
    eval_every: int = 1  # epochs between dev evaluations; the last epoch is always evaluated
    patience: int = 0  # dev evaluations without improvement before stopping; 0 = never stop
    max_train_examples: int | None = None  # smoke runs: the first n train questions only
    max_eval_examples: int | None = None  # smoke runs: the first n dev / test questions only
    zero_stage: int = 0  # DeepSpeed ZeRO stage (ds_config.json); 0-2 supported
    # bf16 autocast where the device has native bf16, else fp32 (as stage 1: hitter_core.precision)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Control: every question gets another question's topic entity (a seeded derangement
    # within each split), so its KG input belongs to some other question.
    shuffle_topics: bool = False

    def validate_values(self) -> None:
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ValueError(f"train.dev_fraction must be in (0, 1) (the dev split selects "
                             f"the checkpoint), got {self.dev_fraction}")
        for name in ("batch_size", "eval_batch_size", "epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"train.patience must be >= 0 (0 = never stop), got {self.patience}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2 (3 shards the weights), "
                             f"got {self.zero_stage}")


QA_SCHEMA = {"model": KGQAConfig, "train": QATrainConfig}  # the sections of a QA run


def parse_layer_mapping(spec: str | Mapping[int, int]) -> dict[int, int]:
    """``"3:2,4:2"`` (or a mapping) -> ``{3: 2, 4: 2}``: 1-based LM layer -> 1-based HittER
    context layer. Keys may also be strings (a mapping read back from JSON)."""
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in spec.replace(" ", "").split(","):
            if item:
                lm, sep, kg = item.partition(":")
                if not sep:
                    raise ValueError(f"layer mapping item {item!r} is not 'lm:kg'")
                pairs.append((lm, kg))
    try:
        mapping = {int(lm): int(kg) for lm, kg in pairs}
    except ValueError as e:
        raise ValueError(f"layer mapping {spec!r} must hold integers") from e
    if len(mapping) != len(pairs):
        raise ValueError(f"layer mapping {spec!r} names an LM layer twice")
    if any(lm < 1 or kg < 1 for lm, kg in mapping.items()):
        raise ValueError(f"layer mapping {spec!r}: layers are 1-based")
    return dict(sorted(mapping.items()))


def format_layer_mapping(mapping: Mapping[int, int]) -> str:
    """Inverse of :func:`parse_layer_mapping`."""
    return ",".join(f"{lm}:{kg}" for lm, kg in sorted(mapping.items()))
