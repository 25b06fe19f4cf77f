"""Plots of QA results (the ``[viz]`` extra): test accuracy per variant with error bars, and
accuracy by whether the answer entity is a neighbour of the question's topic (in HittER's
input), from the ``report.json`` that ``python -m kgqa.evaluate report`` writes.

    python -m kgqa.analyze runs/kg-gain/webqsp-filtered/report.json [more report.json] --out DIR

writes ``DIR/qa_accuracy.png`` and ``DIR/qa_breakdown.png``: one group of bars per report
(dataset and split), one bar per row (plain LM, each KG variant, controls), mean ± sample std
over seeds, with n and the paper's figures where the report holds them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hitter_core.cli import run_cli


def load_rows(reports: Sequence[Path]) -> list[dict]:
    rows = []
    for path in reports:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such report (python -m kgqa.evaluate report "
                                    f"RUN_DIR --out DIR writes DIR/report.json)")
        rows += [r for r in json.loads(path.read_text())["rows"] if r.get("n")]
    return rows


def plot_rows(path: Path, rows: list[dict], series: dict[str, list[float]], title: str,
              errors: list[float] | None = None) -> None:
    """Horizontal bars, one group per report row (labels read left of the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['label']}  [{r['dataset']} {r['split']}, n={r['n']}]" for r in rows]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) * len(series) + 1.6))
    for i, (name, values) in enumerate(series.items()):
        y = [k + i * height for k in range(len(rows))]
        ax.barh(y, values, height, xerr=errors, capsize=3, label=name)
        for yy, v, e in zip(y, values, errors or [0.0] * len(values), strict=True):
            ax.text(v + e + 0.5, yy, f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy, %")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kgqa.analyze",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = load_rows(args.reports)
    if not rows:
        raise FileNotFoundError("the reports hold no runs")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_rows(args.out / "qa_accuracy.png", rows, {"test": [r["mean"] for r in rows]},
              "QA test accuracy per variant (mean; error bars: sample std over seeds)",
              errors=[r.get("std") or 0.0 for r in rows])
    split = [r for r in rows if r.get("breakdown")]
    if split:
        plot_rows(args.out / "qa_breakdown.png", split,
                  {part: [r["breakdown"][key]["accuracy"] for r in split]
                   for key, part in (("neighbour", "answer a neighbour of the topic"),
                                     ("other", "other questions"))},
                  "QA test accuracy: answer entity a neighbour of the topic or not (mean)")
    print(f"wrote {args.out / 'qa_accuracy.png'}" + (
        f" and {args.out / 'qa_breakdown.png'}" if split else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
