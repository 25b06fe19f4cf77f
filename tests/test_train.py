"""Tests of link-prediction training: loss, optimiser, schedule, DeepSpeed engine, overfitting a
real FB15K-237 sub-graph, resume after a crash, and two data-parallel CPU processes.

The first DeepSpeed process group on a machine JIT-builds DeepSpeed's CPU communication op
into $TORCH_EXTENSIONS_DIR (~1-2 min, once; a different ``ninja`` on PATH rebuilds it)."""

import contextlib
import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hitter_core.batches import compute_loss, epoch_shard, make_batch
from hitter_core.checkpoint import CorruptCheckpoint, TrainState
from hitter_core.config import HittERConfig, load_config
from hitter_core.data import KnowledgeGraph
from hitter_core.distributed import initialize_engine, resolve_ds_config
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex, ground_truth_token
from hitter_core.optim import (
    AdamaxW,
    clip_grad_per_tensor_,
    linear_schedule,
)
from hitter_core.ranking import FilterIndex, ranking_metrics, realistic_rank
from hitter_core.runtime import StaleBuildLock, check_build_locks, extensions_dir
from hitter_core.sections import RUN_CONFIG_NAME, ConfigError
from hitter_core.train import Trainer, train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
    "model.num_entity_layers=1", "model.num_context_layers=1", "model.max_neighbours=8",
]


def synthetic_kg(directory: Path, num_entities: int = 16, num_relations: int = 3,
                 num_triples: int = 40, seed: int = 0) -> KnowledgeGraph:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(num_entities, (4 * num_triples,), generator=g)
    r = torch.randint(num_relations, (4 * num_triples,), generator=g)
    t = torch.randint(num_entities, (4 * num_triples,), generator=g)
    triples = torch.unique(torch.stack([h, r, t], 1)[h != t], dim=0)
    triples = triples[torch.randperm(len(triples), generator=g)]
    train_, valid, test = triples[:num_triples], triples[-12:-6], triples[-6:]
    return KnowledgeGraph(
        name="synthetic", directory=directory,
        entities=[f"e{i}" for i in range(num_entities)],
        relations=[f"r{i}" for i in range(num_relations)],
        entity_names=[f"e{i}" for i in range(num_entities)],
        splits={"train": train_, "valid": valid, "test": test},
    )


def write_kg(kg: KnowledgeGraph, directory: Path) -> None:
    directory.mkdir(parents=True)
    for split, triples in kg.splits.items():
        lines = [f"{kg.entities[h]}\t{kg.relations[r]}\t{kg.entities[t]}\n"
                 for h, r, t in triples.tolist()]
        (directory / f"{split}.txt").write_text("".join(lines))


def ego_subgraph(kg: KnowledgeGraph, mid: str) -> KnowledgeGraph:
    """The train triples among an entity and its neighbours, re-indexed; valid = test = train."""
    tr, centre = kg.train, kg.entity_index()[mid]
    ball = torch.unique(torch.cat([tr[tr[:, 0] == centre, 2], tr[tr[:, 2] == centre, 0],
                                   torch.tensor([centre])]))
    inside = torch.zeros(kg.num_entities, dtype=torch.bool)
    inside[ball] = True
    sub = tr[inside[tr[:, 0]] & inside[tr[:, 2]]]
    ents, rels = torch.unique(sub[:, [0, 2]]), torch.unique(sub[:, 1])
    emap = torch.full((kg.num_entities,), -1)
    emap[ents] = torch.arange(len(ents))
    rmap = torch.full((kg.num_relations,), -1)
    rmap[rels] = torch.arange(len(rels))
    triples = torch.stack([emap[sub[:, 0]], rmap[sub[:, 1]], emap[sub[:, 2]]], 1)
    return KnowledgeGraph(
        name=f"{kg.name}-ego", directory=kg.directory,
        entities=[kg.entities[i] for i in ents], relations=[kg.relations[i] for i in rels],
        entity_names=[kg.entity_names[i] for i in ents],
        splits={"train": triples, "valid": triples, "test": triples},
    )


def configs(kg: KnowledgeGraph, output_dir: Path, *overrides: str):
    model_config, train_config = load_config(
        None, [*TINY, f"train.output_dir={output_dir}", *overrides]
    )
    model_config.num_entities, model_config.num_relations = kg.num_entities, kg.num_relations
    return model_config, train_config


@pytest.fixture(autouse=True)
def _neighbour_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------- loss


def test_make_batch_removes_ground_truth_and_compute_loss_sums_directions(tmp_path):
    kg = synthetic_kg(tmp_path)
    config = HittERConfig(num_entities=16, num_relations=3, hidden_size=32,
                          num_attention_heads=2, intermediate_size=64, num_entity_layers=1,
                          num_context_layers=1, max_neighbours=64, neighbour_drop=0.0)
    index = NeighbourIndex.from_triples(kg.train, 16, 3)
    triples = kg.train[:10]
    batch = make_batch(triples, index, config)
    B = len(triples)
    assert batch.sources.shape == batch.targets.shape == (2 * B,)
    assert torch.equal(batch.sources[:B], triples[:, 0])  # tail queries first
    assert torch.equal(batch.relations[B:], triples[:, 1] + 3)  # then reciprocal head queries
    nb = batch.neighbours
    gt_e, gt_r = ground_truth_token(batch.targets, batch.relations, 3)
    leaked = nb.mask & (nb.entities == gt_e[:, None]) & (nb.relations == gt_r[:, None])
    assert not leaked.any()
    # With max >= every degree and no drop, exactly the ground-truth token is removed (it can
    # be absent: of several relations joining the same ordered pair, the index keeps one).
    present = []
    queries = zip(batch.sources.tolist(), gt_e.tolist(), gt_r.tolist(), strict=True)
    for source, entity, relation in queries:
        entities, relations = index.neighbours_of(source)
        present.append(bool(((entities == entity) & (relations == relation)).any()))
    assert sum(present) >= B  # most triples do give the token
    expected = index.degrees()[batch.sources] - torch.tensor(present, dtype=torch.long)
    assert torch.equal(nb.mask.sum(1), expected)

    torch.manual_seed(0)
    model = HittER(config).eval()  # no dropout, no MEP: the loss is deterministic
    loss, stats = compute_loss(model, batch)
    assert loss.shape == () and torch.isfinite(loss)
    directions = []
    for half in (slice(0, B), slice(B, 2 * B)):
        scores = model(batch.sources[half], batch.relations[half], nb.entities[half],
                       nb.relations[half], nb.mask[half]).scores
        directions.append(F.cross_entropy(scores, batch.targets[half]))
    torch.testing.assert_close(loss, directions[0] + directions[1])
    assert set(stats) == {"loss", "lp_loss"}


def test_compute_loss_weights_mep_auxiliary_loss(tmp_path):
    kg = synthetic_kg(tmp_path)
    config = HittERConfig(num_entities=16, num_relations=3, hidden_size=32,
                          num_attention_heads=2, intermediate_size=64, num_entity_layers=1,
                          num_context_layers=1, max_neighbours=8, mep_self_dropout=0.8,
                          mep_aux_loss=True, label_smoothing=0.1)
    index = NeighbourIndex.from_triples(kg.train, 16, 3)
    torch.manual_seed(1)
    model = HittER(config).train()
    loss, stats = compute_loss(model, make_batch(kg.train, index, config))
    assert stats["mep_loss"] > 0
    torch.testing.assert_close(loss.detach(), stats["lp_loss"] + 0.8 / 1.8 * stats["mep_loss"])
    loss.backward()
    assert model.mask_vector.grad is not None and model.mask_vector.grad.abs().sum() > 0


def test_epoch_shards_are_disjoint_and_reshuffled():
    shards = [epoch_shard(103, epoch=2, seed=0, rank=k, world_size=3) for k in range(3)]
    joined = torch.cat(shards)
    assert [len(s) for s in shards] == [34, 34, 34]
    assert len(torch.unique(joined)) == 102 and int(joined.max()) < 103
    assert not torch.equal(epoch_shard(103, 3, 0), epoch_shard(103, 2, 0))
    assert torch.equal(epoch_shard(103, 2, 0), epoch_shard(103, 2, 0))


# ---------------------------------------------------------------------------- optimiser


def test_linear_schedule_warmup_then_decay():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = AdamaxW([param], lr=0.01)
    scheduler = linear_schedule(optimizer, total_steps=100, warmup_ratio=0.1)
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {0: 0.0, 5: 0.005, 10: 0.01, 55: 0.005, 91: 0.001, 100: 0.0}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, abs=1e-12), step


def test_adamaxw_decay_is_decoupled():
    torch.manual_seed(0)
    p0, grad = torch.randn(5), torch.randn(5)
    decoupled = torch.nn.Parameter(p0.clone())
    plain = torch.nn.Parameter(p0.clone())
    opt_w = AdamaxW([decoupled], lr=0.1, eps=1e-6, weight_decay=0.5)
    opt = torch.optim.Adamax([plain], lr=0.1, eps=1e-6)
    for p, o in ((decoupled, opt_w), (plain, opt)):
        p.grad = grad.clone()
        o.step()
    # The update itself ignores the decay (no L2 term in the moments); the decay shrinks p0.
    torch.testing.assert_close(decoupled.detach(), plain.detach() - 0.1 * 0.5 * p0)
    torch.testing.assert_close(opt_w.state[decoupled]["exp_avg"], opt.state[plain]["exp_avg"])
    assert opt_w.param_groups[0]["weight_decay"] == 0.0  # torch's L2 term stays off


def test_clip_grad_per_tensor_clips_each_tensor_alone():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.0, 0.4])
    norms = clip_grad_per_tensor_([a, b], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.0, 0.4]))  # global clip would shrink


def test_resolve_ds_config_fills_auto_values(tmp_path, caplog):
    ds = resolve_ds_config(REPO / "ds_config.json", micro_batch_size=64, max_grad_norm=0.5,
                           engine_clips=False, bf16_available=False)
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_clipping"] == 0.0  # clip_per_tensor: the trainer clips
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["bf16"] == {"enabled": False} and "torch_autocast" not in ds
    ds = resolve_ds_config(None, micro_batch_size=64, max_grad_norm=0.5, bf16_available=True)
    assert ds["gradient_clipping"] == 0.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    with pytest.raises(NotImplementedError, match="ZeRO stage 2"):
        resolve_ds_config(bad, micro_batch_size=8, max_grad_norm=0.5, zero_stage=2,
                          bf16_available=False)
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        resolve_ds_config(bad, micro_batch_size=8, max_grad_norm=0.5, bf16_available=False)
    bad.write_text(json.dumps({"gradient_clipping": 1.0}))
    ds = resolve_ds_config(bad, micro_batch_size=8, max_grad_norm=0.5, bf16_available=False)
    assert ds["gradient_clipping"] == 0.5 and "overridden" in caplog.text


def test_initialize_engine_hands_deepspeed_our_pieces(monkeypatch):
    """The engine builder's plumbing, without building an engine; "auto" bf16 in the file
    follows the device's native bf16 unless the caller says (the trainers do)."""
    import deepspeed

    from hitter_core import distributed

    monkeypatch.setattr(distributed, "native_bf16", lambda device: False)
    seen = {}

    def fake_initialize(**kwargs):
        seen.update(kwargs)
        return "engine", kwargs["optimizer"], None, kwargs["lr_scheduler"]

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    model = torch.nn.Linear(2, 2)
    optimizer = AdamaxW(model.parameters(), lr=0.1)
    schedule = linear_schedule(optimizer, 10, 0.1)
    engine = initialize_engine(model, optimizer, schedule, None, micro_batch_size=4,
                               max_grad_norm=0.5, engine_clips=False)
    assert engine == "engine" and seen["model"] is model
    assert seen["optimizer"] is optimizer and seen["lr_scheduler"] is schedule
    ds = seen["config"]
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"] == {"enabled": False} and "torch_autocast" not in ds  # no native bf16
    monkeypatch.setattr(distributed, "native_bf16", lambda device: True)
    initialize_engine(model, optimizer, schedule, None, micro_batch_size=4, max_grad_norm=0.5)
    assert seen["config"]["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    initialize_engine(model, optimizer, schedule, None, micro_batch_size=4, max_grad_norm=0.5,
                      bf16_available=False)  # train.precision=fp32
    assert "torch_autocast" not in seen["config"]


# ---------------------------------------------------------------------------- engine and resume


def optimizer_state(trainer: Trainer) -> dict:
    return copy.deepcopy(trainer.optimizer.state_dict()["state"])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality on CPU; on CUDA within float32 noise (atomics reorder its sums)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def last_checkpoint(run: Path) -> dict:
    """What process 0 wrote to ``run/last`` (DeepSpeed's engine checkpoint): the weights
    (``module``), optimizer and schedule states, and the trainer's client state."""
    return torch.load(run / "last" / "state" / "mp_rank_00_model_states.pt", weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        for name in ("step", "exp_avg", "exp_inf"):
            assert same(a[key][name], b[key][name]), (key, name)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")]),
])
def test_resume_after_crash_continues_exactly(tmp_path, one_thread, device):
    """Run A trains 15 steps (3 epochs of 5, validating after each); run B crashes after step
    9, its last checkpoint is from step 8 (mid-epoch), and resuming it must give A's step-8
    weights and optimizer state, then finish with exactly A's final weights, optimizer state
    and validation record (on CUDA within float32 noise). Dropout, MEP and neighbour sampling
    are on: they must replay."""
    kg = synthetic_kg(tmp_path)
    overrides = ("train.batch_size=8", "train.max_epochs=3", "train.save_every=4",
                 "train.validate_every=1", "train.lr=0.01", "train.log_every=1",
                 f"train.device={device}")
    at_step_8 = {}

    def remember(step):
        if step == 8:
            at_step_8["params"] = copy.deepcopy(run_a.model.state_dict())
            at_step_8["optim"] = optimizer_state(run_a)

    run_a = Trainer(*configs(kg, tmp_path / "a", *overrides), kg=kg)
    assert type(run_a.optimizer) is AdamaxW  # the engine steps our client optimizer
    assert run_a.engine.get_lr() == [0.0]  # warm-up starts at 0
    assert run_a.optimizer.param_groups[0]["decoupled_weight_decay"] == 0.01
    run_a.fit(on_step=remember)
    assert run_a.state.step == 15 and run_a.steps_per_epoch == 5
    assert run_a.engine.get_lr()[0] == pytest.approx(0.0)  # linear decay ends at 0

    class Crash(Exception):
        pass

    def crash(step):
        if step == 9:
            raise Crash

    run_b = Trainer(*configs(kg, tmp_path / "b", *overrides), kg=kg)
    with pytest.raises(Crash):
        run_b.fit(on_step=crash)
    saved_config = (tmp_path / "b" / RUN_CONFIG_NAME).read_text()
    with pytest.raises(FileExistsError, match="holds a run .*; pass --resume to continue it, "
                                              "--overwrite to replace it"):
        Trainer(*configs(kg, tmp_path / "b", *overrides), kg=kg)  # never overwrite silently
    with pytest.raises(ConfigError, match="train.lr: 0.01 saved, 0.02 now"):  # same run only
        Trainer(*configs(kg, tmp_path / "b", *overrides, "train.lr=0.02"), kg=kg, resume=True)
    assert (tmp_path / "b" / RUN_CONFIG_NAME).read_text() == saved_config  # the record stays

    resumed = Trainer(*configs(kg, tmp_path / "b", *overrides), kg=kg, resume=True)
    assert resumed.state.step == 8 and resumed.engine.global_steps == 8
    assert resumed.scheduler.last_epoch == 8
    assert_same_state(optimizer_state(resumed), at_step_8["optim"])
    for name, value in resumed.model.state_dict().items():
        assert same(value, at_step_8["params"][name]), name

    resumed.fit()
    if device == "cpu":
        assert resumed.state == run_a.state
    else:  # the same steps and validations; MRRs within float noise
        assert resumed.state.step == run_a.state.step
        assert resumed.state.best == pytest.approx(run_a.state.best, abs=1e-3)
    assert_same_state(optimizer_state(resumed), optimizer_state(run_a))
    for name, value in resumed.model.state_dict().items():
        assert same(value, run_a.model.state_dict()[name]), name
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    # The crashed run's record of step 9 was dropped before the step was redone.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    assert [r["step"] for r in records if "valid_mrr" in r] == [5, 10, 15]
    saved = last_checkpoint(tmp_path / "b")
    assert TrainState.from_dict(saved["state"]).step == run_a.state.step
    if device == "cpu":
        assert TrainState.from_dict(saved["state"]) == run_a.state
    fresh = Trainer(*configs(kg, tmp_path / "b", *overrides), kg=kg, overwrite=True)
    assert fresh.state.step == 0 and not (tmp_path / "b" / "best").exists()


def test_validation_keeps_best_and_stops_early(tmp_path, one_thread):
    """Valid MRRs 0.1, 0.3, 0.2, 0.25 (one per epoch of 5 steps) with patience 2: the best is
    the step-10 model, and training stops after the fourth validation (step 20 of 50)."""
    kg = synthetic_kg(tmp_path)
    trainer = Trainer(*configs(kg, tmp_path / "run", "train.batch_size=8", "train.max_epochs=10",
                               "train.validate_every=1", "train.patience=2"), kg=kg)
    mrrs = iter([0.1, 0.3, 0.2, 0.25])
    weights_at = {}

    def fake_evaluate(model, split):
        weights_at[trainer.state.step] = model.entity_embeddings.weight.detach().clone()
        return {"both": {"mrr": next(mrrs)}}

    trainer._evaluate = fake_evaluate
    state = trainer.fit()
    assert (state.step, state.best_at, state.best) == (20, 10, 0.3)
    assert state.stopped and state.since_best == 2
    assert sorted(weights_at) == [5, 10, 15, 20]
    best = HittER.from_pretrained(tmp_path / "run" / "best")
    assert torch.equal(best.entity_embeddings.weight, weights_at[10])
    assert json.loads((tmp_path / "run" / "best" / "valid_metrics.json").read_text())["step"] == 10
    assert TrainState.from_dict(last_checkpoint(tmp_path / "run")["state"]) == state


def test_a_failing_compiled_step_is_redone_eager(tmp_path, one_thread, monkeypatch, caplog):
    """train.compile: when the compiled layers fail (here torch.compile hands back a function
    that raises, as the CPU backward once did), the step is redone eager with one warning and
    training stays eager, ending exactly where an eager run ends."""
    kg = synthetic_kg(tmp_path)
    common = ("train.batch_size=8", "train.max_steps=6", "train.max_epochs=10",
              "train.validate_every=100")
    eager = Trainer(*configs(kg, tmp_path / "eager", *common), kg=kg)
    eager.fit()

    def broken(function, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("setStorage: storage size out of bounds")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    compiled = Trainer(*configs(kg, tmp_path / "compiled", *common, "train.compile=true"), kg=kg)
    assert len(compiled.compiled.layers) == 2  # the entity layer and the context layer
    with caplog.at_level(logging.WARNING, logger="hitter_core.compiled"):
        compiled.fit()
    warnings = [r for r in caplog.records if "redone and continued eager" in r.getMessage()]
    assert len(warnings) == 1 and "setStorage" in warnings[0].getMessage()
    assert compiled.compiled.layers == [] and compiled.state.step == 6
    for (name, value), other in zip(eager.model.state_dict().items(),
                                    compiled.model.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_patience_zero_never_stops(tmp_path, one_thread):
    kg = synthetic_kg(tmp_path)
    trainer = Trainer(*configs(kg, tmp_path / "run", "train.batch_size=8", "train.max_epochs=4",
                               "train.validate_every=1", "train.patience=0"), kg=kg)
    mrrs = iter([0.3, 0.2, 0.1, 0.0])
    trainer._evaluate = lambda model, split: {"both": {"mrr": next(mrrs)}}
    state = trainer.fit()
    assert (state.step, state.best_at, state.stopped) == (20, 5, False)
    # Time to quality: each validation records the training time so far, validation excluded.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    seconds = [r["train_seconds"] for r in records if "valid_mrr" in r]
    assert len(seconds) == 4 and 0 < seconds[0] < seconds[1] < seconds[2] < seconds[3]
    assert seconds[-1] == state.train_seconds


@pytest.mark.realdata
@pytest.mark.slow
def test_overfits_real_subgraph(fb15k237, tmp_path, one_thread):
    """A tiny HittER learns the 51 train triples around "American History X" (23 entities, 32
    relations) to MRR 1.0 (~25 s). The rank is the filtered (by the other train answers)
    realistic rank of each training query, given the input it was trained on: its
    neighbourhood without the ground-truth token (all tokens fit, nothing dropped), model in
    eval mode. (With the ground-truth token present, as in ``evaluate``, a model trained never
    to see it is not expected to reach 1.0.) All 4 seeds tried reached 1.0 by step 400."""
    kg = ego_subgraph(fb15k237, "/m/0170z3")
    assert (kg.num_entities, kg.num_relations, len(kg.train)) == (23, 32, 51)
    model_config, train_config = configs(
        kg, tmp_path / "run",
        "model.hidden_size=64", "model.num_attention_heads=4", "model.intermediate_size=128",
        "model.max_neighbours=64", "model.attention_dropout=0", "model.hidden_dropout=0",
        "model.output_dropout=0", "model.neighbour_drop=0", "model.mep_self_dropout=0",
        "train.batch_size=51", "train.max_epochs=600", "train.validate_every=1000",
        "train.save_every=0", "train.lr=0.01", "train.log_every=100",
    )
    trainer = train(model_config, train_config, kg=kg)

    model = trainer.model.eval()
    batch = make_batch(kg.train, trainer.neighbour_index, model_config)
    nb = batch.neighbours
    with torch.no_grad():
        scores = model(batch.sources, batch.relations, nb.entities, nb.relations, nb.mask).scores
    scores = FilterIndex.build(kg, ["train"]).filter_scores(
        scores, batch.sources, batch.relations, batch.targets
    )
    metrics = ranking_metrics(realistic_rank(scores, batch.targets))
    assert metrics["mrr"] == 1.0, metrics

    out = trainer.output_dir
    assert HittER.from_pretrained(out / "best").config.num_entities == 23
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert test_metrics["split"] == "test" and test_metrics["both"]["count"] == 2 * 51
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [100, 200, 300, 400, 500, 600]
    assert records[-1]["test_mrr"] == test_metrics["both"]["mrr"]
    card = (out / "best" / "README.md").read_text()  # the model card, with the test figures
    assert card.startswith("---\nlibrary_name: hitter-kgqa") and "# HittER on" in card
    assert "Filtered test ranking" in card and f"| {test_metrics['both']['mrr']:.4f} |" in card


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_cpu_processes_train_data_parallel(tmp_path, launcher):
    """recipes/pretrain_kg.sh --nproc 2 trains a tiny run data-parallel on 2 CPU processes,
    through the DeepSpeed launcher and through torchrun. The launcher's default port 29500 is
    held meanwhile, as a second job on the machine would (before: EADDRINUSE after 1.5
    minutes): the recipe picks a free one."""
    kg = synthetic_kg(tmp_path, num_triples=64)
    write_kg(kg, tmp_path / "data" / "tiny")
    out = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "LAUNCHER": launcher}
    cmd = ["bash", "recipes/pretrain_kg.sh", "--preset", "cpu-small", "--nproc", "2",
           "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), *TINY,
           "model.dataset=tiny", "model.num_entities=16", "model.num_relations=3",
           "train.batch_size=8", "train.max_epochs=2", "train.validate_every=1"]
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # already taken here: busy all the same
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = last_checkpoint(out)
    assert saved["layout"] == {"world_size": 2, "batch_size": 8, "steps_per_epoch": 4}
    assert saved["state"]["step"] == 8
    assert "MRR" in (out / "test_metrics.txt").read_text()
    assert "both" in result.stdout


def test_stale_deepspeed_build_lock_is_reported(tmp_path, monkeypatch, caplog):
    """An interrupted op build leaves ``lock``; torch would wait on it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    with caplog.at_level(logging.WARNING):
        check_build_locks()  # fresh: another process may be building right now
    assert "another process is building a DeepSpeed op" in caplog.text
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.raises(StaleBuildLock, match="lock: left by a build .* 60 minutes ago"):
        check_build_locks()


def test_resume_survives_damaged_files(tmp_path, one_thread, caplog):
    """A truncated engine checkpoint in last/ falls back to last.old (or names the directory);
    a torn last line of metrics.jsonl (a crash while appending) is dropped."""
    kg = synthetic_kg(tmp_path)
    overrides = ("train.batch_size=8", "train.max_epochs=2", "train.validate_every=1")
    Trainer(*configs(kg, tmp_path / "r", *overrides), kg=kg).fit()
    last = tmp_path / "r" / "last"
    shutil.copytree(last, tmp_path / "r" / "last.old")  # as a crash in replace_dir leaves it
    states = last / "state" / "mp_rank_00_model_states.pt"  # DeepSpeed's file
    states.write_bytes(states.read_bytes()[:100])
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "lo')
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(*configs(kg, tmp_path / "r", *overrides), kg=kg, resume=True)
    assert "last: unreadable checkpoint" in caplog.text and "torn last line" in caplog.text
    assert resumed.state.step == 10
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    shutil.rmtree(tmp_path / "r" / "last.old")
    with pytest.raises(CorruptCheckpoint, match="last: unreadable checkpoint"):
        Trainer(*configs(kg, tmp_path / "r", *overrides), kg=kg, resume=True)


def test_a_last_checkpoint_of_an_earlier_version_is_named(tmp_path, one_thread):
    """last/ as written before both stages shared one layout (save_pretrained weights +
    trainer_state.pt, no engine checkpoint): --resume stops with one line that says so."""
    kg = synthetic_kg(tmp_path)
    overrides = ("train.batch_size=8", "train.max_epochs=1")
    Trainer(*configs(kg, tmp_path / "r", *overrides), kg=kg).fit()
    last = tmp_path / "r" / "last"
    shutil.rmtree(last / "state")
    (last / "trainer_state.pt").write_bytes(b"old")
    with pytest.raises(CorruptCheckpoint, match="last: not a checkpoint of this version"):
        Trainer(*configs(kg, tmp_path / "r", *overrides), kg=kg, resume=True)


def test_deepspeed_ops_are_built_once_per_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # a virtual environment
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert extensions_dir() == tmp_path / "torch_extensions"
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))  # the system Python: torch's cache
    assert extensions_dir().name == "torch_extensions" and extensions_dir().parent != tmp_path


def test_a_world_of_one_binds_no_port(tmp_path):
    """Without a launcher the process group needs no rendezvous: MASTER_PORT held by another
    process does not matter (before: EADDRINUSE when another job took the port in between)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
        env |= {"MASTER_PORT": str(busy.getsockname()[1]), "OMP_NUM_THREADS": "1"}
        code = ("from hitter_core.distributed import init_distributed; "
                "print(init_distributed('cpu')[:2])")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(0, 1)")
