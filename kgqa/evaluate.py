"""Evaluation of cloze-form factoid QA (paper section 4, Table 6; REFERENCE.md "QA").

* Accuracy: a question is right only if **every** [MASK] gets its gold word piece as the top-1
  prediction. It is computed by the ``evaluate`` metric module kept in the repository
  (``kgqa/metrics/cloze_accuracy``, loaded by path, never from the Hub); :func:`predict` gives
  it one sequence of predicted and one of gold piece ids per question.
* Predictions file (:func:`write_predictions`): one JSON object per question with its id, the
  question, the gold answer, the predicted answer (the predicted pieces decoded) and whether it
  is right.
* Report (``python -m kgqa.evaluate report RUN_DIR... --out DIR``, :mod:`kgqa.report`): the
  runs' test accuracy in the form of paper Table 6, mean ± sample std over seeds.
* User setting (``python -m kgqa.evaluate user RUN_DIR...``, :mod:`kgqa.user_setting`): the
  test questions answered as ``kgqa.ask`` answers a user, without the annotated topic and the
  answer's length, beside the protocol's figure; ``python -m kgqa.evaluate linker``: how often
  the topic linker finds the annotated topic.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hitter_core.cli import run_cli
from hitter_core.runtime import crash_point
from kgqa.report import METRICS_FILE, write_predictions, write_report

if TYPE_CHECKING:  # the evaluate package takes ~1 s to import: only where a metric is computed
    import evaluate

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "cloze_accuracy"
__all__ = ["METRICS_FILE", "accuracy", "load_metric", "predict", "write_predictions"]


def load_metric() -> evaluate.EvaluationModule:
    """The cloze-accuracy metric module of this repository (offline)."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))


# ----------------------------------------------------------------------------- prediction


@dataclass
class ClozePredictions:
    """Per question, in loader order: predicted and gold piece ids (one per [MASK]), and
    whether every piece is right."""

    predicted: list[list[int]]
    gold: list[list[int]]
    correct: list[bool]


@torch.no_grad()
def predict(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> ClozePredictions:
    """Top-1 piece at every [MASK] of every question; ``model`` is a
    :class:`kgqa.model.KGEnhancedLM` (run in eval mode, its mode restored after)."""
    was_training = model.training
    model.eval()
    out = ClozePredictions([], [], [])
    try:
        for batch in batches:
            B = len(batch["input_ids"])
            crash_point("predict")
            res = model(**{k: v.to(device) for k, v in batch.items()})
            top = res.log_probs.argmax(-1)  # (M,)
            counts = torch.bincount(res.rows, minlength=B)  # (B,) masks per question
            wrong = torch.zeros(B, dtype=torch.long, device=top.device)
            wrong.index_add_(0, res.rows, (top != res.labels).long())  # (B,)
            sizes = counts.tolist()
            out.predicted += [p.tolist() for p in top.cpu().split(sizes)]
            out.gold += [g.tolist() for g in res.labels.cpu().split(sizes)]
            out.correct += (wrong == 0).tolist()
    finally:
        model.train(was_training)
    return out


def accuracy(predictions: ClozePredictions, metric: evaluate.EvaluationModule | None = None
             ) -> dict[str, float]:
    """``{"accuracy", "correct", "total"}`` through the metric module."""
    metric = metric if metric is not None else load_metric()
    return metric.compute(predictions=predictions.predicted, references=predictions.gold)


def prediction_records(
    examples: Sequence[dict[str, Any]], predictions: ClozePredictions, tokenizer: Any
) -> list[dict[str, Any]]:
    """One record per question: ``question_id, question, answer`` (gold), ``predicted`` (the
    predicted pieces decoded), ``correct``; ``examples`` are the cloze rows in loader order."""
    if len(examples) != len(predictions.predicted):
        raise ValueError(f"{len(examples)} examples, {len(predictions.predicted)} predictions")
    decoded = tokenizer.batch_decode(predictions.predicted)
    return [
        {
            "question_id": ex["question_id"],
            "question": ex["question"],
            "answer": ex["answer"],
            "predicted": text,
            "correct": ok,
        }
        for ex, text, ok in zip(examples, decoded, predictions.correct, strict=True)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kgqa.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="accuracy table over runs (mean ± std over seeds)")
    rep.add_argument("runs", nargs="+", help="run directories or metrics.json files")
    rep.add_argument("--out", default=None, help="write report.json and report.md here")
    user = sub.add_parser("user", help="answer a run's test questions as kgqa.ask answers a "
                          "user: linked topic, unknown answer length, entity answers")
    user.add_argument("runs", nargs="+", help="finished run directories (holding metrics.json "
                      "and best/)")
    user.add_argument("--split", default="test")
    user.add_argument("--data-dir", type=Path, default=None,
                      help="data root (default $KGQA_DATA_DIR)")
    user.add_argument("--max-masks", type=int, default=4)
    user.add_argument("--min-entity-p", type=float, default=None,
                      help="mean probability per piece an entity answer needs (default: ask's)")
    user.add_argument("--names", action="store_true",
                      help="a plain LM also answers with the graph's entity names")
    link = sub.add_parser("linker", help="how often the topic linker (kgqa.linker) finds the "
                          "annotated topic of the QA questions")
    link.add_argument("--splits", default="dev,test")
    link.add_argument("--data-dir", type=Path, default=None,
                      help="data root (default $KGQA_DATA_DIR)")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(write_report(args.runs, args.out))
        return
    import transformers

    from kgqa.user_setting import format_summary, print_linker_accuracy, user_setting

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.command == "linker":
        print_linker_accuracy(args.data_dir, args.splits.split(","))
        return
    for run in args.runs:
        kwargs = {} if args.min_entity_p is None else {"min_entity_p": args.min_entity_p}
        summary = user_setting(run, args.data_dir, args.split, args.max_masks, args.names,
                               **kwargs)
        print(format_summary(run, summary), flush=True)


if __name__ == "__main__":  # a missing run or runs that cannot share a row: one line
    sys.exit(run_cli(main, user_errors=(ValueError,)))
