"""Broken checkpoints and language-model names end in one line naming the path and what to do
(never a Hub look-up for a local path); KG and QA files are covered in test_data.py and
test_qa_data.py, damaged training checkpoints in test_train.py."""

import re
import subprocess
import sys

import pytest

from hitter_core.checkpoint import CorruptCheckpoint, load_hitter
from hitter_core.cli import run_cli
from hitter_core.config import HittERConfig
from hitter_core.evaluate import main as evaluate_main
from hitter_core.model import HittER
from hitter_core.run_dir import remove_temporaries
from kgqa.lm import resolve_lm
from kgqa.train import main as qa_train_main


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
    ("not-cached-model", "not in the local Hugging Face cache and the Hub is offline "
                         "(HF_HUB_OFFLINE=1); use model.lm=minilm (offline) or a local directory"),
    ("bert-base-uncased", "use model.lm=minilm"),  # the users' default, offline
])
def test_language_model_names(monkeypatch, name, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if name == "bert-base-uncased":
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            pytest.skip("bert-base-uncased is in this machine's Hugging Face cache")
    with pytest.raises(FileNotFoundError, match=re.escape(words)):
        resolve_lm(name)


def test_temporaries_a_crash_left_are_removed(tmp_path):
    """A kill while a checkpoint was written leaves .last.tmp-* / .best.tmp-*; the next start
    (either stage: RunDir.claim, remove_temporaries) removes them and keeps the run's
    checkpoints."""
    for name in (".last.tmp-123", ".best.tmp-456", "last", "best"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    assert sorted(remove_temporaries(tmp_path)) == [".best.tmp-456", ".last.tmp-123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "best", "last"]


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path):
    """Two runs on one output directory (a recipe started twice) would write over each other's
    checkpoints and log: the second stops with a one-line error while the first lives, and
    the directory is free again once the first process is gone (killed, here)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hitter_core.run_dir import "
         "lock_run_dir; lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="another run is writing to this directory"):
            remove_temporaries(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert remove_temporaries(tmp_path) == []  # released by the kill


@pytest.mark.parametrize("override, line", [
    ("train.patiense=3", "error: override: unknown key 'train.patiense'; did you mean "
                         "train.patience?"),
    ("train.patience=-1", "train.patience must be >= 0 (0 = never stop), got -1"),
    ("model.lm=./no/such/lm", "error: model.lm=./no/such/lm: no such directory"),
    ("model.reader=link", "error: model.reader=link reads HittER: set model.kg_checkpoint"),
    ("model.reader=paper+text", "model.reader 'paper+text': a combination is one adapter"),
])
def test_qa_training_mistakes_are_one_line(tmp_path, capsys, override, line):
    status = run_cli(qa_train_main, ["--preset", "qa-webqsp-minilm-cpu", "--output-dir",
                                     str(tmp_path / "run"), "model.reader=none", override])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and line in err
