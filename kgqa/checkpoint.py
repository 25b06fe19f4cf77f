"""What a QA run keeps, in the run directory of :mod:`hitter_core.run_dir` (the same layout,
locking, resume and crash safety as stage 1)::

    best/                   the best model on dev and its tokenizer (save_pretrained)
    predictions.test.jsonl  metrics.json    at the end; metrics.json = the run finished

``last/`` (DeepSpeed's engine checkpoint, after every epoch) holds :class:`QATrainState` and
the RNG states as client state, and is removed when the run is complete: for MiniLM it holds
about 280 MB (weights and AdamW state) that nothing reads any more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hitter_core.run_dir import RunState
from kgqa.report import METRICS_FILE, PREDICTIONS_FILE

OUTPUTS = (PREDICTIONS_FILE, METRICS_FILE)  # run_dir.RUN_FILES + these; METRICS_FILE last


@dataclass
class QATrainState(RunState):
    """Progress of a QA run (``best``: dev accuracy, ``best_at``: its epoch)."""

    epoch: int = 0  # epochs finished
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_states(collate_generator: torch.Generator | None) -> dict[str, Any]:
    """The RNG states a resumed QA run needs to repeat the uninterrupted one: torch's (CPU,
    every CUDA device) and the training batches' neighbourhood sampler's."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "collate_rng": None if collate_generator is None else collate_generator.get_state()}


def restore_rng_states(client: Mapping[str, Any], collate_generator: torch.Generator | None
                       ) -> None:
    """Set the RNG states :func:`rng_states` saved."""
    torch.set_rng_state(client["torch_rng"])
    if client["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(client["cuda_rng"])
    if collate_generator is not None and client["collate_rng"] is not None:
        collate_generator.set_state(client["collate_rng"])
