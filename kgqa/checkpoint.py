"""What a QA run writes so that a crash loses at most one epoch, and so that one output
directory never mixes two runs (the QA counterpart of :mod:`hitter_core.checkpoint`).

Layout of ``output_dir``::

    run_config.yaml         the resolved configuration, at start; ``--resume`` must match it
    metrics.jsonl           one line per finished epoch (loss, seconds, dev accuracy), and
    tensorboard/            the same scalars when tensorboard is installed (as stage 1 writes
                            them: hitter_core.checkpoint.MetricsLogger)
    last/                   after every epoch: DeepSpeed's engine checkpoint (model, optimizer,
                            schedule) with the trainer's state and RNG states as client state;
                            removed when the run is complete
    best/                   the best model on dev and its tokenizer (save_pretrained)
    predictions.test.jsonl  metrics.json    at the end; metrics.json = the run finished

``last`` is written as stage 1 writes it: assembled under ``.last.tmp-<epoch>`` (by every
process: DeepSpeed saves each one's shard) and swapped in by process 0 with two renames
(:func:`hitter_core.checkpoint.replace_dir`); a crash leaves a complete ``last`` or
``last.old``. A resumed run drops the log lines of epochs after the one it resumes from.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hitter_core.checkpoint import (
    clean_run_dir,
    existing_checkpoint,
    lock_run_dir,
    replace_dir,
)
from hitter_core.faults import crash_point
from hitter_core.sections import RUN_CONFIG_NAME, check_same_config, save_sections

logger = logging.getLogger(__name__)

LAST, TAG = "last", "state"
RUN_FILES = (RUN_CONFIG_NAME, "metrics.jsonl", "tensorboard", LAST, LAST + ".old", "best",
             "best.old", "predictions.test.jsonl", "metrics.json")


@dataclass
class QATrainState:
    """Progress of a QA run, saved in ``last/`` after every epoch."""

    epoch: int = 0  # epochs finished
    best: float = -1.0  # best dev accuracy so far
    best_epoch: int = 0
    since_best: int = 0  # evaluations without improvement (early stopping)
    stopped: bool = False  # stopped early
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_output_dir(
    output_dir: Path, configs: Mapping[str, Any], resume: bool, overwrite: bool
) -> None:
    """Make ``output_dir`` ready for a run with ``configs`` (the resolved sections) and write
    its ``run_config.yaml``. A directory holding another run is refused unless ``resume``
    (whose saved ``run_config.yaml`` must equal ``configs``: a changed setting is an error
    naming it, :func:`hitter_core.sections.check_same_config`; the saved file is kept) or
    ``overwrite`` (the old run's files are removed first); a directory another process is
    writing to is refused (:func:`hitter_core.checkpoint.lock_run_dir`). Call on process 0
    only."""
    lock_run_dir(output_dir)
    held = [name for name in RUN_FILES if (output_dir / name).exists()]
    if held and overwrite:
        for name in held:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.warning("%s: removed the previous run (--overwrite): %s", output_dir,
                       ", ".join(held))
    elif held and not resume:
        raise FileExistsError(
            f"{output_dir} holds a run ({', '.join(held)}); pass --resume to continue it, "
            f"--overwrite to replace it, or choose another output directory")
    elif held and (output_dir / RUN_CONFIG_NAME).is_file():
        check_same_config(output_dir / RUN_CONFIG_NAME, configs)
    clean_run_dir(output_dir)  # temporaries left by a crash while a checkpoint was written
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / RUN_CONFIG_NAME).is_file():
        save_sections(output_dir / RUN_CONFIG_NAME, configs)


def save_last(engine: Any, output_dir: Path, state: QATrainState,
              collate_generator: torch.Generator | None) -> None:
    """Every process: the engine checkpoint (model, optimizer, schedule) + ``state`` + RNG
    states, written to ``last/`` atomically."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = output_dir / f".{LAST}.tmp-{state.epoch}"
    client = {
        "state": dataclasses.asdict(state),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "collate_rng": None if collate_generator is None else collate_generator.get_state(),
    }
    engine.save_checkpoint(str(tmp), tag=TAG, client_state=client, save_latest=False)
    crash_point("checkpoint-write")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        replace_dir(tmp, output_dir / LAST)
    if dist.is_initialized():
        dist.barrier()


def remove_last(output_dir: Path) -> None:
    """Remove ``last/`` (and a ``last.old``) once the run is complete: for MiniLM it holds
    about 280 MB (weights and AdamW state) that nothing reads any more."""
    for name in (LAST, LAST + ".old"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def load_last(engine: Any, output_dir: Path,
              collate_generator: torch.Generator | None) -> QATrainState | None:
    """Restore the engine, the RNG states and the trainer state from ``last/`` (or the
    ``last.old`` a crash left); None if there is none."""
    last = existing_checkpoint(output_dir / LAST)
    if last is None:
        return None
    path, client = engine.load_checkpoint(str(last), tag=TAG)
    if path is None:
        raise FileNotFoundError(f"{last}: an incomplete QA checkpoint (no {TAG}/); remove it "
                                f"or pass --overwrite")
    torch.set_rng_state(client["torch_rng"])
    if client["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(client["cuda_rng"])
    if collate_generator is not None and client["collate_rng"] is not None:
        collate_generator.set_state(client["collate_rng"])
    state = QATrainState(**client["state"])
    logger.info("resumed from %s after epoch %d", last, state.epoch)
    return state
