"""QA fine-tuning of the KG-enhanced masked LM on a DeepSpeed engine (paper section 4,
appendix B; REFERENCE.md "QA").

One run = one dataset, one split, one seed (``recipes/finetune_qa.sh`` loops over seeds)::

    python -m kgqa.train --preset qa-webqsp-minilm-cpu [--data-dir D] [--output-dir O] \\
        [--ds-config F] model.kg_checkpoint=runs/hitter/best train.seed=334

(the same flag style as ``python -m hitter_core.train``; the deepspeed launcher runs the same
code on several processes.)

* Model (:mod:`kgqa.model`): the LM, HittER from its checkpoint (or no KG: the plain-LM
  baseline) and the reader ``model.reader`` names (:mod:`kgqa.readers`: the paper's
  cross-attention adapters, a head, or both); batches carry the topic entities'
  neighbourhoods in HittER's graph (:mod:`kgqa.batches`).
* Data: the prepared splits (:func:`kgqa.prepare.load_qa_splits`, prepared on first use).
* Optimisation (:class:`kgqa.config.QATrainConfig`): AdamW, the reader's new modules (the
  paper's cross-attention adapters, a head) at ``lr_new`` (5e-5), pretrained weights
  (LM, and HittER unless frozen) at ``lr_pretrained`` (5e-6); weight decay except on biases
  and LayerNorm weights; linear warm-up over 10% of the steps, then linear decay to 0
  (``hitter_core.optim``); gradient clipping 1.0 (DeepSpeed, global norm); batch 16 per
  process; 20 epochs. LM weights that the LM checkpoint lacks
  (the MLM head of the offline MiniLM, never bert-base-uncased's) train at ``lr_new``.
* Selection: dev accuracy (the dev split carved from train) every ``eval_every`` epochs; the
  best model and its tokenizer are saved atomically to ``<output_dir>/best``; the test split is
  evaluated once, with that checkpoint. Outputs: ``run_config.yaml``, ``best/``,
  ``predictions.test.jsonl``, ``metrics.json`` (read by ``python -m kgqa.evaluate report``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence, Set
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from hitter_core.checkpoint import hitter_identity
from hitter_core.cli import add_config_arguments, add_run_arguments, apply_run_arguments, run_cli
from hitter_core.config import DEFAULT_KG
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.distributed import init_distributed, initialize_engine
from hitter_core.neighbours import NeighbourIndex, default_cache_dir
from hitter_core.optim import linear_schedule
from hitter_core.precision import resolve_precision
from hitter_core.run_dir import MetricsLogger, RunDir, finished_run
from hitter_core.runtime import crash_point
from hitter_core.sections import load_sections
from kgqa.batches import MODEL_COLUMNS, ClozeCollator, compute_loss
from kgqa.checkpoint import OUTPUTS, QATrainState, restore_rng_states, rng_states
from kgqa.config import QA_SCHEMA, KGQAConfig, QATrainConfig
from kgqa.data import answer_is_neighbour
from kgqa.evaluate import (
    METRICS_FILE,
    accuracy,
    load_metric,
    predict,
    prediction_records,
    write_predictions,
)
from kgqa.lm import load_tokenizer
from kgqa.model import KGEnhancedLM, build_model, build_neighbour_index
from kgqa.model_card import qa_card
from kgqa.prepare import cloze_splits
from kgqa.report import PREDICTIONS_FILE, run_variant

logger = logging.getLogger(__name__)
DEFAULT_PRESET = "qa-paper"


def optimizer_groups(
    model: KGEnhancedLM, train: QATrainConfig, fresh: Set[str] = frozenset()
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters (each once; tied weights once):
    the reader's new modules (adapters, head: ``KGEnhancedLM.new_modules``) and the ``fresh``
    (newly initialised, by name) LM weights at ``lr_new``,
    every other (pretrained) weight at ``lr_pretrained``; weight decay on every parameter
    except biases and LayerNorm weights (REFERENCE.md)."""
    no_decay = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, nn.LayerNorm):
                no_decay.add(id(p))
    new = {id(p) for a in model.new_modules() for p in a.parameters()}
    new |= {id(p) for n, p in model.named_parameters() if n in fresh}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            lr = train.lr_new if id(p) in new else train.lr_pretrained
            wd = 0.0 if id(p) in no_decay else train.weight_decay
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_engine(
    model: KGEnhancedLM, train: QATrainConfig, total_steps: int, fresh: Set[str] = frozenset(),
    ds_config: str | Path | None = None, device: torch.device | str = "cpu",
) -> Any:
    """DeepSpeed engine over AdamW (:func:`optimizer_groups`) and the linear warm-up / decay
    schedule; the engine clips gradients (global norm) and steps the schedule, and autocasts
    the forward to bf16 where ``train.precision`` resolves to it on ``device``."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, train, fresh), lr=train.lr_new,
                                  fused=True)
    return initialize_engine(
        model, optimizer, linear_schedule(optimizer, total_steps, train.warmup_ratio), ds_config,
        micro_batch_size=train.batch_size, max_grad_norm=train.max_grad_norm,
        zero_stage=train.zero_stage, supported_zero_stages=(0, 1, 2),  # 3 shards weights
        bf16_available=resolve_precision(train.precision, device) == "bf16",
    )


def _broadcast(value: Any) -> Any:
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """Sets up data, model, DeepSpeed engine and output directory; :meth:`fit` fine-tunes and
    selects on dev, :meth:`test` evaluates the best checkpoint on the test split once."""

    def __init__(
        self, model_config: KGQAConfig, train_config: QATrainConfig,
        ds_config: str | Path | None = None, resume: bool = False, overwrite: bool = False,
    ) -> None:
        cfg = self.train_config = train_config
        model_config.check_reader()  # before any work: the reader and kg_checkpoint agree
        self.model_config = model_config  # as asked for (model cards)
        self.rank, self.world_size, self.device = init_distributed()
        transformers.set_seed(cfg.seed)
        self.run = RunDir(cfg.output_dir, OUTPUTS)
        self.output_dir, self.best_dir = self.run.path, self.run.best
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        if self.rank == 0:  # refuse, resume or overwrite; the resolved config first
            self.run.claim({"model": model_config, "train": cfg}, resume, overwrite)
        if self.world_size > 1:
            dist.barrier()

        self.tokenizer = load_tokenizer(model_config.lm)
        # The graph the questions are linked to (HittER's, the text baseline's, the report's).
        self.kg = kg = load_kg(data_dir / DEFAULT_KG)
        self.data = self._load_data(data_dir, cache_dir, model_config, kg)
        self.model, fresh = build_model(model_config)
        self.model.mask_token_id = self.tokenizer.mask_token_id
        self.neighbours: NeighbourIndex | None = None
        if self.model.hitter is not None:
            kg_name = self.model.config.kg_config["dataset"]
            if kg_name != DEFAULT_KG:  # the QA entity ids are DEFAULT_KG's
                raise ValueError(f"{model_config.kg_checkpoint}: HittER was trained on "
                                 f"{kg_name}; QA questions are linked to {DEFAULT_KG}")
            self.neighbours = build_neighbour_index(
                self.model.config.kg_config, data_dir, cache_dir, kg=kg)
        self.model.head.set_tables(kg, self.tokenizer)  # names etc. the reader keeps
        if self.rank == 0:
            n_new = sum(p.numel() for n, p in self.model.named_parameters() if n in fresh)
            logger.info("LM weights newly initialised (trained at lr_new): %d", n_new)

        sampler = DistributedSampler(self.data["train"], num_replicas=self.world_size,
                                     rank=self.rank, shuffle=True, seed=cfg.seed)
        self.train_loader = self.loader("train", cfg.batch_size, sampler)
        self.dev_loader = self.loader("dev", cfg.eval_batch_size)
        total_steps = cfg.epochs * len(self.train_loader)
        self.engine = build_engine(self.model, cfg, total_steps, fresh, ds_config, self.device)
        self.device = self.engine.device
        self.state = self._resume() if resume else QATrainState()
        self.metrics = None
        if self.rank == 0:
            self.run.write_json("ds_config.json", self.engine.config)
            self.metrics = MetricsLogger(self.output_dir)
            self.metrics.truncate_after(self.state.epoch)  # a resumed run redoes later epochs

    def _resume(self) -> QATrainState:
        """The state in ``last/`` (engine and RNG states restored), or a fresh one."""
        client = self.run.load_last(self.engine)
        if client is None:
            return QATrainState()
        restore_rng_states(client, self.collate_generator)
        state = QATrainState.from_dict(client["state"])
        logger.info("resumed after epoch %d", state.epoch)
        return state

    @property
    def collate_generator(self) -> torch.Generator | None:
        """The generator of the training batches' random neighbourhoods (saved in last/)."""
        return self.train_loader.collate_fn.generator

    def _load_data(
        self, data_dir: Path, cache_dir: Path, model_config: KGQAConfig,
        kg: KnowledgeGraph | None,
    ) -> dict[str, Dataset]:
        """The cloze datasets of train / dev / test; process 0 first, so that it alone writes
        the caches (prepared splits, tokenized cloze sets) and the others read them."""
        for rank in sorted({0, self.rank}):
            if rank == self.rank:
                data = self._read_data(data_dir, cache_dir, model_config, kg)
            if self.world_size > 1 and rank == 0:
                dist.barrier()
        return data

    def _read_data(
        self, data_dir: Path, cache_dir: Path, model_config: KGQAConfig,
        kg: KnowledgeGraph | None,
    ) -> dict[str, Dataset]:
        data, self.true_topics = cloze_splits(model_config, self.train_config, self.tokenizer,
                                              kg, data_dir, cache_dir)
        return data

    def loader(
        self, split: str, batch_size: int, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        """Batches of a split; training ones (with a sampler) draw random neighbourhoods from
        a generator seeded by (seed, rank), the others take the fixed first neighbours."""
        train = sampler is not None
        collate = ClozeCollator(
            self.tokenizer.pad_token_id, self.neighbours, self.model.config.max_neighbours,
            train=train, seed=self.train_config.seed * 4099 + self.rank,
        )
        return DataLoader(self.data[split].select_columns(list(MODEL_COLUMNS)),
                          batch_size=batch_size, sampler=sampler, collate_fn=collate)

    def _save_best(self, tmp: Path) -> None:
        self.engine.module.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        qa_card(tmp, self.model_config, self.train_config, self.state.best, self.state.best_at,
                shown_as=self.best_dir)

    def fit(self, on_epoch: Callable[[int], None] | None = None) -> float:
        """Epochs of shuffled batches, dev accuracy every ``eval_every`` epochs (process 0),
        the best model saved to ``best/``, early stopping after ``patience`` evaluations
        without improvement, ``last/`` after every epoch (a resumed run continues after the
        last finished epoch). ``on_epoch(epoch)`` is called after each (tests). Returns the
        best dev accuracy."""
        cfg, engine, metric, st = self.train_config, self.engine, load_metric(), self.state
        for epoch in range(st.epoch + 1, cfg.epochs + 1):
            if st.stopped:
                break
            self.train_loader.sampler.set_epoch(epoch)
            engine.train()
            t0, losses = time.time(), []
            bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                       disable=True if self.rank else None, mininterval=5)  # None: tty only
            for batch in bar:
                loss = compute_loss(engine, {k: v.to(self.device) for k, v in batch.items()})
                engine.backward(loss)
                crash_point("train-step")
                engine.step()  # clipping, AdamW, schedule
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            entry = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                     "seconds": time.time() - t0}
            st.history.append(entry)
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                if self.rank == 0:
                    dev = accuracy(predict(engine.module, self.dev_loader, self.device), metric)
                    entry["dev_accuracy"] = dev["accuracy"]
                    if st.record(dev["accuracy"], epoch, cfg.patience):
                        self.run.write("best", self._save_best)
                    logger.info("epoch %d: loss %.4f, dev accuracy %.4f (best %.4f, epoch %d), "
                                "%.0f s", epoch, entry["train_loss"], dev["accuracy"],
                                st.best, st.best_at, entry["seconds"])
                st.stopped = _broadcast(st.stopped)
            elif self.rank == 0:
                logger.info("epoch %d: loss %.4f, %.0f s", epoch, entry["train_loss"],
                            entry["seconds"])
            st.epoch, st.train_seconds = epoch, st.train_seconds + time.time() - t0
            if self.metrics is not None:
                self.metrics.log({"step": epoch, **entry}, prefix="qa/")
            self.run.save_last(engine, st, **rng_states(self.collate_generator))
            if on_epoch is not None:
                on_epoch(epoch)
            if st.stopped:
                logger.info("no dev improvement in %d evaluations: stopping", cfg.patience)
        return st.best

    def test(self) -> dict[str, Any] | None:
        """Test accuracy of ``best/`` (reloaded from disk), once, on process 0: writes the
        predictions file and ``metrics.json`` and returns the metrics (None elsewhere)."""
        if self.rank != 0:
            return None
        cfg, model_cfg = self.train_config, self.model.config
        model = KGEnhancedLM.from_pretrained(self.best_dir).to(self.device)
        test_loader = self.loader("test", cfg.eval_batch_size)
        preds = predict(model, test_loader, self.device)
        examples = self.data["test"].select_columns(["question_id", "question", "answer"])
        records = prediction_records(examples.to_list(), preds, self.tokenizer)
        topics = [self.true_topics.get(q) for q in self.data["test"]["question_id"]]
        linked = answer_is_neighbour([-1 if t is None else t for t in topics],
                                     self.data["test"]["answer_entity"], self.kg)
        for record, is_neighbour in zip(records, linked, strict=True):
            record["answer_is_neighbour"] = is_neighbour
        write_predictions(records, self.output_dir / PREDICTIONS_FILE)
        test = accuracy(preds)
        kg_mode = "none" if model.hitter is None else (
            "frozen" if model_cfg.freeze_kg else "co-trained")
        metrics = {
            "dataset": cfg.dataset, "split": cfg.split, "lm": Path(model_cfg.lm).name,
            "kg": kg_mode, "kg_checkpoint": model_cfg.kg_checkpoint, "seed": cfg.seed,
            "kg_identity": None if model_cfg.kg_checkpoint is None else hitter_identity(
                model_cfg.kg_checkpoint),  # which HittER: the report never mixes two
            "variant": run_variant(model_cfg, cfg),
            "best_epoch": self.state.best_at,
            "dev": {"accuracy": self.state.best, "total": len(self.data["dev"])},
            "test": test, "epochs_run": self.state.epoch, "history": self.state.history,
            "train_examples": len(self.data["train"]),
            "train_seconds": self.state.train_seconds,
            "world_size": self.world_size, "device": str(self.device),
            "zero_stage": cfg.zero_stage,
        }
        (self.output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        self.run.remove_last()  # the run is complete: best/ and the metrics remain
        qa_card(self.best_dir, self.model_config, cfg, self.state.best, self.state.best_at,
                test)
        logger.info("test accuracy %.4f (%d / %d), best epoch %d, dev %.4f", test["accuracy"],
                    test["correct"], test["total"], self.state.best_at, self.state.best)
        return metrics


def train(
    model_config: KGQAConfig, train_config: QATrainConfig, ds_config: str | Path | None = None,
    resume: bool = False, overwrite: bool = False,
) -> Trainer | None:
    """Fine-tune (``Trainer.fit``) and test the best checkpoint; returns the trainer. With
    ``resume``, a run that finished (its metrics.json exists) is left as it is (None)."""
    if resume and not overwrite and finished_run(train_config.output_dir, METRICS_FILE):
        return None
    trainer = Trainer(model_config, train_config, ds_config=ds_config, resume=resume,
                      overwrite=overwrite)
    trainer.fit()
    trainer.test()
    return trainer


# ----------------------------------------------------------------------------- command line


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[KGQAConfig, QATrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m kgqa.train",
        description="Fine-tune the KG-enhanced masked LM for cloze QA (DeepSpeed).",
    )
    add_config_arguments(parser, DEFAULT_PRESET)
    add_run_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    configs = load_sections(QA_SCHEMA, args.preset, args.overrides)
    apply_run_arguments(configs["train"], args)
    return configs["model"], configs["train"], args


def main(argv: Sequence[str] | None = None) -> int:
    model_config, train_config, args = parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if rank0 else logging.WARNING, stream=sys.stdout)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # per-checkpoint save/load bars
    train(model_config, train_config, ds_config=args.ds_config, resume=args.resume,
          overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    status = run_cli(main)
    if dist.is_initialized():  # here, not in main: tests call main in a live process group
        dist.destroy_process_group()
    sys.exit(status)
