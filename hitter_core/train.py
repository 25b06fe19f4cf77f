"""Link-prediction training of HittER (paper section 3.3; REFERENCE.md "Link prediction").

Each step takes B training triples and asks 2B queries: B tail queries (h, r) -> t and B head
queries through the reciprocal relation (t, r + R) -> h. Every query's neighbourhood is
sampled afresh with its ground-truth token removed and the neighbour-drop rate applied
(``NeighbourIndex.gather``). The loss is 1vsAll cross-entropy (label smoothing and the MEP
auxiliary term weighted sd / (1 + sd) come from the model), tail and head losses summed.
Adamax with decoupled weight decay, linear warm-up then linear decay, per-tensor gradient
clipping (``hitter_core.optim``). Every ``validate_every`` epochs the filtered valid MRR
(filter train + valid + test, as the reference) decides the best checkpoint and early
stopping; at the end the best model is tested (``hitter_core.evaluate``).

The loop runs on a DeepSpeed engine configured by ``ds_config.json`` (ZeRO stage 0, i.e.
data parallel; bf16 autocast as ``train.precision`` resolves, ``hitter_core.precision``), so
one process, several GPUs, several nodes and CPU processes (gloo) run this same code; without
a launcher the process forms a world of one. ``train.batch_size`` is per process (DeepSpeed's
micro batch): W processes take W times as many triples per step.

* Data order: epoch e visits a permutation seeded by (seed, e); process k of W takes the k-th
  of W equal slices. Before step s every process seeds torch with (seed, s, k), so sampling,
  MEP and dropout depend only on the step: a resumed run repeats the uninterrupted one.
* The run directory (``hitter_core.run_dir``, as stage 2's): ``last`` (the engine checkpoint)
  every ``save_every`` steps and after every validation, ``best`` on valid MRR. ``--resume``
  continues from ``last`` at its exact step, mid-epoch included (same world size and batch
  size required).
* ``train.compile``: each Transformer layer runs ``torch.compile``d over the static shapes; a
  compiled step that fails is redone eager, and training stays eager (``hitter_core.compiled``).
* Validation and test run on process 0 (other processes wait); metrics go to
  ``metrics.jsonl`` (and TensorBoard when installed), a progress bar shows loss and triples/s.

Command line (single process; ``recipes/pretrain_kg.sh`` wraps it in the DeepSpeed launcher)::

    python -m hitter_core.train --preset cpu-small [--data-dir DIR] [--output-dir DIR]
        [--ds-config ds_config.json] [--resume] [--no-keep-freed-memory] [section.key=value ...]

On CPU the command keeps freed memory in the process (``hitter_core.cpu_memory``) unless
``--no-keep-freed-memory`` is given; a mistake in the config ends in one ``error:`` line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from tqdm.auto import tqdm

from hitter_core.batches import compute_loss, epoch_shard, make_batch, step_seed
from hitter_core.checkpoint import (
    OUTPUTS,
    TEST_METRICS,
    LogWindow,
    TrainState,
    save_checkpoint,
    write_test_metrics,
)
from hitter_core.cli import add_config_arguments, add_run_arguments, apply_run_arguments, run_cli
from hitter_core.compiled import CompiledLayers
from hitter_core.config import DEFAULT_PRESET, HittERConfig, TrainConfig, load_config
from hitter_core.cpu_memory import add_memory_argument, keep_freed_memory
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.distributed import destroy_distributed, init_distributed, initialize_engine
from hitter_core.evaluate import evaluate, format_table
from hitter_core.model import HittER, HittERScorer
from hitter_core.neighbours import NeighbourIndex
from hitter_core.optim import build_optimizer, clip_grad_per_tensor_, linear_schedule
from hitter_core.precision import resolve_precision
from hitter_core.ranking import FilterIndex
from hitter_core.run_dir import MetricsLogger, RunDir, existing_checkpoint, finished_run
from hitter_core.runtime import crash_point

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the trainer


class Trainer:
    """Sets up data, model, DeepSpeed engine and output directory; :meth:`fit` trains,
    :meth:`test` evaluates the best checkpoint on the test split."""

    def __init__(
        self,
        model_config: HittERConfig,
        train_config: TrainConfig,
        kg: KnowledgeGraph | None = None,
        ds_config: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        cfg = self.train_config = train_config
        self.rank, self.world_size, device = init_distributed(cfg.device)
        self.kg, self.model_config = self._load_kg(kg, model_config), model_config
        self.run = RunDir(cfg.output_dir, OUTPUTS)
        self.output_dir, self.best_dir = self.run.path, self.run.best
        if self.rank == 0:  # refuse, resume or overwrite; the resolved config first
            self.run.claim({"model": model_config, "train": cfg}, resume, overwrite)
        if self.world_size > 1:
            dist.barrier()
        self._plan_steps()

        torch.manual_seed(cfg.seed)
        model = HittER(model_config)
        optimizer = build_optimizer(model, cfg)
        self.precision = resolve_precision(cfg.precision, device)
        self.engine = initialize_engine(
            model, optimizer, linear_schedule(optimizer, self.total_steps, cfg.warmup_ratio),
            ds_config, micro_batch_size=cfg.batch_size, max_grad_norm=cfg.max_grad_norm,
            engine_clips=not cfg.clip_per_tensor, bf16_available=self.precision == "bf16",
        )
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.lr_scheduler
        self.ds_config = self.engine.config  # resolved
        self.model: HittER = self.engine.module
        self.device = self.engine.device
        self.compiled = CompiledLayers(self.model, cfg.compile)  # train.compile

        index = NeighbourIndex.build(self.kg, seed=model_config.neighbour_order_seed)
        self.neighbour_index = index.to(self.device)
        self.filter_index = FilterIndex.build(self.kg)  # train + valid + test, as the reference
        self.train_triples = self.kg.train.to(self.device)

        self.state = self._resume() if resume else TrainState()
        self._clock: float | None = None  # perf_counter when training time last resumed
        self.metrics = None
        if self.rank == 0:
            self.run.write_json("ds_config.json", self.ds_config)
            self.metrics = MetricsLogger(self.output_dir)
            self.metrics.truncate_after(self.state.step)
            logger.info(
                "%s; %d processes x %d triples per step, %d steps per epoch, %d steps; "
                "%s parameters on %s, %s", self.kg, self.world_size, cfg.batch_size,
                self.steps_per_epoch, self.total_steps,
                f"{sum(p.numel() for p in self.model.parameters()):,}", self.device,
                self.precision,
            )

    def _load_kg(self, kg: KnowledgeGraph | None, model_config: HittERConfig) -> KnowledgeGraph:
        """``kg``, else the configured dataset; the model's entity and relation counts from it."""
        if kg is None:
            cfg = self.train_config
            data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
            kg = load_kg(data_dir / model_config.dataset, drop_unseen=cfg.drop_unseen)
        shape = (kg.num_entities, kg.num_relations)
        if (model_config.num_entities, model_config.num_relations) != shape:
            logger.info("model.num_entities/num_relations set from %s", kg)
            model_config.num_entities, model_config.num_relations = shape
        return kg

    def _plan_steps(self) -> None:
        """Steps per epoch (each process takes its equal slice), the total, the data layout."""
        cfg = self.train_config
        per_rank = len(self.kg.train) // self.world_size
        if per_rank < 1:
            raise ValueError(f"{len(self.kg.train)} train triples for {self.world_size} processes")
        self.steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
        self.total_steps = cfg.max_epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.layout = {"world_size": self.world_size, "batch_size": cfg.batch_size,
                       "steps_per_epoch": self.steps_per_epoch}

    def _resume(self) -> TrainState:
        """The state in ``last/`` (engine restored), or a fresh one when there is none. A
        mid-epoch resume replays the same data order only with the same data layout, so a
        checkpoint written with another world size, batch size or epoch length is refused."""
        client = self.run.load_last(self.engine)
        if client is None:
            return TrainState()
        if client["layout"] != self.layout:
            raise ValueError(
                f"{self.run.last} was written with {client['layout']}, this run has "
                f"{self.layout}; resume with the same number of processes and "
                f"train.batch_size, or start a new run")
        state = TrainState.from_dict(client["state"])
        logger.info("resumed at step %d", state.step)
        return state

    # ------------------------------------------------------------------ training

    def fit(self, on_step: Callable[[int], None] | None = None) -> TrainState:
        """Train until max_epochs / max_steps or early stopping. ``last`` is saved every
        ``save_every`` steps and after every validation (so the best-MRR and patience
        bookkeeping is never lost), and at the end. ``on_step(step)`` is called after every
        step (after its validation and checkpoint, if any), e.g. to stop a test run."""
        cfg, st, spe = self.train_config, self.state, self.steps_per_epoch
        bar = tqdm(
            total=self.total_steps, initial=st.step, desc="train", unit="step",
            disable=self.rank != 0, dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        self.engine.train()
        self._clock = time.perf_counter()  # st.train_seconds counts from here (validate)
        window, shown_loss = LogWindow(), "-"
        for epoch in range(st.step // spe, cfg.max_epochs):
            if st.step >= self.total_steps or st.stopped:
                break
            shard = epoch_shard(len(self.kg.train), epoch, cfg.seed, self.rank, self.world_size)
            for i in range(st.step - epoch * spe, spe):
                if st.step >= self.total_steps:
                    break
                indices = shard[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                stats = self._step(indices)
                window.add(stats, len(indices) * self.world_size)
                bar.update(1)
                # The loss shown is the last logged window's: reading it every step would
                # make the host wait for the device (a GPU step would lose its overlap).
                bar.set_postfix(
                    epoch=epoch + 1, loss=shown_loss, lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                    triples_s=f"{window.rate():.0f}", refresh=False,
                )
                if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                    logged = window.pop()
                    shown_loss = f"{logged['loss']:.4f}"
                    self._log({"epoch": st.step / spe, **logged,
                               "lr": self.scheduler.get_last_lr()[0]})
                validated = st.step % spe == 0 and (st.step // spe) % cfg.validate_every == 0
                if validated:
                    self.validate()
                    window = LogWindow()
                if validated or (cfg.save_every and st.step % cfg.save_every == 0):
                    self.save_last()
                if on_step is not None:
                    on_step(st.step)
                if st.stopped:
                    break
        bar.close()
        if st.validated_step != st.step:  # stopped by max_steps or between validations
            self.validate()
            self.save_last()
        return st

    def _step(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.compiled.run(lambda: self._run_step(indices))  # eager when not compiled

    def _run_step(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        torch.manual_seed(step_seed(self.train_config.seed, self.state.step, self.rank))
        batch = make_batch(self.train_triples[indices.to(self.device)], self.neighbour_index,
                           self.model_config)
        loss, stats = compute_loss(self.engine, batch)
        self.engine.backward(loss)
        crash_point("train-step")
        if self.train_config.clip_per_tensor:
            clip_grad_per_tensor_(self.model.parameters(), self.train_config.max_grad_norm)
        self.engine.step()
        self.state.step += 1
        return stats

    # ------------------------------------------------------------------ validation, checkpoints

    def validate(self) -> None:
        """Valid MRR on process 0; keeps ``best``, counts validations without improvement
        and sets ``stopped`` on every process after ``patience`` of them. The valid
        record of ``metrics.jsonl`` carries ``train_seconds``, the training time so far
        (validation excluded, checkpoint saves included): time to quality."""
        st, cfg = self.state, self.train_config
        st.validated_step = st.step
        if self._clock is not None:  # in fit: the training time up to here
            st.train_seconds += time.perf_counter() - self._clock
        stop = torch.zeros(1, device=self.device)
        if self.rank == 0:
            metrics = self._evaluate(self.model, "valid")
            mrr = metrics["both"]["mrr"]
            if improved := st.record(mrr, st.step, cfg.patience):
                valid = {"step": st.step, **metrics}
                save_checkpoint(self.best_dir, self.model, cfg,
                                json_files={"valid_metrics.json": valid}, card=valid)
            self._log({"epoch": st.step / self.steps_per_epoch,
                       **{f"valid_{k}": v for k, v in metrics["both"].items()},
                       "best_valid_mrr": st.best, "train_seconds": st.train_seconds},
                      prefix="valid/")
            logger.info("step %d: valid MRR %.4f (best %.4f at step %d)%s", st.step, mrr,
                        st.best, st.best_at, "" if improved else
                        f", {st.since_best}/{cfg.patience} without improvement")
            stop[0] = float(st.stopped)
        dist.broadcast(stop, src=0)
        st.stopped = bool(stop.item())
        if st.stopped and self.rank == 0:
            logger.info("early stopping at step %d", st.step)
        self._clock = time.perf_counter()

    def save_last(self) -> None:
        self.run.save_last(self.engine, self.state, layout=self.layout)

    def _evaluate(self, model: HittER, split: str) -> dict[str, Any]:
        return evaluate(
            HittERScorer(model, self.neighbour_index), self.kg, split,
            filter_index=self.filter_index, batch_size=self.train_config.eval_batch_size,
            device=self.device,
        )

    def _log(self, record: dict[str, Any], prefix: str = "train/") -> None:
        if self.metrics is not None:
            self.metrics.log({"step": self.state.step, **record}, prefix=prefix)

    def test(self) -> dict[str, Any] | None:
        """Test metrics of ``best`` on process 0 (None elsewhere): printed as a table and
        written to ``test_metrics.json`` / ``test_metrics.txt``."""
        metrics = None
        if self.rank == 0:
            best = existing_checkpoint(self.best_dir)
            model = HittER.from_pretrained(best).to(self.device)
            metrics = {"checkpoint": str(best), "dataset": self.kg.name,
                       "best_step": self.state.best_at, **self._evaluate(model, "test")}
            table = (f"{self.kg.name} test, filtered with train+valid+test; best valid MRR "
                     f"{self.state.best:.4f} at step {self.state.best_at}\n"
                     f"{format_table(metrics)}")
            write_test_metrics(self.output_dir, best, metrics, table, self.train_config)
            self._log({f"test_{k}": v for k, v in metrics["both"].items()}, prefix="test/")
            self.metrics.close()
            print(table, flush=True)
        dist.barrier()
        return metrics


def train(
    model_config: HittERConfig,
    train_config: TrainConfig,
    kg: KnowledgeGraph | None = None,
    ds_config: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> Trainer | None:
    """Train (``Trainer.fit``) and test the best checkpoint; returns the trainer, whose
    ``state`` and ``output_dir`` hold the outcome. ``kg`` defaults to the configured dataset.
    With ``resume``, a run that finished (its test_metrics.json exists) is left as it is
    (None), as in stage 2."""
    if resume and not overwrite and finished_run(train_config.output_dir, TEST_METRICS):
        return None
    trainer = Trainer(model_config, train_config, kg=kg, ds_config=ds_config, resume=resume,
                      overwrite=overwrite)
    trainer.fit(on_step=on_step)
    trainer.test()
    return trainer


# ---------------------------------------------------------------------------- command line


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[HittERConfig, TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m hitter_core.train",
        description="Train HittER for link prediction (1vsAll, DeepSpeed data parallel).",
    )
    add_config_arguments(parser, default_preset=DEFAULT_PRESET)
    add_run_arguments(parser)
    add_memory_argument(parser)
    args = parser.parse_intermixed_args(argv)
    model_config, train_config = load_config(args.preset, args.overrides)
    apply_run_arguments(train_config, args)
    return model_config, train_config, args


def main(argv: Sequence[str] | None = None) -> int:
    model_config, train_config, args = parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # per-checkpoint save/load bars
    on_cpu = train_config.device == "cpu" or (
        train_config.device == "auto" and not torch.cuda.is_available()
    )
    if on_cpu and not args.no_keep_freed_memory:
        keep_freed_memory()
    train(model_config, train_config, ds_config=args.ds_config, resume=args.resume,
          overwrite=args.overwrite)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
