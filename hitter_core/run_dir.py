"""A training run's output directory, the same for both stages: who may write it, what a
crash leaves in it, how a run resumes, and the words for a run's progress.

Layout (each stage adds its outputs, e.g. ``test_metrics.json``, ``predictions.test.jsonl``)::

    .run.lock        held (flock) by the process that writes the run, until it ends
    run_config.yaml  the resolved configuration, written at start; ``--resume`` must match it
    ds_config.json   the resolved DeepSpeed configuration
    metrics.jsonl    one JSON record per line (training logs, evaluations), with ``step``
    tensorboard/     the same scalars, when tensorboard is installed
    last/            for ``--resume`` only: DeepSpeed's engine checkpoint (``last/state/``:
                     model, optimizer, schedule, written by every process, ZeRO shards
                     included) with the trainer's :class:`RunState` as client state
    best/            the best model on the selection split, in ``save_pretrained`` form: the
                     artefact users and the next stage load, without DeepSpeed

One checkpoint layout for both stages, in two parts for two readers. ``last`` must hold
whatever the engine spreads over processes (stage 2's ZeRO 1/2 optimizer partitions) and
restore it exactly, which DeepSpeed's own checkpoint does; ``best`` must load anywhere
(``from_pretrained``), so it holds weights and config only.

``last`` and ``best`` are written atomically: assembled under a temporary name
(``.last.tmp-*``) and swapped in with two renames (``last`` -> ``last.old``, temporary ->
``last``), then ``last.old`` is removed. A crash between the renames leaves ``last.old``,
which :meth:`RunDir.load_last` falls back to, as it does when ``last`` is unreadable; at every
moment one complete checkpoint exists. A new run refuses a directory that holds a run unless
``--resume`` (same configuration) or ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hitter_core.data import DataFormatError
from hitter_core.distributed import check_same_on_all_ranks
from hitter_core.runtime import CRASH_ENV, crash_point
from hitter_core.sections import RUN_CONFIG_NAME, check_same_config, save_sections

logger = logging.getLogger(__name__)

LAST, BEST, TAG = "last", "best", "state"  # TAG: the engine checkpoint's folder in last/
RUN_FILES = (RUN_CONFIG_NAME, "ds_config.json", "metrics.jsonl", "tensorboard", LAST,
             LAST + ".old", BEST, BEST + ".old")


class CorruptCheckpoint(DataFormatError):
    """A checkpoint file that cannot be read (truncated, damaged)."""


@dataclass
class RunState:
    """Progress of a run, in the words of both stages; saved in ``last/``. ``at`` counts
    optimizer steps in stage 1 and epochs in stage 2; a stage adds its own position."""

    best: float = -1.0  # best value of the selection metric so far (valid MRR, dev accuracy)
    best_at: int = -1  # when it was reached
    since_best: int = 0  # evaluations without improvement (early stopping)
    stopped: bool = False  # stopped early
    # Wall-clock time spent training so far (evaluation excluded): a measurement, not state,
    # so two runs that took the same steps compare equal whatever their speed.
    train_seconds: float = dataclasses.field(default=0.0, compare=False)

    def record(self, value: float, at: int, patience: int) -> bool:
        """Book an evaluation; whether it improved on the best. ``stopped`` after ``patience``
        evaluations without improvement (never with ``patience`` 0)."""
        improved = value > self.best
        if improved:
            self.best, self.best_at, self.since_best = value, at, 0
        else:
            self.since_best += 1
        self.stopped = patience > 0 and self.since_best >= patience
        return improved

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> RunState:
        """The state saved by :meth:`RunDir.save_last` (``best_epoch``: a QA run before the
        stages shared these words)."""
        saved = dict(saved)
        if "best_epoch" in saved:
            saved["best_at"] = saved.pop("best_epoch")
        return cls(**saved)


class RunDir:
    """The output directory of one run; ``outputs``: the stage's result files (refused, and
    removed by ``--overwrite``, like the rest)."""

    def __init__(self, path: str | os.PathLike, outputs: tuple[str, ...]):
        self.path = Path(path)
        self.files = RUN_FILES + tuple(outputs)
        self.last, self.best = self.path / LAST, self.path / BEST

    def claim(self, configs: Mapping[str, Any], resume: bool, overwrite: bool) -> None:
        """Make the directory ready for a run of ``configs`` (the resolved sections), on
        process 0 only: lock it (:func:`lock_run_dir`); refuse it if it holds a run, unless
        ``resume`` (the saved ``run_config.yaml`` must equal ``configs``: a changed setting is
        an error naming it; the saved file is kept) or ``overwrite`` (the old run's files are
        removed first); remove the temporaries a crash left; write ``run_config.yaml``."""
        lock_run_dir(self.path)
        held = [name for name in self.files if (self.path / name).exists()]
        if held and overwrite:
            for name in held:
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            logger.warning("%s: removed the previous run (--overwrite): %s", self.path,
                           ", ".join(held))
        elif held and not resume:
            raise FileExistsError(
                f"{self.path} holds a run ({', '.join(held)}); pass --resume to continue it, "
                f"--overwrite to replace it, or choose another output directory")
        elif held and (self.path / RUN_CONFIG_NAME).is_file():
            check_same_config(self.path / RUN_CONFIG_NAME, configs)
        remove_temporaries(self.path)
        if not (self.path / RUN_CONFIG_NAME).is_file():
            save_sections(self.path / RUN_CONFIG_NAME, configs)

    def write(self, name: str, fill: Callable[[Path], None]) -> Path:
        """``fill(tmp)`` a temporary directory, then swap it in as ``name`` (atomically)."""
        return write_dir_atomically(self.path / name, fill)

    def save_last(self, engine: Any, state: RunState, **client: Any) -> None:
        """Every process: the engine checkpoint (model, optimizer, schedule) with ``state``
        and ``client`` (RNG states, data layout) as client state, swapped in as ``last``."""
        tmp = self.path / f".{LAST}.tmp-{engine.global_steps}"
        client_state = {"state": dataclasses.asdict(state), **client}
        engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state, save_latest=False)
        crash_point("checkpoint-write")
        if dist.is_initialized():
            dist.barrier()
        if not dist.is_initialized() or dist.get_rank() == 0:
            replace_dir(tmp, self.last)
        if dist.is_initialized():
            dist.barrier()

    def load_last(self, engine: Any) -> dict[str, Any] | None:
        """Every process: restore the engine from ``last`` (or from the ``last.old`` a crash
        left, also when ``last`` is unreadable) and return its client state; None when there
        is none. Every process must see the same (several nodes share one directory)."""
        found = existing_checkpoint(self.last) is not None
        check_same_on_all_ranks(found, str(self.last), engine.device)
        errors = []
        for candidate in (self.last, self.last.with_name(LAST + ".old")):
            if not candidate.is_dir():
                continue
            if not (candidate / TAG).is_dir():
                raise CorruptCheckpoint(
                    f"{candidate}: not a checkpoint of this version (no {TAG}/: an earlier "
                    f"version's, or incomplete); pass --overwrite to start the run again")
            try:
                path, client = engine.load_checkpoint(str(candidate), tag=TAG)
            except Exception as e:  # a truncated or corrupt file: torch names neither
                errors.append(f"{candidate}: unreadable checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]})")
                logger.warning("%s; trying the previous checkpoint", errors[-1])
                continue
            logger.info("resumed from %s", candidate)
            return client
        if errors:
            raise CorruptCheckpoint("; ".join(errors))
        return None

    def remove_last(self) -> None:
        """Remove ``last/`` (and a ``last.old``) once the run is complete."""
        for name in (LAST, LAST + ".old"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def write_json(self, name: str, obj: Any) -> None:
        (self.path / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- the pieces


def finished_run(output_dir: str | os.PathLike, finished: str) -> bool:
    """Whether the run in ``output_dir`` finished (wrote ``finished``, its last file); said
    in the log, for ``--resume`` of a finished run does nothing."""
    path = Path(output_dir) / finished
    if path.is_file():
        logger.info("%s: the run finished already; nothing to resume", path)
    return path.is_file()

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


def remove_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Claim ``output_dir`` (:func:`lock_run_dir`), then remove the temporary directories a
    crash left while a checkpoint was written (``.last.tmp-*``, ``.best.tmp-*``); returns
    their names."""
    output_dir = Path(output_dir)
    lock_run_dir(output_dir)
    stale = [*output_dir.glob(f".{LAST}.tmp-*"), *output_dir.glob(f".{BEST}.tmp-*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [path.name for path in stale]


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


def existing_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` if it is a complete checkpoint directory, else its ``.old`` copy left by a
    crash during :func:`replace_dir`, else None."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


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
            if os.environ.get(CRASH_ENV):  # a torn line for the crash tests
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
