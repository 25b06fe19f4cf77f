"""``train.precision`` (hitter_core.precision): auto picks bf16 only where the device has it
natively, both trainers hand the choice to DeepSpeed's autocast, and bf16 on CPU (the CPU
kernels under autocast) stays close to fp32 with fp32 scores, loss and gradients."""

import logging

import pytest
import torch

from hitter_core import precision
from hitter_core.batches import compute_loss, make_batch
from hitter_core.config import load_config
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex
from hitter_core.sections import ConfigError
from tests.test_gpu import E, R, no_dropout, random_triples, tiny_config


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_without_bf16, caplog):
    assert not precision.native_bf16("cpu")
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING, logger="hitter_core.precision"):
        assert precision.resolve_precision("bf16", "cpu") == "bf16"  # as asked, but warned
    assert len(caplog.records) == 1 and "no native bf16" in caplog.records[0].getMessage()


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_with_bf16, caplog, monkeypatch):
    assert precision.native_bf16("cpu")
    with caplog.at_level(logging.WARNING, logger="hitter_core.precision"):
        assert precision.resolve_precision("auto", "cpu") == "bf16"
        assert precision.resolve_precision("bf16", "cpu") == "bf16"
        assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert not caplog.records
    for flag in precision.NATIVE_BF16_CPU_FLAGS:  # AMX alone counts too
        monkeypatch.setattr(precision, "cpu_flags", lambda flag=flag: frozenset({flag}))
        assert precision.cpu_has_native_bf16()


def test_precision_setting_is_checked():
    assert load_config("cpu-small")[1].precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config("cpu-small", ["train.precision=fp16"])
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp16", "cpu")


def test_cpu_flags_reads_proc_cpuinfo():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    with open("/proc/cpuinfo") as f:  # Linux CI: the flags of the first CPU are there
        assert "fpu" in flags or "flags" not in f.read()


@pytest.mark.parametrize("native", [False, True])
def test_trainer_autocasts_as_precision_resolves(tmp_path, monkeypatch, one_thread, native):
    """The stage-1 trainer: precision auto -> DeepSpeed's torch_autocast exactly where the
    (forced) CPU capability says; training steps then run bf16 matrix products, validation
    float32, and the weights stay float32."""
    from hitter_core.train import Trainer
    from tests.test_train import configs, synthetic_kg

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flags = {"avx512_bf16"} if native else {"avx2"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    kg = synthetic_kg(tmp_path)
    trainer = Trainer(*configs(kg, tmp_path / "run", "train.batch_size=8",
                               "train.max_epochs=1", "train.device=cpu"), kg=kg)
    assert trainer.precision == ("bf16" if native else "fp32")
    assert trainer.ds_config.get("torch_autocast", {}).get("enabled", False) is native
    seen = []
    handle = trainer.model.pair_layers[0].ffn_in.register_forward_hook(
        lambda module, args, out: seen.append((module.training, out.dtype)))
    trainer.fit()
    handle.remove()
    assert {dtype for training, dtype in seen if training} == {
        torch.bfloat16 if native else torch.float32}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # validation
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_bf16_on_cpu_close_to_fp32():
    """The CPU path under bf16 autocast (short attention, masked attention, dropout in bf16;
    the fused cross-entropy over fp32 scores): loss within 2%, every gradient float32 and at
    cosine similarity >= 0.98 with fp32's."""
    triples = random_triples()
    index = NeighbourIndex.from_triples(triples, E, R)
    torch.manual_seed(0)
    model = HittER(no_dropout(tiny_config())).train()
    batch = make_batch(triples[:64], index, model.config)

    def loss_and_grads(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = compute_loss(model, batch)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert grads16.keys() == grads32.keys()
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32, name
        if grad.norm() > 1e-8:
            cosine = torch.nn.functional.cosine_similarity(
                grads16[name].flatten(), grad.flatten(), dim=0)
            assert cosine >= 0.98, (name, cosine.item())
