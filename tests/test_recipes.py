"""The recipes as processes: --help never starts work, a busy default port does not stop a run,
and stopping a recipe stops its training workers."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("recipe", ["end_to_end.sh", "pretrain_kg.sh", "finetune_qa.sh",
                                    "kg_gain.sh"])
def test_help_starts_nothing(recipe):
    result = subprocess.run(["bash", f"recipes/{recipe}", "--help"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and recipe in result.stdout


def test_pretrain_runs_while_the_default_port_is_taken(tmp_path):
    """A second job on the machine holds the launcher's default port 29500 (before: EADDRINUSE
    after 1.5 minutes); the recipe picks a free one."""
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    lines = [f"e{h}\tr{h % 2}\te{(h * 7 + 3) % 12}\n" for h in range(12) if (h * 7 + 3) % 12 != h]
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("".join(lines))
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pytest.skip("port 29500 is in use here already")
        busy.listen()
        result = subprocess.run(
            ["bash", "recipes/pretrain_kg.sh", "--preset", "cpu-small", "--data-dir",
             str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "model.dataset=tiny",
             "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
             "train.batch_size=4", "train.max_steps=2"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "test_metrics.txt").is_file()


def workers(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "-m kgqa.train" in line]


@pytest.mark.realdata
def test_stopping_the_recipe_stops_its_workers(tmp_path, data_root):
    """SIGTERM to finetune_qa.sh while its worker trains: no worker is left running (before:
    the worker ran on to the end, an orphan)."""
    out = tmp_path / "runs"
    recipe = subprocess.Popen(
        ["bash", "recipes/finetune_qa.sh", "--preset", "qa-webqsp-minilm-cpu", "--kg-checkpoint",
         "none", "--out", str(out), "--", "train.max_train_examples=16", "train.epochs=500",
         f"train.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env={**ENV, "KGQA_DATA_DIR": str(data_root)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not workers(str(out)) and time.time() < deadline:
            time.sleep(1)
        assert workers(str(out)), "the worker never started"
        time.sleep(3)
        recipe.send_signal(signal.SIGTERM)
        recipe.wait(timeout=30)
        deadline = time.time() + 20
        while workers(str(out)) and time.time() < deadline:
            time.sleep(1)
        assert not workers(str(out))
    finally:  # whatever happened, leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(recipe.pid, signal.SIGKILL)
