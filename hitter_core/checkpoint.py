"""What a link-prediction run keeps of its model (paper section 3.3, "we select the checkpoint
with the best validation MRR"), in the run directory of :mod:`hitter_core.run_dir`::

    best/             model (save_pretrained) + run_config.yaml + valid_metrics.json + model card
    test_metrics.json test_metrics.txt   test metrics of best/ (JSON, printed table)

and how other code names and loads a HittER checkpoint (:func:`load_hitter`,
:func:`hitter_identity`). ``last/`` (for ``--resume``) is the run directory's engine
checkpoint; :class:`TrainState` is the progress it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hitter_core.config import TrainConfig, save_config
from hitter_core.model import HittER
from hitter_core.model_card import hitter_card
from hitter_core.run_dir import CorruptCheckpoint, RunState, write_dir_atomically
from hitter_core.sections import RUN_CONFIG_NAME

TEST_METRICS = "test_metrics.json"  # written last: the run finished
OUTPUTS = (TEST_METRICS, "test_metrics.txt")  # run_dir.RUN_FILES + these: one run
__all__ = ["CorruptCheckpoint", "TrainState", "OUTPUTS", "save_checkpoint", "load_hitter"]


@dataclass
class TrainState(RunState):
    """Progress of a link-prediction run (``best``: valid MRR, ``best_at``: its step)."""

    step: int = 0  # optimizer steps taken (global: every process takes each step)
    validated_step: int = -1  # step of the last validation


def save_checkpoint(
    directory: str | os.PathLike,
    model: HittER,
    train_config: TrainConfig,
    json_files: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``model`` (save_pretrained: config.json + weights), the resolved run
    config, ``json_files`` (name -> object) and, given its valid metrics (with ``step``) as
    ``card``, a model card (README.md)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_config(tmp / RUN_CONFIG_NAME, model.config, train_config)
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        if card is not None:
            hitter_card(tmp, model.config, train_config, card, card.get("step"), directory)

    return write_dir_atomically(directory, write)


def write_test_metrics(output_dir: Path, best: Path, metrics: dict[str, Any], table: str,
                       train_config: TrainConfig) -> None:
    """``test_metrics.json`` / ``test_metrics.txt`` (the printed ``table``) in ``output_dir``,
    and the test figures in the model card of ``best``."""
    (output_dir / TEST_METRICS).write_text(json.dumps(metrics, indent=2))
    (output_dir / "test_metrics.txt").write_text(table + "\n")
    config = HittER.config_class.from_pretrained(best)
    hitter_card(best, config, train_config, {**metrics, "split": "test"}, metrics["best_step"])


def load_hitter(path: str | os.PathLike, weights: bool = True) -> HittER:
    """``HittER.from_pretrained(path)`` (``weights=False``: the same shape, freshly
    initialised) with one-line errors: a directory without ``config.json`` (never looked up on
    the Hub), an unreadable weights file."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a HittER checkpoint directory (no config.json)")
    try:
        if not weights:
            return HittER(HittER.config_class.from_pretrained(path))
        return HittER.from_pretrained(path)
    except Exception as e:
        raise CorruptCheckpoint(f"{path}: unreadable HittER checkpoint ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None


def hitter_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What names a HittER checkpoint in the results of the runs that read it: its directory,
    the first 12 hex digits of its weights' SHA-256 (two trainings saved to one path differ
    here), its dataset, step and valid MRR (``valid_metrics.json``) and, where the directory
    is a run's ``best/``, the run's test MRR (``test_metrics.json`` beside it)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    identity: dict[str, Any] = {"checkpoint": str(path), "sha256": digest.hexdigest()[:12],
                                "dataset": json.loads((path / "config.json").read_text())
                                .get("dataset")}
    if (valid := path / "valid_metrics.json").is_file():
        metrics = json.loads(valid.read_text())
        identity |= {"step": metrics.get("step"), "valid_mrr": metrics["both"]["mrr"]}
    if (test := path.parent / TEST_METRICS).is_file():
        metrics = json.loads(test.read_text())
        if Path(metrics.get("checkpoint", "")).name == path.name:
            identity["test_mrr"] = metrics["both"]["mrr"]
    return identity


class LogWindow:
    """Running means of the logged losses and the throughput since the last log. The sums
    stay on the device (no host sync per step) until :meth:`pop` reads them."""

    def __init__(self) -> None:
        self.start, self.steps, self.triples = time.perf_counter(), 0, 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor], triples: int) -> None:
        self.steps, self.triples = self.steps + 1, self.triples + triples
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0) + value

    def rate(self) -> float:
        return self.triples / max(time.perf_counter() - self.start, 1e-9)

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.steps for k, v in self.sums.items()}
        out["triples_per_s"] = self.rate()
        self.__init__()
        return out
