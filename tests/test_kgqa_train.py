"""QA fine-tuning (kgqa/train.py): the DeepSpeed config, the engine's two learning rates read
back from the engine (frozen HittER absent, newly initialised LM weights at the adapter rate),
the warm-up schedule, and a short run on real WebQSP questions that writes the best
checkpoint, the predictions file and the metrics.

The LM is the offline MiniLM; HittER is tiny and random (width 32)."""

import json

import pytest
import torch
from torch import nn

from hitter_core.model import HittER, HittERConfig
from hitter_core.neighbours import NeighbourIndex
from kgqa.config import KGQAModelConfig, QATrainConfig
from kgqa.model import KGEnhancedLM
from kgqa.train import build_engine, build_model, init_distributed, main

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


def kg_model(neighbours, freeze_kg: bool) -> tuple[KGEnhancedLM, set[int]]:
    """MiniLM as loaded by build_model (with its fresh-weight ids) + tiny HittER + adapters."""
    plain, fresh = build_model(KGQAModelConfig(lm="minilm"))
    cfg = KGQAModelConfig(lm="minilm", kg_checkpoint="tiny", freeze_kg=freeze_kg)
    return KGEnhancedLM(cfg, plain.lm, tiny_hitter(), neighbours), fresh


# ---------------------------------------------------------------------- DeepSpeed config


def test_ds_config_filled_from_the_train_config():
    init_distributed()
    model, fresh = build_model(KGQAModelConfig(lm="minilm"))
    train = QATrainConfig(batch_size=8, max_grad_norm=0.5, zero_stage=2)
    engine = build_engine(model, train, total_steps=10, fresh=fresh)
    assert engine.train_micro_batch_size_per_gpu() == 8
    assert engine.gradient_clipping() == 0.5
    assert engine.zero_optimization_stage() == 2
    assert not engine.bfloat16_enabled()  # CPU: fp32
    with pytest.raises(NotImplementedError, match="ZeRO stage 3"):
        build_engine(model, QATrainConfig(zero_stage=3), total_steps=10, fresh=fresh)


# ---------------------------------------------------------------------- engine


def test_fresh_lm_weights_are_minilms_mlm_head():
    model, fresh = build_model(KGQAModelConfig(lm="minilm"))
    names = {n for n, p in model.lm.named_parameters() if id(p) in fresh}
    assert names == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }
    # The decoder weight is tied to the pretrained word embeddings: not fresh.
    assert id(model.lm.cls.predictions.decoder.weight) not in fresh


@pytest.mark.parametrize("freeze_kg", [False, True])
def test_engine_has_the_two_learning_rates(neighbours, freeze_kg):
    init_distributed()
    model, fresh = kg_model(neighbours, freeze_kg)
    train = QATrainConfig()
    engine = build_engine(model, train, total_steps=100, fresh=fresh)
    groups = engine.optimizer.param_groups
    lr_of = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert {g["initial_lr"] for g in groups} == {5e-5, 5e-6}

    adapters = [p for a in model.adapters() for p in a.parameters()]
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
    assert engine.gradient_clipping() == 1.0


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_engine_schedule_warms_up_then_decays(neighbours):
    init_distributed()
    model, fresh = kg_model(neighbours, freeze_kg=True)
    train = QATrainConfig(lr_adapters=4e-5, lr_pretrained=2e-6)  # configurable
    engine = build_engine(model, train, total_steps=20, fresh=fresh)  # 2 warm-up steps
    lrs = []
    for _ in range(21):
        lrs.append(sorted(g["lr"] for g in engine.optimizer.param_groups)[-1])
        engine.lr_scheduler.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(2e-5) and lrs[2] == pytest.approx(4e-5)
    assert lrs[11] == pytest.approx(2e-5) and lrs[20] == 0.0
    assert {g["initial_lr"] for g in engine.optimizer.param_groups} == {4e-5, 2e-6}


# ---------------------------------------------------------------------- a short run


@pytest.mark.realdata
def test_short_run_writes_checkpoint_predictions_and_metrics(tmp_path, data_root, fb15k237):
    ckpt = tmp_path / "hitter"
    tiny_hitter(fb15k237.num_entities, fb15k237.num_relations).save_pretrained(ckpt)
    out = tmp_path / "run"
    metrics = main([
        "--dataset", "webqsp", "--split", "filtered", "--lm", "minilm",
        "--kg_checkpoint", str(ckpt), "--epochs", "2", "--seed", "7",
        "--max_train_examples", "16", "--max_eval_examples", "8",
        "--data_dir", str(data_root), "--output_dir", str(out),
        "--cache_dir", str(tmp_path / "cache"),
    ])
    assert (out / "best" / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert (saved["dataset"], saved["split"], saved["kg"], saved["seed"]) == (
        "webqsp", "filtered", "co-trained", 7)
    assert saved["train_examples"] == 16 and saved["epochs_run"] == 2
    devs = [h["dev_accuracy"] for h in saved["history"]]
    assert saved["best_epoch"] == 1 + devs.index(max(devs))  # first best on dev
    rows = [json.loads(x) for x in (out / "predictions.test.jsonl").read_text().splitlines()]
    assert len(rows) == saved["test"]["total"] == 8
    assert set(rows[0]) == {"question_id", "question", "answer", "predicted", "correct"}
    assert sum(r["correct"] for r in rows) == saved["test"]["correct"]
    assert not (out / "best.tmp").exists() and not (out / "best.old").exists()
