"""Run configuration for link-prediction training (paper section 3.3; REFERENCE.md table).

Two dataclasses hold every hyper-parameter once: :class:`~hitter_core.model.HittERConfig`
(architecture, dropout, MEP, label smoothing, neighbourhood sizes: everything the model or
its data pipeline reads) and :class:`TrainConfig` (optimisation, schedule, validation, paths).
Both defaults are the paper's FB15K-237 run. A preset (``recipes/configs/<name>.yaml``) holds
only the differences of another run, under two sections::

    model:
      max_neighbours: 12
    train:
      lr: 0.008

Command-line overrides use the same dotted names (``model.hidden_size=256``, ``train.lr=5e-3``);
values are parsed as YAML scalars and type-checked, and an unknown key is an error. The
resolved configuration is saved with every run (:func:`save_config`) and loads back with
:func:`load_config` like any preset.
"""

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.dataclasses import strict

from hitter_core.model import HittERConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SECTIONS = ("model", "train")


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
    patience: int = 10  # validations without improvement before stopping
    log_every: int = 100  # steps
    save_every: int = 200  # steps between "last" checkpoints (also after each validation)
    device: str = "auto"  # "auto": cuda when available, else cpu
    # CPU: glibc keeps freed memory for reuse instead of unmapping it (hitter_core.cpu_memory;
    # faster steps and evaluation, more peak memory: see its docstring).
    keep_freed_memory: bool = True

    def validate_values(self) -> None:
        positive = ("batch_size", "eval_batch_size", "max_epochs", "validate_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every < 0:
            raise ValueError(f"train.save_every must be >= 0, got {self.save_every}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


def _field_types(section: str) -> dict[str, Any]:
    """Field name -> declared type of a section (the model section: HittER's own fields)."""
    if section == "train":
        return {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    own = HittERConfig.__annotations__
    return {f.name: f.type for f in dataclasses.fields(HittERConfig) if f.name in own}


def _coerce(value: Any, expected: Any) -> Any:
    """YAML gives ``1`` for a float field and ``null`` for None; widen int to float only. The
    dataclasses themselves (``@strict``) reject everything else with the field's name."""
    accepts_float = expected is float or float in getattr(expected, "__args__", ())
    if accepts_float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_section(section: str, values: dict[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    types = _field_types(section)
    aliases = HittERConfig.attribute_map if section == "model" else {}
    checked = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in types:
            close = difflib.get_close_matches(name, types, n=3)
            hint = f"; did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else ""
            raise KeyError(f"{source}: unknown key '{section}.{key}'{hint}")
        checked[name] = _coerce(value, types[name])
    return checked


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


def read_yaml(path: Path) -> dict[str, dict[str, Any]]:
    """A config YAML as ``{"model": {...}, "train": {...}}`` (missing sections empty)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with sections {SECTIONS}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise KeyError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: {SECTIONS}")
    return {s: _check_section(s, raw.get(s) or {}, str(path)) for s in SECTIONS}


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["model.hidden_size=256", "train.lr=5e-3"]`` -> per-section typed values."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        if section not in SECTIONS:
            raise KeyError(f"override {item!r}: unknown section '{section}'; use {SECTIONS}")
        value = yaml.safe_load(text) if text.strip() else None
        out[section].update(_check_section(section, {name: value}, "override"))
    return out


def load_config(
    preset_or_path: str | Path | None = "fb15k-237", overrides: Sequence[str] = ()
) -> tuple[HittERConfig, TrainConfig]:
    """Defaults <- preset or YAML file (None: defaults only) <- ``overrides``.

    Raises ``KeyError`` for an unknown key and a type/validation error (naming the field) for
    a wrong value.
    """
    values = {s: {} for s in SECTIONS}
    if preset_or_path is not None:
        values = read_yaml(resolve_preset(preset_or_path))
    for section, items in parse_overrides(overrides).items():
        values[section].update(items)
    return HittERConfig(**values["model"]), TrainConfig(**values["train"])


def config_to_dict(model_config: HittERConfig, train_config: TrainConfig) -> dict[str, Any]:
    """Every HittER field and every training field, as plain YAML/JSON-able values."""
    model = {name: getattr(model_config, name) for name in _field_types("model")}
    return {"model": model, "train": dataclasses.asdict(train_config)}


def save_config(path: str | Path, model_config: HittERConfig, train_config: TrainConfig) -> None:
    """Write the resolved configuration as YAML (readable back by :func:`load_config`)."""
    text = yaml.safe_dump(config_to_dict(model_config, train_config), sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")
