"""The configuration system both stages share: a run's configuration is a set of named
*sections*, each an instance of a config class (a plain dataclass or a ``@strict``
``PreTrainedConfig``): ``hitter_core.config`` defines HittER's two, ``kgqa.config`` the QA
stage's. Values resolve as defaults <- preset <- overrides:

* a preset ``recipes/configs/<name>.yaml`` (or any YAML path) holds only the differences,
  section by section (``train: {lr: 0.008}``), from the defaults or from the preset it names as
  its ``base``;
* overrides use the same dotted names, ``model.hidden_size=256 train.lr=5e-3``, parsed as YAML
  scalars and type-checked. An unknown key is an error with a "did you mean"; a wrong value is
  an error naming the field.

The resolved configuration is saved with every run as :data:`RUN_CONFIG_NAME`
(:func:`save_sections`), loads back as a preset, and a resumed run must match it
(:func:`check_same_config`). The command line of both stages (kebab-case flags plus positional
overrides, one-line errors) is :mod:`hitter_core.cli`.
"""

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
RUN_CONFIG_NAME = "run_config.yaml"  # the resolved config saved in every run directory


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
    section: str, cls: type, values: Any, source: str, texts: Mapping[str, str] | None = None,
    saved: bool = False,
) -> dict[str, Any]:
    """Known keys with well-typed values, or :class:`ConfigError` naming ``section.key``.
    ``texts``: the raw override strings, used where a str field was read as a number.
    ``saved``: a file written by an older version, whose keys of ``cls.LEGACY_FIELDS`` pass
    through for the class to translate and whose keys of ``cls.RENAMED_FIELDS`` (old -> new
    name) are read under their new names (neither on the command line)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    fields = settable_fields(cls)
    legacy = getattr(cls, "LEGACY_FIELDS", {})  # old key -> what replaced it
    renamed = getattr(cls, "RENAMED_FIELDS", {})  # old key -> its new name
    checked = {}
    for key, value in values.items():
        if key in renamed and not saved:
            raise UnknownKeyError(f"{source}: unknown key '{section}.{key}': renamed "
                                  f"{section}.{renamed[key]}")
        key = renamed.get(key, key)
        if key in legacy and saved:
            checked[key] = value
            continue
        if key in legacy:
            raise UnknownKeyError(f"{source}: unknown key '{section}.{key}': replaced by "
                                  f"{legacy[key]}")
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


def read_yaml(path: Path, schema: Mapping[str, type],
              _seen: tuple[Path, ...] = ()) -> dict[str, dict]:
    """A config YAML as ``{section: {key: value}}`` (every section of ``schema``, missing ones
    empty), keys and types checked. A top-level ``base: PRESET`` reads that preset first and
    lays this file's values over it (a preset holds only what differs from its base)."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {tuple(schema)}")
    base = raw.pop("base", None)
    unknown = set(raw) - set(schema)
    if unknown:
        raise UnknownKeyError(
            f"{path}: unknown section(s) {sorted(unknown)}; allowed: base, {', '.join(schema)}"
        )
    own = {s: _check_section(s, cls, raw.get(s) or {}, str(path), saved=True)
           for s, cls in schema.items()}
    if base is None:
        return own
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name, got {base!r}")
    base_path = resolve_preset(base)
    if base_path.resolve() in _seen:
        raise ConfigError(f"{path}: base {base!r} leads back to itself")
    inherited = read_yaml(base_path, schema, (*_seen, Path(path).resolve()))
    return {s: inherited[s] | own[s] for s in schema}


def parse_overrides(
    overrides: Sequence[str], schema: Mapping[str, type]
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
    locations :data:`LOCATIONS` aside: a resumed run must continue the run it resumes. The
    saved file is read as a config (an older version's: its keys translated, fields it did not
    have at their defaults)."""
    def plain(sections: Mapping[str, Any]) -> dict[str, Any]:
        return yaml.safe_load(yaml.safe_dump(sections_to_dict(sections), sort_keys=False))

    now = plain(configs)
    before = plain(load_sections({s: type(c) for s, c in configs.items()}, saved))
    changed = [f"{section}.{key}: {before.get(section, {}).get(key)!r} saved, {value!r} now"
               for section, values in now.items() for key, value in values.items()
               if before.get(section, {}).get(key) != value and key not in LOCATIONS]
    if changed:
        raise ConfigError(
            f"--resume: {saved} differs from this configuration ({'; '.join(changed)}); "
            f"resume with the saved settings (--preset {saved}) or pass --overwrite")
