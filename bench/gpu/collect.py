"""Collect the GPU suite's figures (bench/gpu/suite.sh) into results.json and summary.md.

    python bench/gpu/collect.py WORK_DIR --out DIR [--dry-run 0|1]

WORK_DIR holds steps.tsv (name, rc, seconds per step) and the files the steps wrote:
speed-{fp32,bf16,bf16-nocudnn,compiled}.json (bench/train_speed.py --json), runs/<dataset>/
(test_metrics.json, metrics.jsonl), eval-fb15k-237.json and runs/qa-smoke/metrics.json. A
missing file leaves its figure out; every step's rc and seconds are always there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPEED_VARIANTS = ("fp32", "bf16", "bf16-nocudnn", "compiled")  # bench/gpu/suite.sh's speed-* steps


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def last_epoch(metrics_jsonl: Path) -> float | None:
    """The epoch count of the last training record of a hitter_core run."""
    epoch = None
    try:
        for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "loss" in record and "epoch" in record:
                epoch = record["epoch"]
    except (OSError, ValueError):
        return None
    return epoch


def collect(work: Path, dry_run: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"dry_run": dry_run, "steps": {}}
    for line in (work / "steps.tsv").read_text(encoding="utf-8").splitlines():
        name, rc, seconds = line.split("\t")
        results["steps"][name] = {"rc": int(rc), "seconds": float(seconds),
                                  "timed_out": int(rc) in (124, 137)}
    for variant in SPEED_VARIANTS:
        speed = read_json(work / f"speed-{variant}.json")
        if speed:
            results[f"speed_{variant}"] = speed
            results.setdefault("device", speed["device"])
    for dataset in ("wn18rr", "fb15k-237"):
        run = work / "runs" / dataset
        test = read_json(run / "test_metrics.json")
        if test:
            both = test["both"]
            results[f"train_{dataset}"] = {
                "test_mrr": both["mrr"], "test_hits@1": both["hits@1"],
                "test_hits@10": both["hits@10"], "steps": test.get("best_step"),
                "epochs": last_epoch(run / "metrics.jsonl"),
                "seconds": results["steps"].get(f"train-{dataset}", {}).get("seconds"),
            }
    evaluation = read_json(work / "eval-fb15k-237.json")
    if evaluation:
        results["eval_fb15k-237"] = {
            "test_mrr": evaluation["both"]["mrr"],
            "seconds_with_load": results["steps"].get("eval-fb15k-237", {}).get("seconds"),
        }
    qa = read_json(work / "runs" / "qa-smoke" / "metrics.json")
    if qa:
        results["qa_smoke"] = {k: v for k, v in qa.items() if k != "history"}
    return results


def summary(results: dict[str, Any]) -> str:
    dry = " (CPU dry run: its figures mean nothing)" if results["dry_run"] else ""
    title = f"# GPU suite{dry}"
    lines = [title, "", f"device: {results.get('device', 'unknown')}", "",
             "| step | rc | seconds |", "|---|---:|---:|"]
    for name, s in results["steps"].items():
        lines.append(f"| {name} | {s['rc']}{' (timeout)' if s['timed_out'] else ''} | "
                     f"{s['seconds']:.0f} |")
    speeds = [(v, results[f"speed_{v}"]) for v in SPEED_VARIANTS
              if f"speed_{v}" in results]
    if speeds:
        lines += ["", "| training | triples/s | s per epoch | peak memory | test eval s |",
                  "|---|---:|---:|---|---:|"]
        for v, s in speeds:
            lines.append(f"| {v} (batch {s['batch_size']}) | {s['triples_per_s']:,.0f} | "
                         f"{s['epoch_s']:.1f} | {s['peak_memory']} | {s['test_eval_s']:.1f} |")
    for dataset in ("wn18rr", "fb15k-237"):
        t = results.get(f"train_{dataset}")
        if t:
            lines.append(f"\n{dataset}: test MRR {t['test_mrr']:.4f} (H@1 {t['test_hits@1']:.3f}, "
                         f"H@10 {t['test_hits@10']:.3f}) after {t['steps']} steps "
                         f"({t['epochs'] or 0:.2f} epochs) in {t['seconds'] or 0:.0f} s "
                         f"with the test evaluation")
    e = results.get("eval_fb15k-237")
    if e:
        lines.append(f"\nfull filtered FB15K-237 test evaluation: {e['seconds_with_load']:.0f} s "
                     f"(process start and loading included), MRR {e['test_mrr']:.4f}")
    qa = results.get("qa_smoke")
    if qa:
        dev, test = qa["dev"]["accuracy"], qa["test"]["accuracy"]
        lines.append(f"\nQA smoke ({qa['dataset']} {qa['split']}, {qa['epochs_run']} epoch): "
                     f"dev accuracy {dev:.3f}, test {test:.3f} ({qa['test']['total']} "
                     f"questions); {qa['train_seconds']:.0f} s of training on {qa['device']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", type=int, default=0)
    args = parser.parse_args(argv)
    results = collect(args.work, bool(args.dry_run))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "summary.md").write_text(summary(results))
    print(summary(results))


if __name__ == "__main__":
    main()
