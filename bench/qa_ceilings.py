"""Ceilings of a KG variant's QA accuracy from saved test predictions, paired by seed with the
plain LM (issue "knowledge that helps"): what a perfect "none of these" would give (the KG
model's answer where the answer entity is a neighbour of the topic, the LM's elsewhere) and
what a perfect choice between the two models would give (right where either is right).

    python bench/qa_ceilings.py runs/kg-gain/webqsp-filtered/lm \
        runs/kg-gain/webqsp-filtered/copy-names

Each argument is a row directory holding ``seed<s>/predictions.test.jsonl`` (kgqa.train; or
the gzipped ``.jsonl.gz`` bench/results keeps); seeds present in both rows are paired.
Prints mean ± sample std over the seeds (%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from hitter_core.cli import run_cli
from kgqa.report import predictions_file, read_predictions


def predictions(row: Path, seed: str) -> dict[str, dict]:
    return {p["question_id"]: p for p in read_predictions(predictions_file(row / seed))}


def seeds_of(row: Path) -> set[str]:
    return {d.name for d in row.glob("seed*") if predictions_file(d) is not None}


def ceilings(lm: dict[str, dict], kg: dict[str, dict]) -> dict[str, float]:
    if lm.keys() != kg.keys():
        raise ValueError("the two runs predicted different test questions")
    n = len(lm)
    kg_acc = sum(p["correct"] for p in kg.values())
    abstain = sum(kg[q]["correct"] if kg[q]["answer_is_neighbour"] else lm[q]["correct"]
                  for q in lm)
    either = sum(kg[q]["correct"] or lm[q]["correct"] for q in lm)
    return {"kg model": 100 * kg_acc / n, "perfect none-of-these": 100 * abstain / n,
            "either right": 100 * either / n}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/qa_ceilings.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("lm_row", type=Path, help="the plain LM's row directory")
    parser.add_argument("kg_row", type=Path, help="the KG variant's row directory")
    args = parser.parse_args(argv)
    seeds = sorted(seeds_of(args.lm_row) & seeds_of(args.kg_row))
    if not seeds:
        raise FileNotFoundError(f"no seed with predictions.test.jsonl in both {args.lm_row} "
                                f"and {args.kg_row}")
    per_seed = [ceilings(predictions(args.lm_row, s), predictions(args.kg_row, s))
                for s in seeds]
    print(f"{args.kg_row} paired with {args.lm_row}, seeds {', '.join(seeds)}:")
    for key in per_seed[0]:
        values = [c[key] for c in per_seed]
        std = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        print(f"  {key}: {statistics.mean(values):.1f}{std}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
