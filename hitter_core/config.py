"""HittER's configuration: its two sections (paper section 3.3; REFERENCE.md table),
:class:`HittERConfig` (architecture, dropout, MEP, label smoothing, neighbourhood sizes:
everything the model or its data pipeline reads) and :class:`TrainConfig` (optimisation,
schedule, validation, paths). Their defaults are the paper's FB15K-237 run. Presets,
overrides, saving and resuming are the configuration system both stages share,
:mod:`hitter_core.sections`; :func:`load_config` reads HittER's two sections through it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from hitter_core.sections import load_sections, save_sections

DEFAULT_KG = "fb15k-237"  # the paper's main link-prediction graph and the QA stage's graph
DEFAULT_PRESET = DEFAULT_KG  # the preset of the paper's best FB15K-237 run


# ---------------------------------------------------------------------------- HittER's sections


@strict
class HittERConfig(PreTrainedConfig):
    """Architecture and regularisation of HittER. Defaults are the paper's FB15K-237 model
    (paper section 3.3 and the FB15K-237 column of REFERENCE.md); ``recipes/configs/*.yaml``
    hold the differences of other runs."""

    model_type = "hitter"

    # Data: FB15K-237 vocabulary (paper Table 2); set from the loaded graph for other data.
    dataset: str = DEFAULT_KG
    num_entities: int = 14541
    num_relations: int = 237  # R; the relation table has 2R rows (reciprocal relations)
    # Transformer shape (paper section 3.3).
    hidden_size: int = 320
    num_attention_heads: int = 8
    intermediate_size: int = 1280
    hidden_act: str = "gelu"  # REFERENCE.md table
    num_entity_layers: int = 3  # = context layers // 2 (REFERENCE.md)
    num_context_layers: int = 6
    use_context: bool = True  # False: the context-independent model of section 2.1
    # Dropout (section 3.3: 0.1 everywhere, 0.6 on the embedding layers; REFERENCE.md says
    # where the 0.6 "output" dropout applies: entity-Transformer input and scoring table).
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    output_dropout: float = 0.6
    # LayerNorm eps (REFERENCE.md "Small details"): input norms and BERT-style entity layers
    # 1e-12, torch-style context layers 1e-5.
    layer_norm_eps: float = 1e-12
    context_layer_norm_eps: float = 1e-5
    # The reference's type table has 100 rows of which 3 are used; keeping them reproduces
    # its 15,936,640 parameters. 3 is the clean choice (97 * dim fewer parameters).
    type_vocab_size: int = 100
    initializer_range: float = 0.02  # normal(0, 0.02) init (REFERENCE.md)
    # Neighbourhoods (section 3.3): max per source; train-time drop rate, applied by the data
    # pipeline (NeighbourIndex.gather(drop=...)), never by the model.
    max_neighbours: int = 50
    neighbour_drop: float = 0.3
    # Seed of the fixed per-source neighbour order (NeighbourIndex.build(seed=...)) that
    # evaluation reads; the reference left it unseeded (REFERENCE.md "Neighbourhoods").
    neighbour_order_seed: int = 0
    # MEP (section 2.3; REFERENCE.md): share of training examples selected; of those, the share
    # masked, then the share of the *unmasked* ones replaced by a random entity; the rest keep
    # their entity. FB15K-237: 0.5 / 1.0 / 0 and no auxiliary loss.
    mep_self_dropout: float = 0.5
    mep_mask_prob: float = 1.0
    mep_replace_prob: float = 0.0
    mep_aux_loss: bool = False
    label_smoothing: float = 0.0  # REFERENCE.md: 0 for FB15K-237 (the paper says 0.1)
    # Identical (entity, relation) pairs of a batch are encoded once (eval mode: always, the
    # result is the same). In training the copies of a pair then share its dropout draws,
    # where the reference draws them per copy. Every query still sees masks with the reference's
    # distribution, so the expected loss and gradient are unchanged; only queries of one batch
    # that share a pair get correlated noise. On FB15K-237 13-17% of a paper-config batch's
    # pairs are repeats (hub entities), and sharing makes a training step ~10% faster.
    # False: the reference's independent draw per copy.
    dedup_pairs_in_training: bool = True
    # Static shapes: the entity Transformer's pair count and the context Transformer's packed
    # token count are padded up to one of `shape_buckets` sizes per octave (<= 1/shape_buckets
    # more rows; padding rows are never read, so results are exact), and the neighbour width
    # to max_neighbours, so that an epoch sees a few distinct shapes: attention plans
    # (cuDNN), oneDNN primitives and compiled graphs are built once. 0: the exact shapes.
    shape_buckets: int = 8

    def validate_hitter(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        for name in ("attention_dropout", "hidden_dropout", "output_dropout", "neighbour_drop",
                     "mep_self_dropout", "mep_mask_prob", "mep_replace_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.use_context and self.type_vocab_size < 3:
            raise ValueError("type_vocab_size must be >= 3 (GCLS, source, neighbour)")
        if self.shape_buckets < 0:
            raise ValueError(f"shape_buckets must be >= 0 (0 = exact shapes), got "
                             f"{self.shape_buckets}")
        if min(self.num_entities, self.num_relations, self.num_entity_layers) < 1:
            raise ValueError("num_entities, num_relations and num_entity_layers must be >= 1")

    @property
    def mep_loss_weight(self) -> float:
        """Weight of the MEP auxiliary loss: self_dropout / (1 + self_dropout) (REFERENCE.md)."""
        return self.mep_self_dropout / (1.0 + self.mep_self_dropout)


@strict
@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a link-prediction run; defaults from REFERENCE.md's
    FB15K-237 column (the paper's section 3.3 where they agree)."""

    seed: int = 0
    data_dir: str | None = None  # None: $KGQA_DATA_DIR (hitter_core.data.default_data_dir)
    output_dir: str = "runs/hitter"
    drop_unseen: bool = False  # keep valid/test triples with entities unseen in train (std)
    batch_size: int = 512  # triples per step; each gives a tail and a head query
    eval_batch_size: int = 512  # queries per scoring call in validation/test
    max_epochs: int = 300  # WN18RR: 500
    max_steps: int | None = None  # stop after this many steps (smoke runs); None: epochs
    # Adamax with decoupled weight decay (the reference: no bias correction, decay on every
    # parameter including embeddings and LayerNorm).
    lr: float = 0.01  # WN18RR: 0.008
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over the first 10% of steps, then linear decay
    max_grad_norm: float = 1.0
    clip_per_tensor: bool = True  # the reference clips each parameter tensor separately
    # Validation: filtered valid MRR (filter includes test triples), keep the best.
    validate_every: int = 5  # epochs
    patience: int = 10  # validations without improvement before stopping; 0 = never stop
    log_every: int = 100  # steps
    save_every: int = 200  # steps between "last" checkpoints (also after each validation)
    device: str = "auto"  # "auto": cuda when available, else cpu
    # "auto": bf16 autocast where the device computes bf16 natively (CUDA with bf16, a CPU with
    # AVX512-BF16 or AMX), else fp32; weights, optimizer state, gradients, the 1vsAll scores and
    # the loss stay fp32 (hitter_core.precision). Not in the paper (fp32 on a V100).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile each Transformer layer (static shapes: model.shape_buckets > 0); a step that
    # fails compiled is redone eager, and training stays eager (hitter_core.compiled). Off: on CPU
    # compiling takes minutes and is not faster (bench/RESULTS.md). Not in the paper.
    compile: bool = False

    def validate_values(self) -> None:
        positive = ("batch_size", "eval_batch_size", "max_epochs", "validate_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every < 0:
            raise ValueError(f"train.save_every must be >= 0, got {self.save_every}")
        if self.patience < 0:
            raise ValueError(f"train.patience must be >= 0 (0 = never stop), got {self.patience}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


HITTER_SCHEMA: dict[str, type] = {"model": HittERConfig, "train": TrainConfig}


def load_config(
    preset_or_path: str | Path | None = DEFAULT_PRESET, overrides: Sequence[str] = ()
) -> tuple[HittERConfig, TrainConfig]:
    """HittER's two sections (:func:`load_sections` with ``model`` and ``train``)."""
    configs = load_sections(HITTER_SCHEMA, preset_or_path, overrides)
    return configs["model"], configs["train"]


def save_config(path: str | Path, model_config: HittERConfig, train_config: TrainConfig) -> None:
    """:func:`save_sections` of HittER's two sections."""
    save_sections(path, {"model": model_config, "train": train_config})
