"""Evaluation of cloze-form factoid QA (paper section 4, Table 6; REFERENCE.md "QA").

* Accuracy: a question is right only if **every** [MASK] gets its gold word piece as the top-1
  prediction. It is computed by the ``evaluate`` metric module kept in the repository
  (``kgqa/metrics/cloze_accuracy``, loaded by path, never from the Hub); :func:`predict` gives
  it one sequence of predicted and one of gold piece ids per question.
* Predictions file (:func:`write_predictions`): one JSON object per question with its id, the
  question, the gold answer, the predicted answer (the predicted pieces decoded) and whether it
  is right.
* Report (:func:`build_report`, ``python -m kgqa.evaluate report RUN_DIR... --out DIR``): the
  ``metrics.json`` of several runs (``kgqa.train``) -> test accuracy per (dataset, split) for
  each (LM, KG) pair, mean ± std over seeds, as JSON and as a Markdown table. The std is the
  sample standard deviation (n - 1 in the denominator); with one seed there is none.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import evaluate
import torch

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "cloze_accuracy"
METRICS_FILE = "metrics.json"  # what kgqa.train writes per run
KG_LABELS = {"none": "–", "frozen": "HittER (frozen)", "co-trained": "HittER (co-trained)"}


def load_metric() -> evaluate.EvaluationModule:
    """The cloze-accuracy metric module of this repository (offline)."""
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
            res = model(**{k: v.to(device) for k, v in batch.items()})
            top = res.logits.argmax(-1)  # (M,)
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


def write_predictions(records: Iterable[dict[str, Any]], path: str | Path) -> None:
    """JSON lines, one question each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- report


def find_run_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``metrics.json`` at or below the given files / directories, read."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob(METRICS_FILE))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return [json.loads(f.read_text(encoding="utf-8")) | {"path": str(f)} for f in files]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build_report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group runs by (lm, kg, dataset, split) and take mean and std of test accuracy over seeds.

    Each result needs ``lm, kg`` (none | frozen | co-trained), ``dataset, split, seed`` and
    ``test.accuracy``; a second run of the same seed in one group is an error (it would be
    counted twice). Accuracies in the report are percentages.
    """
    groups: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = {}
    for r in results:
        key = (r["lm"], r["kg"], r["dataset"], r["split"])
        seeds = groups.setdefault(key, {})
        if r["seed"] in seeds:
            raise ValueError(f"two runs of seed {r['seed']} for {key}: "
                             f"{seeds[r['seed']].get('path')} and {r.get('path')}")
        seeds[r["seed"]] = r
    rows = []
    for (lm, kg, dataset, split), by_seed in sorted(groups.items()):
        seeds = sorted(by_seed)
        test = [100.0 * by_seed[s]["test"]["accuracy"] for s in seeds]
        dev = [100.0 * by_seed[s]["dev"]["accuracy"] for s in seeds if "dev" in by_seed[s]]
        mean, std = _mean_std(test)
        rows.append({
            "lm": lm, "kg": kg, "dataset": dataset, "split": split, "seeds": seeds,
            "n": len(seeds), "test_accuracy": test, "mean": mean, "std": std,
            "dev_mean": _mean_std(dev)[0] if dev else None,
        })
    return {"metric": "cloze accuracy (every mask right), %", "std": "sample (n - 1)",
            "rows": rows}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row["std"] is None or math.isnan(row["std"]):
        return f"{row['mean']:.1f} (n={row['n']})"
    return f"{row['mean']:.1f} ± {row['std']:.1f} (n={row['n']})"


def format_markdown(report: dict[str, Any]) -> str:
    """Rows (LM, KG), columns (dataset, split) in the order full, filtered."""
    rows = report["rows"]
    columns = sorted({(r["dataset"], r["split"]) for r in rows},
                     key=lambda c: (c[0], ("full", "filtered").index(c[1])
                                    if c[1] in ("full", "filtered") else 2, c[1]))
    models = sorted({(r["lm"], r["kg"]) for r in rows},
                    key=lambda m: (m[0], list(KG_LABELS).index(m[1]) if m[1] in KG_LABELS else 9))
    cells = {(r["lm"], r["kg"], r["dataset"], r["split"]): r for r in rows}
    lines = [
        "| LM | KG | " + " | ".join(f"{d} {s}" for d, s in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for lm, kg in models:
        values = [_cell(cells.get((lm, kg, d, s))) for d, s in columns]
        lines.append(f"| {lm} | {KG_LABELS.get(kg, kg)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> str:
    """Read the runs, write ``report.json`` and ``report.md`` into ``out_dir`` (if given) and
    return the Markdown table."""
    report = build_report(find_run_results(paths))
    if not report["rows"]:
        raise FileNotFoundError(f"no {METRICS_FILE} under the given paths")
    table = format_markdown(report)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "report.md").write_text(
            f"Test accuracy (%), every mask right; mean ± std over seeds.\n\n{table}\n")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kgqa.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="accuracy table over runs (mean ± std over seeds)")
    rep.add_argument("runs", nargs="+", help="run directories or metrics.json files")
    rep.add_argument("--out", default=None, help="write report.json and report.md here")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.out))


if __name__ == "__main__":
    main()
