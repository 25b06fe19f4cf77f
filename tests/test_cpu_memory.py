"""hitter_core.cpu_memory: only entry points change the allocator, on CPU, unless told not to."""

import platform

import pytest

from hitter_core import evaluate
from hitter_core import train as train_module
from hitter_core.cpu_memory import keep_freed_memory


def test_returns_false_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False


@pytest.fixture
def calls(monkeypatch):
    """Records keep_freed_memory calls of the entry points; nothing trains or evaluates."""
    seen = []
    for module in (train_module, evaluate):
        monkeypatch.setattr(module, "keep_freed_memory", lambda: seen.append(1) or True)
    monkeypatch.setattr(train_module, "train", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "destroy_distributed", lambda: None)
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: {"dataset": "x"})
    monkeypatch.setattr(evaluate, "format_table", lambda *a, **k: "")
    return seen


def test_train_entry_point_applies_the_switch_per_flag(calls):
    train_module.main(["--preset", "cpu-small", "train.device=cpu"])
    assert calls == [1]
    train_module.main(["--preset", "cpu-small", "train.device=cpu", "--no-keep-freed-memory"])
    train_module.main(["--preset", "cpu-small", "train.device=cuda"])
    assert calls == [1]


def test_evaluate_entry_point_applies_the_switch_per_flag(calls):
    evaluate.main(["ckpt", "--device", "cpu"])
    assert calls == [1]
    evaluate.main(["ckpt", "--device", "cpu", "--no-keep-freed-memory"])
    assert calls == [1]
