"""Broken checkpoints and language-model names end in one line naming the path and what to do
(never a Hub look-up for a local path); KG and QA files are covered in test_data.py and
test_qa_data.py, damaged training checkpoints in test_train.py."""

import pytest

from hitter_core.checkpoint import CorruptCheckpoint, load_hitter
from hitter_core.cli import run_cli
from hitter_core.config import HittERConfig
from hitter_core.evaluate import main as evaluate_main
from hitter_core.model import HittER
from kgqa.lm import resolve_lm


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "hitter"
    HittER(HittERConfig(num_entities=10, num_relations=2, hidden_size=16, num_attention_heads=2,
                        intermediate_size=32, num_context_layers=1)).save_pretrained(path)
    return path


def test_hitter_checkpoint_without_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="hitter: not a HittER checkpoint directory"):
        load_hitter(checkpoint)


def test_truncated_hitter_weights(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpoint, match="hitter: unreadable HittER checkpoint"):
        load_hitter(checkpoint)
    assert load_hitter(checkpoint, weights=False).config.num_entities == 10  # shape only


def test_evaluate_command_one_line(tmp_path, capsys):
    assert run_cli(evaluate_main, [str(tmp_path / "missing"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing'}: not a HittER checkpoint directory (no " \
                  f"config.json)"


@pytest.mark.parametrize("name, words", [
    ("./no/such/lm", "model.lm=./no/such/lm: no such directory"),
    ("runs/x/best", "model.lm=runs/x/best: no such directory"),
    ("not-cached-model", "not in the local Hugging Face cache and the Hub is offline"),
])
def test_language_model_names(monkeypatch, name, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=words.replace(".", r"\.")):
        resolve_lm(name)
