"""Replay finished QA runs' test predictions with the code of this checkout.

For each run directory (``kgqa.train``'s output: ``run_config.yaml``, ``best/``,
``predictions.test.jsonl`` or its gzipped copy), load ``best/`` as a user would
(:func:`kgqa.model.load_qa_model`, so models saved by older versions go through the loader's
translation), rebuild the run's test split as training did (:func:`kgqa.train.cloze_splits`),
predict, and compare with the stored predictions question by question. A refactor that leaves
behaviour alone prints 0 differences and the stored accuracy::

    python bench/replay_predictions.py runs/e2e-bf16/qa/webqsp-filtered-hitter/seed333 [...]
        [--data-dir DIR] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from hitter_core.cli import run_cli
from hitter_core.config import DEFAULT_KG
from hitter_core.data import default_data_dir, load_kg
from hitter_core.neighbours import default_cache_dir
from hitter_core.sections import RUN_CONFIG_NAME, load_sections
from kgqa.batches import MODEL_COLUMNS, ClozeCollator
from kgqa.config import QA_SCHEMA
from kgqa.evaluate import accuracy, predict, prediction_records
from kgqa.model import load_qa_model
from kgqa.prepare import cloze_splits
from kgqa.report import predictions_file, read_predictions


def replay(run_dir: Path, data_dir: Path, cache_dir: Path) -> tuple[int, int, float]:
    """(questions, differing predictions, replayed accuracy) of one run."""
    configs = load_sections(QA_SCHEMA, run_dir / RUN_CONFIG_NAME)
    stored_file = predictions_file(run_dir)
    if stored_file is None:
        raise FileNotFoundError(f"{run_dir}: no predictions.test.jsonl(.gz)")
    model, tokenizer, neighbours = load_qa_model(run_dir / "best", data_dir, cache_dir)
    kg = load_kg(data_dir / DEFAULT_KG)
    data, _ = cloze_splits(configs["model"], configs["train"], tokenizer, kg, data_dir, cache_dir)
    test = data["test"]
    collate = ClozeCollator(tokenizer.pad_token_id, neighbours, model.config.max_neighbours)
    loader = DataLoader(test.select_columns(list(MODEL_COLUMNS)),
                        batch_size=configs["train"].eval_batch_size, collate_fn=collate)
    preds = predict(model, loader, model.device)
    records = prediction_records(
        test.select_columns(["question_id", "question", "answer"]).to_list(), preds, tokenizer)
    stored = {r["question_id"]: r for r in read_predictions(stored_file)}
    differ = [r["question_id"] for r in records
              if (r["predicted"], r["correct"]) != (stored[r["question_id"]]["predicted"],
                                                    stored[r["question_id"]]["correct"])]
    for qid in differ[:5]:
        new = next(r for r in records if r["question_id"] == qid)
        print(f"  {qid}: stored {stored[qid]['predicted']!r}, now {new['predicted']!r}")
    return len(records), len(differ), accuracy(preds)["accuracy"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/replay_predictions.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="kgqa.train run directories")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data root (default $KGQA_DATA_DIR)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prepared splits and tokenized sets (default ~/.cache/hitter-kgqa)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    cache_dir = args.cache_dir or default_cache_dir()
    failed = 0
    for run in args.runs:
        n, differ, acc = replay(run, data_dir, cache_dir)
        print(f"{run}: {n} questions, {differ} predictions differ, accuracy {acc:.4f}",
              flush=True)
        failed += differ > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
