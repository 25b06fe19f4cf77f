"""QA fine-tuning (kgqa/train.py): what reaches DeepSpeed (config values, the two learning
rates, weight decay, the warm-up schedule) checked without an engine, one engine smoke test on
a tiny model, the command line, and a short run on real WebQSP questions that writes the run
config, the best checkpoint, the predictions file and the metrics.

The LM is the offline MiniLM (or a tiny random BERT); HittER is tiny and random (width 32)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from hitter_core import precision
from hitter_core.config import HittERConfig
from hitter_core.distributed import init_distributed
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from hitter_core.sections import ConfigError, load_sections
from kgqa import train as qa_train
from kgqa.batches import ClozeCollator, compute_loss
from kgqa.config import QA_SCHEMA, KGQAConfig, QATrainConfig
from kgqa.model import KGEnhancedLM, build_model
from kgqa.train import build_engine, main, optimizer_groups, parse_args

E, R = 30, 4


def tiny_hitter(num_entities: int = E, num_relations: int = R) -> HittER:
    torch.manual_seed(0)
    return HittER(HittERConfig(
        num_entities=num_entities, num_relations=num_relations, hidden_size=32,
        num_attention_heads=4, intermediate_size=64, num_entity_layers=1, num_context_layers=2,
    ))


@pytest.fixture(scope="module")
def neighbours():
    g = torch.Generator().manual_seed(0)
    h, t = torch.randint(E, (100,), generator=g), torch.randint(E, (100,), generator=g)
    return NeighbourIndex.from_triples(torch.stack([h, torch.randint(R, (100,), generator=g), t],
                                                   dim=1), E, R)


@pytest.fixture(scope="module")
def minilm():
    """MiniLM as build_model loads it, with the names of its newly initialised weights."""
    return build_model(KGQAConfig(lm="minilm", reader="none"))


def kg_model(minilm, freeze_kg: bool) -> KGEnhancedLM:
    """MiniLM + tiny HittER + adapters."""
    plain, _ = minilm
    cfg = KGQAConfig(lm="minilm", freeze_kg=freeze_kg)
    lm = BertForMaskedLM(plain.lm.config)
    lm.load_state_dict(plain.lm.state_dict())
    return KGEnhancedLM(cfg, lm, tiny_hitter())


def captured_engine(monkeypatch, model, train, total_steps, fresh=frozenset()):
    """What build_engine hands to DeepSpeed, without building an engine."""
    seen = {}

    def fake(model, optimizer, scheduler, ds_config=None, **kwargs):
        seen.update(model=model, optimizer=optimizer, scheduler=scheduler, kwargs=kwargs)
        return "engine"

    monkeypatch.setattr(qa_train, "initialize_engine", fake)
    assert build_engine(model, train, total_steps, fresh) == "engine"
    return seen


# ---------------------------------------------------------------------- what reaches DeepSpeed


def test_ds_config_values_come_from_the_train_config(monkeypatch, minilm):
    model, fresh = minilm
    train = QATrainConfig(batch_size=8, max_grad_norm=0.5, zero_stage=2, precision="fp32")
    seen = captured_engine(monkeypatch, model, train, 10, fresh)
    assert seen["kwargs"] == {"micro_batch_size": 8, "max_grad_norm": 0.5, "zero_stage": 2,
                              "supported_zero_stages": (0, 1, 2), "bf16_available": False}
    # train.precision reaches DeepSpeed's autocast: auto follows the device's native bf16.
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    train.precision = "auto"
    assert captured_engine(monkeypatch, model, train, 10, fresh)["kwargs"]["bf16_available"]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not captured_engine(monkeypatch, model, train, 10, fresh)["kwargs"]["bf16_available"]
    with pytest.raises(StrictDataclassError, match="zero_stage"):
        QATrainConfig(zero_stage=3)


def test_fresh_lm_weights_are_minilms_mlm_head(minilm):
    model, fresh = minilm
    assert fresh == {
        "lm.cls.predictions.bias", "lm.cls.predictions.transform.dense.weight",
        "lm.cls.predictions.transform.dense.bias",
        "lm.cls.predictions.transform.LayerNorm.weight",
        "lm.cls.predictions.transform.LayerNorm.bias",
    }
    # The decoder weight is tied to the pretrained word embeddings: not fresh.
    assert "lm.cls.predictions.decoder.weight" not in fresh


@pytest.mark.parametrize("freeze_kg", [False, True])
def test_two_learning_rates_and_weight_decay(minilm, freeze_kg):
    _, fresh = minilm
    model = kg_model(minilm, freeze_kg)
    groups = optimizer_groups(model, QATrainConfig(), fresh)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert {g["lr"] for g in groups} == {5e-5, 5e-6}

    adapters = [p for a in model.new_modules() for p in a.parameters()]
    assert adapters and all(lr_of[id(p)] == 5e-5 for p in adapters)
    head = model.lm.cls.predictions.transform.dense.weight  # newly initialised in MiniLM
    assert lr_of[id(head)] == 5e-5
    lm_pretrained = [p for n, p in model.lm.bert.named_parameters() if "adapter" not in n]
    assert all(lr_of[id(p)] == 5e-6 for p in lm_pretrained)
    hitter = list(model.hitter.parameters())
    if freeze_kg:
        assert not any(id(p) in lr_of for p in hitter)
    else:
        assert all(lr_of[id(p)] == 5e-6 for p in hitter)
    # Every trainable parameter is optimised, once.
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable) == sum(len(g["params"]) for g in groups)
    # No weight decay on biases and LayerNorm weights; 0.01 elsewhere.
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                exempt = name == "bias" or isinstance(module, nn.LayerNorm)
                assert decay_of[id(p)] == (0.0 if exempt else 0.01), (module, name)


def test_schedule_warms_up_then_decays(monkeypatch, minilm):
    model, fresh = minilm
    train = QATrainConfig(lr_new=4e-5, lr_pretrained=2e-6)  # configurable
    seen = captured_engine(monkeypatch, model, train, 20, fresh)  # 2 warm-up steps
    optimizer, scheduler = seen["optimizer"], seen["scheduler"]
    lrs = []
    for _ in range(21):
        lrs.append(sorted(g["lr"] for g in optimizer.param_groups)[-1])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(2e-5) and lrs[2] == pytest.approx(4e-5)
    assert lrs[11] == pytest.approx(2e-5) and lrs[20] == 0.0
    assert {g["initial_lr"] for g in optimizer.param_groups} == {4e-5, 2e-6}


# ---------------------------------------------------------------------- one engine


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_engine_smoke(neighbours):
    """A few steps of a tiny KG-enhanced model (BERT width 32, 2 layers) on a DeepSpeed
    engine: the config reaches the engine and the loss goes down."""
    init_distributed("cpu")
    torch.manual_seed(0)
    lm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64))
    model = KGEnhancedLM(KGQAConfig(max_neighbours=4), lm, tiny_hitter())
    engine = build_engine(model, QATrainConfig(batch_size=4, max_grad_norm=0.5,
                                               lr_new=1e-2, lr_pretrained=1e-2,
                                               warmup_ratio=0.0), total_steps=100)
    assert engine.train_micro_batch_size_per_gpu() == 4
    assert engine.gradient_clipping() == 0.5 and not engine.bfloat16_enabled()
    rows = [{"input_ids": [1, 5 + i, 3, 2], "attention_mask": [1] * 4,
             "labels": [-100, -100, 10 + i, -100], "topic_entity": i if i < 3 else -1,
             "relation": 0, "answer_entity": -1, "num_masks": 1} for i in range(4)]
    batch = ClozeCollator(0, neighbours, 4, train=True, seed=0)(rows)
    losses = []
    for _ in range(8):
        loss = compute_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- command line


def test_command_line_flags_and_overrides(tmp_path):
    model, train, args = parse_args([
        "--preset", "qa-webqsp-minilm-cpu", "--output-dir", str(tmp_path), "--ds-config", "x",
        "model.kg_checkpoint=runs/h/best", "train.seed=334", "--data-dir", "/data",
    ])
    assert (model.lm, model.freeze_kg, model.kg_checkpoint) == ("minilm", True, "runs/h/best")
    assert (train.lr_new, train.lr_pretrained, train.epochs) == (5e-4, 5e-5, 6)
    assert (train.seed, train.output_dir, train.data_dir) == (334, str(tmp_path), "/data")
    assert args.ds_config == "x"
    full = load_sections(QA_SCHEMA, "qa-webqsp-full-minilm-cpu")
    assert (full["train"].split, full["train"].epochs) == ("full", 2)
    paper = load_sections(QA_SCHEMA, "qa-paper")
    assert paper["train"].lr_new == QATrainConfig.lr_new  # paper = the defaults
    with pytest.raises(KeyError, match="did you mean train.seed"):
        parse_args(["train.sed=3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_args(["train.epochs=many"])


# ---------------------------------------------------------------------- a short run


@pytest.mark.realdata
def test_short_run_writes_checkpoint_predictions_and_metrics(tmp_path, data_root, fb15k237,
                                                            tiny_lm):
    ckpt = tmp_path / "hitter"
    tiny_hitter(fb15k237.num_entities, fb15k237.num_relations).save_pretrained(ckpt)
    out = tmp_path / "run"
    assert main([
        "--preset", "qa-webqsp-minilm-cpu", "--data-dir", str(data_root),
        "--output-dir", str(out), f"model.kg_checkpoint={ckpt}", "model.freeze_kg=false",
        "train.epochs=2", "train.seed=7", "train.max_train_examples=16",
        "train.max_eval_examples=8", f"train.cache_dir={tmp_path / 'cache'}",
        f"model.lm={tiny_lm}",
    ]) == 0
    assert (out / "best" / "model.safetensors").is_file()
    assert (out / "best" / "tokenizer.json").is_file()  # loads without the original LM
    again = load_sections(QA_SCHEMA, out / "run_config.yaml")  # the resolved config
    assert again["train"].seed == 7 and again["model"].kg_checkpoint == str(ckpt)
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["dataset"], saved["split"], saved["kg"], saved["seed"]) == (
        "webqsp", "filtered", "co-trained", 7)
    assert saved["train_examples"] == 16 and saved["epochs_run"] == 2
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert saved["kg_identity"] == {"checkpoint": str(ckpt), "sha256": digest,
                                    "dataset": "fb15k-237"}  # no metrics beside a bare save
    assert saved["variant"]["reader"] == "paper"
    devs = [h["dev_accuracy"] for h in saved["history"]]
    assert saved["best_epoch"] == 1 + devs.index(max(devs))  # first best on dev
    rows = [json.loads(x) for x in (out / "predictions.test.jsonl").read_text().splitlines()]
    assert len(rows) == saved["test"]["total"] == 8
    assert set(rows[0]) == {"question_id", "question", "answer", "predicted", "correct",
                            "answer_is_neighbour"}
    assert sum(r["correct"] for r in rows) == saved["test"]["correct"]
    assert not list(out.glob(".best.tmp-*"))
    card = (out / "best" / "README.md").read_text()  # the model card, with the test result
    assert card.startswith("---\nlibrary_name: hitter-kgqa")
    assert f"test accuracy {saved['test']['accuracy']:.4f}" in card and "co-trained" in card


@pytest.mark.realdata
def test_resume_after_crash_continues_exactly(tmp_path, data_root, fb15k237, one_thread,
                                              tiny_lm):
    """Run A trains 3 epochs; run B crashes after epoch 1. B's directory is refused without
    --resume, and with a changed setting; resumed, B ends with exactly A's weights, history
    and test result. --overwrite starts afresh."""
    ckpt = tmp_path / "hitter"
    tiny_hitter(fb15k237.num_entities, fb15k237.num_relations).save_pretrained(ckpt)

    def run(out, *more, resume=False, overwrite=False):
        model, train, _ = parse_args([
            "--preset", "qa-webqsp-minilm-cpu", "--data-dir", str(data_root), "--output-dir",
            str(out), f"model.kg_checkpoint={ckpt}", "model.freeze_kg=false", "train.epochs=3",
            "train.max_train_examples=16", "train.max_eval_examples=8", f"model.lm={tiny_lm}",
            f"train.cache_dir={tmp_path / 'cache'}", *more])
        return qa_train.Trainer(model, train, resume=resume, overwrite=overwrite)

    class Crash(Exception):
        pass

    def crash(epoch):
        if epoch == 1:
            raise Crash

    run_a = run(tmp_path / "a")
    run_a.fit()
    a_metrics = run_a.test()
    run_b = run(tmp_path / "b")
    with pytest.raises(Crash):
        run_b.fit(on_epoch=crash)
    assert (tmp_path / "b" / "last").is_dir() and not (tmp_path / "b" / "metrics.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path / "b")
    with pytest.raises(ConfigError, match="train.lr_new"):
        run(tmp_path / "b", "train.lr_new=1e-3", resume=True)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.state.epoch == 1 and len(resumed.state.history) == 1
    resumed.fit()
    b_metrics = resumed.test()
    for name, value in run_a.engine.module.state_dict().items():
        assert torch.equal(value, resumed.engine.module.state_dict()[name]), name
    same = ("train_loss", "dev_accuracy")
    assert [{k: h.get(k) for k in same} for h in b_metrics["history"]] == [
        {k: h.get(k) for k in same} for h in a_metrics["history"]]
    assert b_metrics["test"] == a_metrics["test"] and b_metrics["epochs_run"] == 3
    log = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()  # epoch 2 not twice
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]
    assert not list((tmp_path / "b").glob("*last*"))  # complete: last/ removed, no temporaries
    assert not list((tmp_path / "b").glob(".*tmp-*"))
    # A finished run is left alone by --resume; --overwrite replaces it.
    assert qa_train.train(*parse_args(["--output-dir", str(tmp_path / "b")])[:2],
                          resume=True) is None
    fresh = run(tmp_path / "b", overwrite=True)
    assert fresh.state.epoch == 0 and not (tmp_path / "b" / "metrics.json").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_two_cpu_processes(tmp_path, data_root, tiny_lm):
    """recipes/finetune_qa.sh --nproc 2 on CPU (once hung at DeepSpeed's shared-memory set-up)
    trains data-parallel to the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "KGQA_DATA_DIR": str(data_root)}
    cmd = ["bash", "recipes/finetune_qa.sh", "--preset", "qa-webqsp-minilm-cpu",
           "--kg-checkpoint", "none", "--nproc", "2", "--out", str(tmp_path / "runs"), "--",
           "train.max_train_examples=16", "train.max_eval_examples=8", "train.epochs=1",
           f"model.lm={tiny_lm}", f"train.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    saved = json.loads((tmp_path / "runs" / "seed333" / "metrics.json").read_text())
    assert saved["world_size"] == 2 and saved["test"]["total"] == 8
