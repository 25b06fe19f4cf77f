"""Run configuration (hitter_core/config.py): presets, overrides, errors, save/restore."""

import argparse
import dataclasses
from typing import Literal

import pytest
import torch
import yaml

from hitter_core.cli import add_config_arguments, run_cli
from hitter_core.config import HITTER_SCHEMA, HittERConfig, load_config, save_config
from hitter_core.model import HittER
from hitter_core.sections import (
    PRESET_DIR,
    RUN_CONFIG_NAME,
    ConfigError,
    check_same_config,
    load_sections,
    save_sections,
    sections_to_dict,
)
from kgqa.config import QA_SCHEMA

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))  # every preset, QA ones too


def test_defaults_are_the_paper_fb15k237_run():
    model, train = load_config(None)
    assert (model.hidden_size, model.num_attention_heads, model.intermediate_size) == (
        320, 8, 1280)
    assert (model.num_entity_layers, model.num_context_layers, model.max_neighbours) == (3, 6, 50)
    assert (model.output_dropout, model.mep_self_dropout, model.mep_aux_loss) == (0.6, 0.5, False)
    assert (train.batch_size, train.lr, train.adam_eps, train.weight_decay) == (
        512, 0.01, 1e-6, 0.01)
    assert (train.max_epochs, train.validate_every, train.patience) == (300, 5, 10)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_hold_only_differences(name):
    """Every key of a preset differs from what it overrides: the defaults, or its base's
    resolved values (``base: PRESET``)."""
    schema = QA_SCHEMA if name.startswith("qa-") else HITTER_SCHEMA
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}
    reference = load_sections(schema, raw.pop("base", None))
    for section, items in raw.items():
        for key, value in items.items():
            assert getattr(reference[section], key) != value, f"{name}: {section}.{key} repeated"
    load_sections(schema, name)  # and it loads


def test_a_preset_inherits_its_base(tmp_path):
    long, base = load_config("cpu-long"), load_config("cpu-base")
    assert long[1].max_epochs == 14 and base[1].max_epochs == 8
    assert dataclasses.replace(long[1], max_epochs=8, output_dir=base[1].output_dir) == base[1]
    assert long[0] == base[0]
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "a.yaml")


def test_a_run_saved_before_model_reader_resumes_with_its_reader(tmp_path):
    """A QA run_config.yaml with the old flags (adapter, link_head, ...) reads as its reader,
    and --resume compares it as such; on the command line the old flags are unknown keys."""
    saved = tmp_path / RUN_CONFIG_NAME
    saved.write_text(yaml.safe_dump({"model": {"lm": "minilm", "kg_checkpoint": "h/best",
                                               "adapter": "none", "link_head": True,
                                               "link_confidence": False, "kg_text_length": 0},
                                     "train": {"seed": 7}}))
    assert load_sections(QA_SCHEMA, saved)["model"].reader == "link"
    same = load_sections(QA_SCHEMA, None, ["model.lm=minilm", "model.kg_checkpoint=h/best",
                                           "model.reader=link", "train.seed=7"])
    check_same_config(saved, same)
    other = load_sections(QA_SCHEMA, None, ["model.lm=minilm", "model.kg_checkpoint=h/best",
                                            "train.seed=7"])  # the default reader, paper
    with pytest.raises(ConfigError, match="model.reader: 'link' saved, 'paper' now"):
        check_same_config(saved, other)
    with pytest.raises(KeyError, match="model.link_head': replaced by model.reader"):
        load_sections(QA_SCHEMA, None, ["model.link_head=true"])


def test_a_renamed_setting_reads_under_its_new_name_in_saved_runs(tmp_path):
    """train.lr_adapters (before 2026-12-07) is train.lr_new: a saved run_config.yaml with the
    old name loads and resumes; on the command line the old name is one line naming the new."""
    saved = tmp_path / RUN_CONFIG_NAME
    saved.write_text(yaml.safe_dump({"model": {"lm": "minilm", "reader": "none"},
                                     "train": {"lr_adapters": 5.0e-4}}))
    assert load_sections(QA_SCHEMA, saved)["train"].lr_new == 5.0e-4
    check_same_config(saved, load_sections(QA_SCHEMA, None, [
        "model.lm=minilm", "model.reader=none", "train.lr_new=5e-4"]))
    with pytest.raises(KeyError, match="train.lr_adapters': renamed train.lr_new"):
        load_sections(QA_SCHEMA, None, ["train.lr_adapters=1e-3"])


def test_wn18rr_preset_values():
    model, train = load_config("wn18rr")
    assert (model.dataset, model.num_entities, model.num_relations) == ("wn18rr", 40943, 11)
    assert (model.max_neighbours, model.neighbour_drop, model.label_smoothing) == (12, 0.5, 0.1)
    assert (model.mep_self_dropout, model.mep_mask_prob, model.mep_replace_prob) == (0.8, 0.6, 0.3)
    assert model.mep_aux_loss and model.mep_loss_weight == pytest.approx(0.8 / 1.8)
    assert (train.lr, train.max_epochs) == (0.008, 500)
    assert model.hidden_size == 320  # untouched defaults stay


def test_cpu_small_preset_builds_a_working_model():
    sizes = ["model.num_entities=30", "model.num_relations=4"]
    model_config, _ = load_config("cpu-small", sizes)
    assert model_config.hidden_size < 320 and model_config.num_context_layers < 6
    model = HittER(model_config).eval()
    scores = model(torch.tensor([0, 1]), torch.tensor([0, 7])).scores
    assert scores.shape == (2, 30)


def test_overrides_apply_with_types():
    model, train = load_config(
        "wn18rr",
        ["model.hidden_size=64", "model.num_attention_heads=4", "train.lr=1",
         "train.max_steps=5", "model.use_context=false", "train.data_dir=/tmp/x",
         "model.hidden_size=128"],
    )
    assert model.hidden_size == 128  # the last override wins
    assert model.use_context is False and model.max_neighbours == 12  # preset kept
    assert train.lr == 1.0 and isinstance(train.lr, float)
    assert train.max_steps == 5 and train.data_dir == "/tmp/x"
    _, train = load_config("fb15k-237", ["train.max_steps=null"])
    assert train.max_steps is None
    # PyYAML (YAML 1.1) reads "5e-3" as a string; a float field takes it as the number.
    _, train = load_config("fb15k-237", ["train.lr=5e-3"])
    assert train.lr == 0.005


@pytest.mark.parametrize(
    "override, error, words",
    [
        ("train.lrr=0.1", KeyError, "did you mean train.lr"),
        ("model.heads=4", KeyError, "unknown key 'model.heads'"),
        ("optim.lr=0.1", KeyError, "unknown section"),
        ("train.lr", ValueError, "section.key=value"),
        ("lr=0.1", ValueError, "section.key=value"),
        ("model.hidden_size=abc", Exception, "hidden_size"),
        ("model.use_context=3", Exception, "use_context"),
        ("train.batch_size=0", Exception, "batch_size"),
        ("model.hidden_size=100", Exception, "num_attention_heads"),
        ("model.output_dropout=1.5", Exception, "output_dropout"),
        ("train.patience=-1", Exception, "train.patience must be >= 0 (0 = never stop)"),
        ("train.max_steps=0", Exception, "train.max_steps must be >= 1 or null"),
        ("train.max_steps=-5", Exception, "train.max_steps must be >= 1 or null"),
    ],
)
def test_bad_overrides_fail_clearly(override, error, words):
    with pytest.raises(error) as info:
        load_config("fb15k-237", [override])
    assert words in str(info.value)


def test_unknown_key_or_section_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(KeyError, match="hidden_size"):
        load_config(bad)
    bad.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(KeyError, match="unknown section"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="wn18rr"):
        load_config("no-such-preset")


def test_save_and_restore_resolved_config(tmp_path):
    model, train = load_config("wn18rr", ["train.seed=7", "model.hidden_size=64"])
    path = tmp_path / RUN_CONFIG_NAME
    save_config(path, model, train)
    saved = yaml.safe_load(path.read_text())
    assert saved["train"]["seed"] == 7 and saved["model"]["hidden_size"] == 64
    assert "max_neighbours" in saved["model"] and "id2label" not in saved["model"]
    model2, train2 = load_config(path)
    assert train2 == train
    assert sections_to_dict({"model": model2, "train": train2}) == sections_to_dict(
        {"model": model, "train": train})
    assert dataclasses.asdict(train2)["seed"] == 7


# ---------------------------------------------------------------- other sections (kgqa's use)


@dataclasses.dataclass
class _Plain:
    """A plain dataclass section, as kgqa's, with its own validation."""

    name: str = "a"
    rate: float = 0.5
    count: int | None = None
    mode: Literal["x", "y"] = "x"

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


def test_load_sections_with_plain_dataclasses(tmp_path):
    schema = {"model": HittERConfig, "qa": _Plain}
    preset = tmp_path / "p.yaml"
    preset.write_text("qa:\n  rate: 1\n  mode: y\n")
    configs = load_sections(schema, preset, ["qa.name=2024", "qa.count=3", "model.hidden_size=64"])
    qa = configs["qa"]
    assert (qa.name, qa.rate, qa.count, qa.mode) == ("2024", 1.0, 3, "y")
    assert isinstance(qa.rate, float) and configs["model"].hidden_size == 64
    save_sections(tmp_path / RUN_CONFIG_NAME, configs)
    assert load_sections(schema, tmp_path / RUN_CONFIG_NAME) == configs
    for override, words in [("qa.rat=0.1", "did you mean qa.rate"), ("qa.mode=z", "qa.mode"),
                            ("qa.count=x", "qa.count"), ("qa.rate=2", "rate must be in")]:
        with pytest.raises(ValueError, match=words):
            load_sections(schema, None, [override])


def _main(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, default_preset="cpu-small")
    args = parser.parse_intermixed_args(argv)
    return load_config(args.preset, args.overrides)


def test_cli_mistake_is_one_line(capsys):
    assert run_cli(_main, ["train.lr=0.5", "--preset", "wn18rr"]) == 0
    assert run_cli(_main, ["train.lrr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err == "error: override: unknown key 'train.lrr'; did you mean train.lr?\n"
    assert run_cli(_main, ["--preset", "no-such"]) == 2
    assert capsys.readouterr().err.startswith("error: no preset 'no-such' (available: ")
