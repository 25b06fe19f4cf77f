"""The recipes as processes: --help never starts work, stopping a recipe stops its training
workers, a finished seed is skipped and an interrupted one resumed. (A busy default port:
tests/test_train.py, the two-process run.)"""

import contextlib
import json
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


def tiny_pretraining(tmp_path: Path, steps: int | None = None) -> list[str]:
    """pretrain_kg.sh on a 12-entity graph and a tiny HittER, ``steps`` steps (None: for
    ever)."""
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    lines = [f"e{h}\tr{h % 2}\te{(h * 7 + 3) % 12}\n" for h in range(12) if (h * 7 + 3) % 12 != h]
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("".join(lines))
    return ["bash", "recipes/pretrain_kg.sh", "--preset", "cpu-small", "--data-dir",
            str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "model.dataset=tiny",
            "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
            "train.batch_size=4"] + ([f"train.max_steps={steps}"] if steps else
                                     ["train.max_epochs=1000000", "train.patience=0"])


def workers(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line
            and ("-m kgqa.train" in line or "-m hitter_core.train" in line)]


def qa_forever(tmp_path: Path, lm: str) -> list[str]:
    return ["bash", "recipes/finetune_qa.sh", "--preset", "qa-webqsp-minilm-cpu",
            "--kg-checkpoint", "none", "--out", str(tmp_path / "run"), "--",
            "train.max_train_examples=16", "train.epochs=500", f"model.lm={lm}",
            f"train.cache_dir={tmp_path / 'cache'}"]


def kg_gain_forever(tmp_path: Path, lm: str) -> list[str]:
    return ["bash", "recipes/kg_gain.sh", "--rows", "lm", "--seeds", "2", "--out",
            str(tmp_path / "run"), "--", "train.max_train_examples=16", "train.epochs=500",
            f"model.lm={lm}", f"train.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.realdata
@pytest.mark.parametrize("recipe, sig", [
    ("finetune_qa.sh", signal.SIGTERM),  # a trap stops the workers
    ("finetune_qa.sh", signal.SIGKILL),  # no trap runs: the workers see the recipe gone
    ("pretrain_kg.sh", signal.SIGKILL),  # the recipe became the launcher (exec)
    ("kg_gain.sh", signal.SIGTERM),
    ("kg_gain.sh", signal.SIGKILL),  # xargs would start the next run: it stops at once too
])
def test_stopping_the_recipe_stops_its_workers(tmp_path, data_root, tiny_lm, recipe, sig):
    """SIGTERM or SIGKILL to the recipe while its worker trains: no worker is left running
    (before: the worker ran on to the end, an orphan that a --resume would collide with)."""
    command = (tiny_pretraining(tmp_path) if recipe == "pretrain_kg.sh" else
               {"finetune_qa.sh": qa_forever, "kg_gain.sh": kg_gain_forever}[recipe](
                   tmp_path, tiny_lm))
    marker = str(tmp_path / "run")
    recipe = subprocess.Popen(
        command, cwd=REPO, env={**ENV, "KGQA_DATA_DIR": str(data_root)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Training is under way once a metrics line is written (not killed mid-build of
        # DeepSpeed's op, which would leave its lock behind for the next run).
        deadline = time.time() + 300
        while not list((tmp_path / "run").rglob("metrics.jsonl")) and time.time() < deadline:
            time.sleep(1)
        assert workers(marker), "no worker is training"
        recipe.send_signal(sig)
        recipe.wait(timeout=30)
        deadline = time.time() + 60  # a loaded machine (CI beside trainings) takes > 20 s
        while workers(marker) and time.time() < deadline:
            time.sleep(1)
        assert not workers(marker)
    finally:  # whatever happened, leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(recipe.pid, signal.SIGKILL)


def test_a_process_stops_when_its_recipe_is_gone():
    """stop_with_recipe: the watched process killed (SIGKILL, nothing runs in it) -> SIGTERM
    within seconds; an entry for another host is not watched."""
    recipe = subprocess.Popen(["sleep", "600"])
    env = {**ENV, "HITTER_RECIPE_PIDS": f"{recipe.pid}@{socket.gethostname()},1@elsewhere"}
    code = ("import time; from hitter_core.runtime import stop_with_recipe; "
            "stop_with_recipe(interval=0.1); print('watching', flush=True); time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == "watching\n"
        time.sleep(0.5)
        assert worker.poll() is None  # still running while the recipe is
        recipe.kill()
        recipe.wait()
        assert worker.wait(timeout=10) == -signal.SIGTERM
        assert "the recipe that started this process is gone" in worker.stderr.read()
    finally:
        for p in (recipe, worker):
            with contextlib.suppress(ProcessLookupError):
                p.kill()


@pytest.mark.realdata
def test_finetune_skips_finished_seeds_and_resumes_an_interrupted_one(tmp_path, data_root,
                                                                      tiny_lm):
    """finetune_qa.sh --seeds 2 after seed 333 finished and seed 334 was killed (SIGKILL in its
    second epoch): 333 is not retrained, 334 continues from its last/ to the end."""
    out = tmp_path / "run"

    def recipe(seeds: int, crash: str | None = None) -> subprocess.CompletedProcess:
        env = {**ENV, "KGQA_DATA_DIR": str(data_root)} | ({"HITTER_CRASH_AT": crash} if crash
                                                          else {})
        return subprocess.run(
            ["bash", "recipes/finetune_qa.sh", "--preset", "qa-webqsp-minilm-cpu",
             "--kg-checkpoint", "none", "--seeds", str(seeds), "--out", str(out), "--",
             "train.max_train_examples=16", "train.max_eval_examples=8", "train.epochs=3",
             f"model.lm={tiny_lm}", f"train.cache_dir={tmp_path / 'cache'}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    assert recipe(1).returncode == 0
    finished = (out / "seed333" / "metrics.json").stat().st_mtime_ns
    crashed = recipe(2, crash="train-step:2")  # 1 step per epoch: killed in epoch 2
    assert crashed.returncode != 0 and not (out / "seed334" / "metrics.json").exists()
    again = recipe(2)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "the run finished already; nothing to resume" in log
    assert "after epoch 1" in log  # "resumed from .../seed334/last after epoch 1"
    assert (out / "seed333" / "metrics.json").stat().st_mtime_ns == finished
    history = json.loads((out / "seed334" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
