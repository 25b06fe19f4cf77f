"""Configuration of both stages: config classes in sections, presets, overrides, command line.

HittER's two sections (paper section 3.3; REFERENCE.md table) are :class:`HittERConfig`
(architecture, dropout, MEP, label smoothing, neighbourhood sizes: everything the model or its
data pipeline reads) and :class:`TrainConfig` (optimisation, schedule, validation, paths).
Their defaults are the paper's FB15K-237 run.

A run's configuration is a set of named *sections*, each an instance of a config class (a
plain dataclass or a ``@strict`` ``PreTrainedConfig``); ``kgqa`` uses the same machinery with
its own classes. Values resolve as defaults <- preset <- overrides:

* a preset ``recipes/configs/<name>.yaml`` (or any YAML path) holds only the differences,
  section by section (``train: {lr: 0.008}``);
* overrides use the same dotted names, ``model.hidden_size=256 train.lr=5e-3``, parsed as YAML
  scalars and type-checked. An unknown key is an error with a "did you mean"; a wrong value is
  an error naming the field.

The resolved configuration is saved with every run as :data:`RUN_CONFIG_NAME`
(:func:`save_sections`) and loads back as a preset. The command line of both stages
(kebab-case flags plus positional overrides, one-line errors) is :mod:`hitter_core.cli`.
"""

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
RUN_CONFIG_NAME = "run_config.yaml"  # the resolved config saved in every run directory
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

# ---------------------------------------------------------------------------- sections


class ConfigError(ValueError):
    """A mistake in a config file or override: one line naming the source and section.key."""


class UnknownKeyError(ConfigError, KeyError):
    """An unknown section or key (a ``KeyError`` too); printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


def settable_fields(cls: type) -> dict[str, Any]:
    """Field name -> declared type of a config class; of a ``PreTrainedConfig`` only the
    class's own annotated fields (not ``id2label`` and the other inherited ones)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # not typing.get_type_hints: transformers' bases fail
        for name, hint in vars(klass).get("__annotations__", {}).items():
            if isinstance(hint, str):  # ``from __future__ import annotations``
                try:
                    hint = eval(hint, vars(sys.modules[klass.__module__]))  # noqa: S307
                except Exception:  # not resolvable here: the class validates it
                    hint = Any
            hints[name] = hint
    own = set(cls.__annotations__) if issubclass(cls, PreTrainedConfig) else None
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.init and (own is None or f.name in own)}


def _matches(value: Any, expected: Any) -> bool:
    """Whether a YAML value fits a field's type; a type not known here passes (the class
    validates it)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if expected in (bool, int, float):  # True is no int here
        return isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    if expected is Any or not isinstance(expected, type):
        return True
    return isinstance(value, origin or expected)  # NoneType, str, ...


def _check_section(
    section: str, cls: type, values: Any, source: str, texts: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Known keys with well-typed values, or :class:`ConfigError` naming ``section.key``.
    ``texts``: the raw override strings, used where a str field was read as a number."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    fields = settable_fields(cls)
    checked = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3)
            hint = f"; did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else ""
            raise UnknownKeyError(f"{source}: unknown key '{section}.{key}'{hint}")
        expected = fields[key]
        accepts = {expected, *typing.get_args(expected)}
        if texts is not None and str in accepts and value is not None:
            value = texts[key]  # "train.output_dir=2024" is the string "2024"
        if float in accepts and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if float in accepts and isinstance(value, str):
            value = _as_float(value)  # PyYAML (YAML 1.1) reads "5e-3" as a string
        if not _matches(value, expected):
            name = getattr(expected, "__name__", str(expected))
            raise ConfigError(f"{source}: {section}.{key} must be {name}, got {value!r}")
        checked[key] = value
    return checked


def _as_float(text: str) -> float | str:
    """``float(text)`` where Python reads it as a number, else ``text`` (the type check fails)."""
    try:
        return float(text)
    except ValueError:
        return text


def resolve_preset(preset_or_path: str | Path) -> Path:
    """A YAML path as given, or the preset ``recipes/configs/<name>.yaml``."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{preset_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset '{preset_or_path}' (available: {', '.join(names)})")
    return preset


def read_yaml(path: Path, schema: Mapping[str, type] = HITTER_SCHEMA) -> dict[str, dict]:
    """A config YAML as ``{section: {key: value}}`` (every section of ``schema``, missing ones
    empty), keys and types checked."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {tuple(schema)}")
    unknown = set(raw) - set(schema)
    if unknown:
        raise UnknownKeyError(
            f"{path}: unknown section(s) {sorted(unknown)}; allowed: {', '.join(schema)}"
        )
    return {s: _check_section(s, cls, raw.get(s) or {}, str(path)) for s, cls in schema.items()}


def parse_overrides(
    overrides: Sequence[str], schema: Mapping[str, type] = HITTER_SCHEMA
) -> dict[str, dict[str, Any]]:
    """``["model.hidden_size=256", "train.lr=5e-3"]`` -> typed values per section."""
    out: dict[str, dict[str, Any]] = {s: {} for s in schema}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if section not in schema:
            raise UnknownKeyError(
                f"override {item!r}: unknown section '{section}'; use {', '.join(schema)}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not a YAML scalar: the type check decides
        out[section].update(
            _check_section(section, schema[section], {name: value}, "override", {name: text})
        )
    return out


def load_sections(
    schema: Mapping[str, type],
    preset_or_path: str | Path | None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Defaults <- preset or YAML file (None: defaults only) <- ``section.key=value``
    overrides; returns ``{section: config instance}`` in the order of ``schema``.

    Raises :class:`UnknownKeyError` (a ``KeyError``) for an unknown section or key,
    :class:`ConfigError` for a wrong value (naming the field), ``FileNotFoundError`` for a
    missing preset or file."""
    values = {s: {} for s in schema}
    if preset_or_path is not None:
        values = read_yaml(resolve_preset(preset_or_path), schema)
    for section, items in parse_overrides(overrides, schema).items():
        values[section].update(items)
    configs = {}
    for section, cls in schema.items():
        try:
            configs[section] = cls(**values[section])
        except (StrictDataclassError, ValueError, TypeError) as e:
            cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
            message = " ".join(str(cause).split())  # one line
            raise ConfigError(f"invalid '{section}' config: {message}") from e
    return configs


def sections_to_dict(configs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every settable field of every section, as plain YAML/JSON-able values."""
    return {section: {name: getattr(cfg, name) for name in settable_fields(type(cfg))}
            for section, cfg in configs.items()}


def save_sections(path: str | Path, configs: Mapping[str, Any]) -> None:
    """Write the resolved configuration as YAML (readable back by :func:`load_sections`)."""
    text = yaml.safe_dump(sections_to_dict(configs), sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")


LOCATIONS = ("output_dir", "data_dir", "cache_dir")  # may differ between a run and its resume


def check_same_config(saved: str | Path, configs: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming every setting in which ``configs`` (the resolved
    sections) differs from the run config saved at ``saved`` (:func:`save_sections`), the
    locations :data:`LOCATIONS` aside: a resumed run must continue the run it resumes."""
    now = yaml.safe_load(yaml.safe_dump(sections_to_dict(configs), sort_keys=False))
    before = yaml.safe_load(Path(saved).read_text(encoding="utf-8")) or {}
    changed = [f"{section}.{key}: {before.get(section, {}).get(key)!r} saved, {value!r} now"
               for section, values in now.items() for key, value in values.items()
               if before.get(section, {}).get(key) != value and key not in LOCATIONS]
    if changed:
        raise ConfigError(
            f"--resume: {saved} differs from this configuration ({'; '.join(changed)}); "
            f"resume with the saved settings (--preset {saved}) or pass --overwrite")


def load_config(
    preset_or_path: str | Path | None = DEFAULT_PRESET, overrides: Sequence[str] = ()
) -> tuple[HittERConfig, TrainConfig]:
    """HittER's two sections (:func:`load_sections` with ``model`` and ``train``)."""
    configs = load_sections(HITTER_SCHEMA, preset_or_path, overrides)
    return configs["model"], configs["train"]


def save_config(path: str | Path, model_config: HittERConfig, train_config: TrainConfig) -> None:
    """:func:`save_sections` of HittER's two sections."""
    save_sections(path, {"model": model_config, "train": train_config})
