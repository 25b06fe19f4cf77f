"""QA fine-tuning of the KG-enhanced masked LM on a DeepSpeed engine (paper section 4,
appendix B; REFERENCE.md "QA").

One run = one dataset, one split, one seed::

    deepspeed --num_gpus 1 --module kgqa.train --dataset webqsp --split filtered \\
        --lm minilm --kg_checkpoint runs/hitter-cpu-small/best --seed 333 --output_dir runs/qa/x

(``python -m kgqa.train ...`` runs the same single process without the launcher.)

* Model: :class:`kgqa.model.KGEnhancedLM`: the LM, HittER from its checkpoint with the
  :class:`~hitter_core.neighbours.NeighbourIndex` of FB15K-237 (seeded as HittER was trained),
  or no KG (the plain-LM baseline).
* Optimisation (:class:`kgqa.config.QATrainConfig`): AdamW, new cross-attention modules at
  ``lr_adapters`` (5e-5), pretrained weights (LM, and HittER unless frozen) at ``lr_pretrained``
  (5e-6); weight decay except on biases and LayerNorm weights; linear warm-up over 10% of the
  steps, then linear decay to 0; gradient clipping 1.0 (DeepSpeed, global norm); batch 16 per
  process; 20 epochs. LM weights that the LM checkpoint lacks (newly initialised: the MLM head
  of the offline MiniLM, never bert-base-uncased's) are new modules too and train at
  ``lr_adapters``.
* DeepSpeed: ``ds_config.json`` filled by :func:`hitter_core.distributed.resolve_ds_config`
  (micro batch, clipping, ZeRO stage 0-2 from the config, bf16 autocast on CUDA only).
  Without the launcher a single process is set up (gloo on CPU).
* Selection: dev accuracy (the dev split carved from train) every ``eval_every`` epochs; the
  best checkpoint is saved atomically to ``<output_dir>/best``; the test split is evaluated
  once, with that checkpoint. Outputs: ``config.json``, ``best/``, ``predictions.test.jsonl``,
  ``metrics.json`` (read by ``python -m kgqa.evaluate report``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    HfArgumentParser,
    get_linear_schedule_with_warmup,
    set_seed,
)

from hitter_core.checkpoint import write_dir_atomically
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.distributed import init_distributed as init_process_group
from hitter_core.distributed import resolve_ds_config
from hitter_core.model import HittER
from hitter_core.neighbours import NeighbourIndex, default_cache_dir
from kgqa.config import KGQAModelConfig, QATrainConfig
from kgqa.data import build_cloze_dataset, collate_cloze, load_qa_splits
from kgqa.evaluate import (
    METRICS_FILE,
    accuracy,
    load_metric,
    predict,
    prediction_records,
    write_predictions,
)
from kgqa.lm import resolve_lm
from kgqa.model import KGEnhancedLM

logger = logging.getLogger(__name__)

KG_DATASET = "fb15k-237"  # the graph HittER is pretrained on for QA (paper section 4)
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "topic_entity", "relation",
                 "answer_entity", "num_masks")


@dataclass
class RunOptions:
    """Bookkeeping of one run (the hyper-parameters are in QATrainConfig)."""

    ds_config: str | None = None  # None: the repository's ds_config.json
    eval_every: int = 1  # epochs between dev evaluations; the last epoch is always evaluated
    patience: int = 0  # dev evaluations without improvement before stopping; 0 = never stop
    eval_batch_size: int = 64
    max_train_examples: int | None = None  # smoke runs: the first n train questions only
    max_eval_examples: int | None = None  # smoke runs: the first n dev / test questions only
    cache_dir: str | None = None  # cloze datasets, neighbour index; None: ~/.cache/hitter-kgqa
    local_rank: int = -1  # set by the deepspeed launcher


# ----------------------------------------------------------------------------- set-up


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): the process group of the launcher, or a world of one
    (``hitter_core.distributed.init_distributed``: nccl on CUDA, gloo on CPU)."""
    rank, world = init_process_group()
    if not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return rank, world, device


def build_model(
    config: KGQAModelConfig, kg: KnowledgeGraph | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[KGEnhancedLM, set[int]]:
    """The model of ``config`` and the ids of the LM parameters its checkpoint lacked (newly
    initialised). With a HittER checkpoint, ``kg`` (FB15K-237) gives the neighbour index,
    built with HittER's neighbour-order seed (cached under ``cache_dir``)."""
    lm, info = BertForMaskedLM.from_pretrained(resolve_lm(config.lm), output_loading_info=True)
    missing = set(info["missing_keys"])
    names: dict[int, list[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):  # tied weights: several names
        names.setdefault(id(p), []).append(name)
    fresh = {pid for pid, ns in names.items() if all(n in missing for n in ns)}
    hitter = neighbours = None
    if config.kg_checkpoint is not None:
        if kg is None:
            raise ValueError("a HittER checkpoint needs the knowledge graph it was trained on")
        hitter = HittER.from_pretrained(config.kg_checkpoint)
        if (hitter.config.num_entities, hitter.config.num_relations) != (
            kg.num_entities, kg.num_relations
        ):
            raise ValueError(
                f"{config.kg_checkpoint}: HittER has {hitter.config.num_entities} entities and "
                f"{hitter.config.num_relations} relations, {kg.name} {kg.num_entities} and "
                f"{kg.num_relations}"
            )
        neighbours = NeighbourIndex.build(
            kg, seed=hitter.config.neighbour_order_seed, cache_dir=cache_dir
        )
    return KGEnhancedLM(config, lm, hitter, neighbours), fresh


def optimizer_groups(
    model: KGEnhancedLM, train: QATrainConfig, fresh: set[int] = frozenset()
) -> list[dict[str, Any]]:
    """:meth:`KGEnhancedLM.optimizer_groups` (adapters at ``lr_adapters``, the rest at
    ``lr_pretrained``, no decay on biases and LayerNorm weights) with the ``fresh`` (newly
    initialised) parameters moved to ``lr_adapters``."""
    groups = []
    for g in model.optimizer_groups(train):
        kept = [p for p in g["params"] if id(p) not in fresh]
        moved = [p for p in g["params"] if id(p) in fresh]
        if kept:
            groups.append({**g, "params": kept})
        if moved:
            groups.append({**g, "params": moved, "lr": train.lr_adapters})
    return groups


def build_engine(
    model: KGEnhancedLM, train: QATrainConfig, total_steps: int, fresh: set[int] = frozenset(),
    ds_config: str | Path | None = None,
) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed engine over AdamW (:func:`optimizer_groups`) and the linear warm-up / decay
    schedule; the engine clips gradients and steps the schedule."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, train, fresh), lr=train.lr_adapters,
                                  fused=True)
    warmup = math.ceil(train.warmup_ratio * total_steps)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=resolve_ds_config(
            ds_config, micro_batch_size=train.batch_size, max_grad_norm=train.max_grad_norm,
            zero_stage=train.zero_stage, supported_zero_stages=(0, 1, 2),  # 3: shards weights
            bf16_available=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        ),
    )
    return engine


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the gold pieces at the [MASK] positions."""
    return model(batch).loss


# ----------------------------------------------------------------------------- the run


def _loader(
    ds: Dataset, batch_size: int, pad_id: int, sampler: DistributedSampler | None = None
) -> DataLoader:
    return DataLoader(ds.select_columns(list(MODEL_COLUMNS)), batch_size=batch_size,
                      sampler=sampler, collate_fn=partial(collate_cloze, pad_token_id=pad_id))


def _broadcast(value: Any) -> Any:
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_data(
    model_cfg: KGQAModelConfig, train: QATrainConfig, opts: RunOptions, cache_dir: Path
) -> tuple[KnowledgeGraph, Any, dict[str, Dataset]]:
    """FB15K-237, the tokenizer and the cloze datasets of train / dev / test."""
    data_dir = Path(train.data_dir) if train.data_dir else default_data_dir()
    kg = load_kg(data_dir / KG_DATASET)
    splits = load_qa_splits(data_dir, train.dataset, train.split, kg, train.dev_fraction)
    if not splits["dev"]:
        raise ValueError("no dev split to select the checkpoint on: dev_fraction must be > 0")
    if opts.max_train_examples is not None:
        splits["train"] = splits["train"][: opts.max_train_examples]
    if opts.max_eval_examples is not None:
        for name in ("dev", "test"):
            splits[name] = splits[name][: opts.max_eval_examples]
    tokenizer = AutoTokenizer.from_pretrained(resolve_lm(model_cfg.lm))
    data = {name: build_cloze_dataset(splits[name], tokenizer, cache_dir / "cloze")
            for name in ("train", "dev", "test")}
    return kg, tokenizer, data


def fit(
    engine: deepspeed.DeepSpeedEngine, train_loader: DataLoader, dev_loader: DataLoader,
    epochs: int, opts: RunOptions, best_dir: Path,
) -> tuple[float, int, list[dict[str, Any]]]:
    """The training loop: epochs of shuffled batches, dev accuracy every ``eval_every``
    epochs (process 0), the best model saved to ``best_dir``. Returns (best dev accuracy,
    its epoch, per-epoch history)."""
    rank, device, metric = dist.get_rank(), engine.device, load_metric()
    best, best_epoch, since_best, history = -1.0, 0, 0, []
    for epoch in range(1, epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        engine.train()
        t0, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=True if rank else None, mininterval=5)  # None: off unless a tty
        for batch in bar:
            loss = compute_loss(engine, {k: v.to(device) for k, v in batch.items()})
            engine.backward(loss)
            engine.step()  # clipping, AdamW, schedule
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        entry = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                 "seconds": time.time() - t0}
        history.append(entry)
        stop = False
        if epoch % opts.eval_every == 0 or epoch == epochs:
            if rank == 0:
                dev = accuracy(predict(engine.module, dev_loader, device), metric)
                entry["dev_accuracy"] = dev["accuracy"]
                if dev["accuracy"] > best:
                    best, best_epoch, since_best = dev["accuracy"], epoch, 0
                    write_dir_atomically(best_dir, engine.module.save_pretrained)
                else:
                    since_best += 1
                stop = opts.patience > 0 and since_best >= opts.patience
                logger.info("epoch %d: loss %.4f, dev accuracy %.4f (best %.4f, epoch %d), "
                            "%.0f s", epoch, entry["train_loss"], dev["accuracy"], best,
                            best_epoch, entry["seconds"])
            stop = _broadcast(stop)
        elif rank == 0:
            logger.info("epoch %d: loss %.4f, %.0f s", epoch, entry["train_loss"],
                        entry["seconds"])
        if stop:
            logger.info("no dev improvement in %d evaluations: stopping", opts.patience)
            break
    if dist.get_world_size() > 1:
        dist.barrier()
    return best, best_epoch, history


def evaluate_best(
    best_dir: Path, neighbours: NeighbourIndex | None, test: Dataset, tokenizer: Any,
    opts: RunOptions, device: torch.device, predictions_file: Path,
) -> dict[str, Any]:
    """Test accuracy of the checkpoint in ``best_dir`` (reloaded from disk), once; writes the
    predictions file."""
    model = KGEnhancedLM.from_pretrained(best_dir, neighbours).to(device)
    preds = predict(model, _loader(test, opts.eval_batch_size, tokenizer.pad_token_id), device)
    examples = test.select_columns(["question_id", "question", "answer"]).to_list()
    write_predictions(prediction_records(examples, preds, tokenizer), predictions_file)
    return accuracy(preds)


def run(model_cfg: KGQAModelConfig, train: QATrainConfig, opts: RunOptions) -> dict[str, Any]:
    """Fine-tune, select on dev, test once; returns (and on process 0 writes) the metrics."""
    rank, world, device = init_distributed()
    set_seed(train.seed)
    out_dir = Path(train.output_dir)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    kg, tokenizer, data = load_data(model_cfg, train, opts, cache_dir)
    model_cfg.mask_token_id = tokenizer.mask_token_id  # derived from the LM, not chosen
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"model": asdict(model_cfg), "train": asdict(train), "run": asdict(opts)}
        (out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    model, fresh = build_model(model_cfg, kg, cache_dir)
    if model.neighbours is not None:
        model.neighbours = model.neighbours.to(device)
    if rank == 0:
        n_new = sum(p.numel() for p in model.parameters() if id(p) in fresh)
        logger.info("LM weights newly initialised (trained at lr_adapters): %d", n_new)
    sampler = DistributedSampler(data["train"], num_replicas=world, rank=rank, shuffle=True,
                                 seed=train.seed)
    train_loader = _loader(data["train"], train.batch_size, tokenizer.pad_token_id, sampler)
    dev_loader = _loader(data["dev"], opts.eval_batch_size, tokenizer.pad_token_id)
    engine = build_engine(model, train, train.epochs * len(train_loader), fresh, opts.ds_config)

    started = time.time()
    best, best_epoch, history = fit(engine, train_loader, dev_loader, train.epochs, opts,
                                    out_dir / "best")
    train_seconds = time.time() - started
    if rank != 0:
        return {}
    test = evaluate_best(out_dir / "best", model.neighbours, data["test"], tokenizer, opts, device,
                     out_dir / "predictions.test.jsonl")
    kg_mode = "none" if model.hitter is None else (
        "frozen" if model_cfg.freeze_kg else "co-trained")
    metrics = {
        "dataset": train.dataset, "split": train.split, "lm": Path(model_cfg.lm).name,
        "kg": kg_mode, "kg_checkpoint": model_cfg.kg_checkpoint, "seed": train.seed,
        "best_epoch": best_epoch, "dev": {"accuracy": best, "total": len(data["dev"])},
        "test": test, "epochs_run": len(history), "history": history,
        "train_examples": len(data["train"]), "train_seconds": train_seconds,
        "world_size": world, "device": str(device), "zero_stage": train.zero_stage,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("test accuracy %.4f (%d / %d), best epoch %d, dev %.4f", test["accuracy"],
                test["correct"], test["total"], best_epoch, best)
    return metrics


def parse_args(argv: Sequence[str] | None = None
               ) -> tuple[KGQAModelConfig, QATrainConfig, RunOptions]:
    parser = HfArgumentParser((KGQAModelConfig, QATrainConfig, RunOptions))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if rank0 else logging.WARNING, stream=sys.stdout)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return run(*parse_args(argv))


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
