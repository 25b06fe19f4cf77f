"""Nothing lost on a crash: real SIGKILLs of training processes (``hitter_core.runtime``) at six
points a stage (mid-step, a checkpoint complete but not swapped in, between the two renames
of the swap, mid-validation or mid-prediction, mid-test, a metrics line half written), then
``--resume``. Each resumed run ends with the uninterrupted run's weights bit for bit (CPU, one
thread; the measured run-to-run difference of two uninterrupted runs is zero), the same test
figures, no temporary directory, and metrics files whose every line parses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hitter_core.model import HittER
from hitter_core.runtime import CRASH_ENV as ENV

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.num_entity_layers=1", "model.num_context_layers=1", "model.max_neighbours=8"]


def run(cmd: list[str], crash: str | None = None, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(ENV, None)
    if crash:
        env[ENV] = crash
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights: ``best/model.safetensors``, or the engine checkpoint in
    ``last`` (DeepSpeed's file of process 0)."""
    if path.name == "last":
        return torch.load(path / "state" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    return load_file(path)


def assert_same_run(out: Path, reference: Path, saved: tuple[str, ...], test_file: str,
                    test_key: str) -> None:
    for name in saved:
        a, b = weights(out / name), weights(reference / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    test, expected = (json.loads((d / test_file).read_text())[test_key] for d in (out, reference))
    assert test == expected
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


# ---------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    data = root / "data" / "tiny"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    heads, tails = torch.randint(0, 16, (2, 200), generator=g)
    relations = torch.randint(0, 3, (200,), generator=g)
    triples = sorted({(h, r, t) for h, r, t in zip(heads.tolist(), relations.tolist(),
                                                   tails.tolist(), strict=True) if h != t})
    triples = [triples[i] for i in torch.randperm(len(triples), generator=g).tolist()]
    lines = [f"e{h}\tr{r}\te{t}\n" for h, r, t in triples]
    (data / "train.txt").write_text("".join(lines[:40]))
    (data / "valid.txt").write_text("".join(lines[40:46]))
    (data / "test.txt").write_text("".join(lines[46:52]))

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "hitter_core.train", "--preset", "cpu-small",
                "--data-dir", str(root / "data"), "--output-dir", str(out), "--resume", *TINY,
                "model.dataset=tiny", "train.batch_size=8", "train.max_epochs=3",
                "train.validate_every=1", "train.save_every=4", "train.log_every=1"]

    reference = root / "reference"
    for out in (reference, root / "again"):
        result = run(cmd(out))
        assert result.returncode == 0, result.stderr[-3000:]
    # The run-to-run noise the comparisons below allow: two uninterrupted runs are identical.
    assert_same_run(root / "again", reference, ("last",), "test_metrics.json",
                    "both")
    return root, cmd, reference


# 5 steps an epoch, 15 in all; last/ at steps 4, 5, 8, 10, 12, 15 and best/ at validations
# (steps 5, 10, 15); ranking: valid after each epoch (calls 1-3), then test (call 4).
@pytest.mark.parametrize("crash", ["train-step:7", "checkpoint-write:3", "checkpoint-swap:2",
                                   "evaluate:2", "evaluate:4", "metrics-log:9"])
def test_stage1_killed_and_resumed(stage1, crash):
    root, cmd, reference = stage1
    out = root / crash.replace(":", "-")
    killed = run(cmd(out), crash)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(cmd(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference, ("last", "best/model.safetensors"),
                    "test_metrics.json", "both")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x)["step"] for x in
                (reference / "metrics.jsonl").read_text().splitlines()]
    assert steps == expected  # every record once, none lost


# ---------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, data_root, fb15k237, tiny_lm):
    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    from hitter_core.config import HittERConfig

    HittER(HittERConfig(num_entities=fb15k237.num_entities,
                        num_relations=fb15k237.num_relations, hidden_size=32,
                        num_attention_heads=2, intermediate_size=64, num_entity_layers=1,
                        num_context_layers=1)).save_pretrained(root / "hitter")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "kgqa.train", "--preset", "qa-webqsp-minilm-cpu",
                "--data-dir", str(data_root), "--output-dir", str(out), "--resume",
                f"model.kg_checkpoint={root / 'hitter'}", "model.freeze_kg=false",
                "train.epochs=3", "train.batch_size=8", "train.max_train_examples=16",
                "train.max_eval_examples=8", f"train.cache_dir={root / 'cache'}",
                "train.seed=7", f"model.lm={tiny_lm}"]

    reference = root / "reference"
    result = run(cmd(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, cmd, reference


# 2 steps an epoch; writes: best/ (epochs that improve on dev) and last/ after every epoch;
# prediction: dev after each epoch (calls 1-3), then test (call 4).
@pytest.mark.realdata
@pytest.mark.parametrize("crash", ["train-step:4", "checkpoint-write:2", "checkpoint-swap:1",
                                   "predict:2", "predict:4", "metrics-log:2"])
def test_stage2_killed_and_resumed(stage2, crash):
    root, cmd, reference = stage2
    out = root / crash.replace(":", "-")
    killed = run(cmd(out), crash)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(cmd(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference, ("best/model.safetensors",), "metrics.json", "test")
    epochs = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
