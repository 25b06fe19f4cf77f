"""What a link-prediction run writes to its output directory (paper section 3.3, "we select
the checkpoint with the best validation MRR"): checkpoints, the best model and the metrics log.

Layout of ``output_dir``::

    run_config.yaml   resolved configuration (hitter_core.config.save_config), at start
    ds_config.json    resolved DeepSpeed configuration
    metrics.jsonl     one JSON object per line: training logs (LogWindow's means since the
                      last log), validations (with train_seconds), the test result
    tensorboard/      the same scalars, when tensorboard is installed
    last/             model (save_pretrained) + run_config.yaml + trainer_state.pt
    best/             model (save_pretrained) + run_config.yaml + valid_metrics.json
    test_metrics.json test_metrics.txt   test metrics of best/ (JSON, printed table)

``last`` and ``best`` are written atomically: the directory is assembled under a temporary
name and swapped in with two renames (``last`` -> ``last.old``, temporary -> ``last``), then
``last.old`` is removed. A crash between the renames leaves ``last.old``, which
:func:`existing_checkpoint` falls back to; at every moment one complete checkpoint exists.
``trainer_state.pt`` holds the optimizer and scheduler state, :class:`TrainState` and the
data layout (world size, batch size, steps per epoch) that a mid-epoch resume needs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hitter_core.config import TrainConfig, save_config
from hitter_core.data import DataFormatError
from hitter_core.faults import ENV as FAULTS_ENV
from hitter_core.faults import crash_point
from hitter_core.model import HittER
from hitter_core.model_card import hitter_card
from hitter_core.sections import RUN_CONFIG_NAME

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "model.safetensors"  # the file save_pretrained writes for a single-shard model


class CorruptCheckpoint(DataFormatError):
    """A checkpoint file that cannot be read (truncated, damaged)."""


@dataclass
class TrainState:
    """Progress of a run; everything else a resume needs is in the optimizer/scheduler."""

    step: int = 0  # optimizer steps taken (global: every process takes each step)
    best_mrr: float = -1.0  # best valid MRR so far
    best_step: int = -1
    bad_validations: int = 0  # validations since the last improvement (early stopping)
    validated_step: int = -1  # step of the last validation
    stopped_early: bool = False
    # Wall-clock time spent training so far (validation and test excluded): a measurement,
    # not state, so two runs that took the same steps compare equal whatever their speed.
    train_seconds: float = dataclasses.field(default=0.0, compare=False)


RUN_FILES = (RUN_CONFIG_NAME, "ds_config.json", "metrics.jsonl", "tensorboard", "last",
             "last.old", "best", "best.old", "test_metrics.json", "test_metrics.txt")


_RUN_LOCKS: dict[Path, int] = {}  # the run directories this process writes: their lock files


def lock_run_dir(output_dir: str | os.PathLike) -> None:
    """Claim ``output_dir`` (created if missing) for this process: an exclusive ``flock`` on
    its ``.run.lock``, held until the process ends, by a crash too. A second run started on
    the same directory then stops with an error instead of writing over the first's
    checkpoints and log. A process may claim a directory more than once."""
    output_dir = Path(output_dir).resolve()
    if output_dir in _RUN_LOCKS:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{output_dir}: another run is writing to this directory (it holds "
                           f"{output_dir / '.run.lock'}); wait for it to end or choose another "
                           f"output directory") from None
    _RUN_LOCKS[output_dir] = fd


def clean_run_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Claim ``output_dir`` (:func:`lock_run_dir`), then remove the temporary directories a
    crash left while a checkpoint was written (``.last.tmp-*``, ``.best.tmp-*``) and, with
    ``overwrite``, what a run wrote to ``output_dir`` (``--overwrite``); returns the names of
    the run's files removed."""
    output_dir = Path(output_dir)
    lock_run_dir(output_dir)
    for stale in (*output_dir.glob(".last.tmp-*"), *output_dir.glob(".best.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    removed = []
    for name in RUN_FILES if overwrite else ():
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning("%s: removed the previous run (--overwrite): %s", output_dir,
                       ", ".join(removed))
    return removed


def existing_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` if it is a complete checkpoint directory, else its ``.old`` copy left by a
    crash during :func:`replace_dir`, else None."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap the complete directory ``tmp`` in as ``final`` (see the module docstring)."""
    old = final.with_name(final.name + ".old")
    if final.is_dir():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        crash_point("checkpoint-swap")
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a fresh temporary directory beside ``directory``, then swap
    it in (:func:`replace_dir`); on any failure the temporary directory is removed and
    ``directory`` is left as it was."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        crash_point("checkpoint-write")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(
    directory: str | os.PathLike,
    model: HittER,
    train_config: TrainConfig,
    trainer_state: dict[str, Any] | None = None,
    json_files: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``model`` (save_pretrained: config.json + weights), the resolved run
    config, ``trainer_state`` (torch.save, if given), ``json_files`` (name -> object) and,
    given its valid metrics (with ``step``) as ``card``, a model card (README.md)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_config(tmp / RUN_CONFIG_NAME, model.config, train_config)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        if card is not None:
            hitter_card(tmp, model.config, train_config, card, card.get("step"), directory)

    return write_dir_atomically(directory, write)


def write_test_metrics(output_dir: Path, best: Path, metrics: dict[str, Any], table: str,
                       train_config: TrainConfig) -> None:
    """``test_metrics.json`` / ``test_metrics.txt`` (the printed ``table``) in ``output_dir``,
    and the test figures in the model card of ``best``."""
    (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "test_metrics.txt").write_text(table + "\n")
    config = HittER.config_class.from_pretrained(best)
    hitter_card(best, config, train_config, {**metrics, "split": "test"}, metrics["best_step"])


def trainer_state_dict(
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    layout: dict[str, int],
) -> dict[str, Any]:
    """What ``trainer_state.pt`` holds; ``layout``: world_size, batch_size, steps_per_epoch."""
    return {
        "state": dataclasses.asdict(state),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "layout": dict(layout),
    }


def load_checkpoint(
    directory: str | os.PathLike,
    model: HittER,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    layout: dict[str, int],
) -> TrainState:
    """Restore weights, optimizer and scheduler state in place; returns the :class:`TrainState`.

    A mid-epoch resume replays the same data order only with the same data layout, so a
    checkpoint written with another world size, batch size or epoch length is refused.
    """
    directory = Path(directory)
    try:
        saved = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
        weights = load_file(directory / WEIGHTS, device=str(next(model.parameters()).device))
    except Exception as e:  # a truncated or corrupt file: torch and safetensors name neither
        raise CorruptCheckpoint(f"{directory}: unreadable checkpoint ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None
    if saved["layout"] != layout:
        raise ValueError(
            f"{directory} was written with {saved['layout']}, this run has {layout}; resume "
            f"with the same number of processes and train.batch_size, or start a new run"
        )
    model.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState(**saved["state"])


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
    if (test := path.parent / "test_metrics.json").is_file():
        metrics = json.loads(test.read_text())
        if Path(metrics.get("checkpoint", "")).name == path.name:
            identity["test_mrr"] = metrics["both"]["mrr"]
    return identity


def load_latest_checkpoint(
    last: Path,
    model: HittER,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    layout: dict[str, int],
) -> tuple[Path, TrainState]:
    """:func:`load_checkpoint` of ``last``, or of the ``last.old`` beside it when ``last`` is
    missing or unreadable (a disk that filled up, a file damaged after the run)."""
    errors = []
    for candidate in (last, last.with_name(last.name + ".old")):
        if candidate.is_dir():
            try:
                return candidate, load_checkpoint(candidate, model, optimizer, scheduler, layout)
            except CorruptCheckpoint as e:
                logger.warning("%s; trying the previous checkpoint", e)
                errors.append(str(e))
    raise CorruptCheckpoint("; ".join(errors) or f"{last}: no checkpoint")


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


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and, when tensorboard is installed, writes their
    numeric values as scalars. Only the process that logs (rank 0) creates one."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run repeats them."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line_no, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line_no < len(lines):
                    raise DataFormatError(f"{self.path}:{line_no}: not a JSON record") from None
                logger.warning("%s:%d: dropped a torn last line", self.path, line_no)
                continue  # a crash while appending it
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def log(self, record: dict[str, Any], prefix: str = "") -> None:
        """Append ``record`` (must hold ``step``); scalars go to tensorboard as prefix/key."""
        line = json.dumps(record) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            if os.environ.get(FAULTS_ENV):  # a torn line for the crash tests
                f.write(line[: len(line) // 2])
                f.flush()
                crash_point("metrics-log")
                f.write(line[len(line) // 2 :])
            else:
                f.write(line)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
