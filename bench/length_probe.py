"""How much does not knowing the answer's length cost in the user setting, and how much does a
prior on it give back? (issue #35, kgqa/answer_length.py)

For each question of a QA run's split, the model reads the cloze with 1 to 4 masks (the topic
linked as ``kgqa.ask`` links it) and every entity name of the graph is scored at its own piece
count by the joint log-probability of its pieces (:class:`kgqa.ask.EntityNames`). Printed: the
share of questions whose best name is the gold answer (its word pieces) with every length
alike, with the gold length given, and with the length prior's bonus ``w * log p(n | question)``
for several weights w (:class:`kgqa.answer_length.AnswerLengths`, fit on the train questions).
The free-text fallback of ``kgqa.ask`` is left out, so the figures differ from
``kgqa.evaluate user`` by a few questions.

    python bench/length_probe.py runs/end_to_end/qa/webqsp-filtered-hitter/seed333 \\
        [--splits dev test] [--weights 0 0.25 0.5 1] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from hitter_core.cli import run_cli
from hitter_core.data import default_data_dir, load_kg
from kgqa.answer_length import LONGEST, AnswerLengths
from kgqa.ask import EntityNames, load_for_asking
from kgqa.batches import make_batch
from kgqa.data import QAExample
from kgqa.linker import load_linker
from kgqa.lm import word_pieces
from kgqa.prepare import load_qa_splits, train_questions

MAX_MASKS = 4


@torch.no_grad()
def scored_names(model, tokenizer, neighbours, names, linker, examples, top: int = 30) -> list:
    """Per question: {n: [(entity, joint log-probability)] of the ``top`` names of n pieces}."""
    out = []
    for ex in examples:
        topic = linker.link(ex.question).entity
        clozes = [QAExample("q", ex.question, topic if topic >= 0 else None,
                            " ".join([tokenizer.mask_token] * n), None)
                  for n in range(1, MAX_MASKS + 1)]
        batch = make_batch(clozes, tokenizer, neighbours, model.config.max_neighbours)
        batch.pop("labels")
        result = model(**batch)
        per_length = {}
        for n, logp in enumerate(result.log_probs.float().split(
                torch.bincount(result.rows).tolist()), 1):  # (n, V)
            ids, pieces = names.by_length[n]
            best = logp.gather(1, pieces.T).sum(0).topk(top)
            per_length[n] = list(zip(ids[best.indices].tolist(), best.values.tolist(),
                                     strict=True))
        out.append(per_length)
    return out


def accuracy(examples, scored, names, tokenizer, bonus_of, gold_length: bool = False) -> float:
    """% of questions whose best name (joint log-probability + ``bonus_of(question)[n]``) is
    the gold answer; ``gold_length``: names of the gold piece count only."""
    right = 0
    for ex, per_length in zip(examples, scored, strict=True):
        gold = word_pieces([ex.answer], tokenizer)[0]
        bonus = bonus_of(ex.question)
        candidates = [(v + bonus.get(n, 0.0), e) for n, named in per_length.items()
                      if not gold_length or n == min(len(gold), LONGEST) for e, v in named]
        right += bool(candidates) and names.pieces[max(candidates)[1]] == gold
    return 100 * right / max(len(examples), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/length_probe.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished kgqa.train run (with best/)")
    parser.add_argument("--splits", nargs="+", default=["dev", "test"])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    metrics = json.loads((args.run_dir / "metrics.json").read_text(encoding="utf-8"))
    model, tokenizer, neighbours, kg, linker, _ = load_for_asking(args.run_dir / "best",
                                                                  data_dir, MAX_MASKS)
    graph = kg or load_kg(data_dir / "fb15k-237")
    linker = linker or load_linker(data_dir, graph)
    names = EntityNames(graph, tokenizer, MAX_MASKS)
    lengths = AnswerLengths.fit(train_questions(data_dir, graph), tokenizer)
    print(f"{args.run_dir}: {metrics['dataset']} {metrics['split']}; the length prior guesses "
          "the answer's piece count (1-4, 5+) of")
    splits = load_qa_splits(data_dir, metrics["dataset"], metrics["split"], kg=graph)
    header = ["split", "every length alike", "gold length"] + [f"prior {w:g}" for w in args.weights]
    rows = []
    for split in args.splits:
        examples = splits[split]
        guessed = sum(max(p := lengths.model.posterior(ex.question), key=p.get)
                      == min(len(word_pieces([ex.answer], tokenizer)[0]), LONGEST)
                      for ex in examples)
        print(f"  {split}: {100 * guessed / len(examples):.1f}% of {len(examples)} questions")
        scored = scored_names(model, tokenizer, neighbours, names, linker, examples)
        row = [f"{split} ({len(examples)})",
               accuracy(examples, scored, names, tokenizer, lambda q: {}),
               accuracy(examples, scored, names, tokenizer, lambda q: {}, gold_length=True)]
        for w in args.weights:
            row.append(accuracy(examples, scored, names, tokenizer,
                                lambda q, w=w: lengths.log_bonus(q, w)))
        rows.append(row)
    print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join([row[0]] + [f"{v:.1f}" for v in row[1:]]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
