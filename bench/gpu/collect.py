"""Collect the GPU suite's figures (bench/gpu/suite.sh) into results.json and summary.md.

    python bench/gpu/collect.py WORK_DIR --out DIR [--dry-run 0|1]

WORK_DIR holds steps.tsv (name, rc, seconds per step) and the files the steps wrote:
speed-{bf16,fp32,compiled,bf16-cudnn}.json (bench/train_speed.py --json), ttq-fb15k-237.json
(bench/time_to_quality.py --json) and runs/qa-smoke/metrics.json. A missing file leaves its
figure out; every step's rc and seconds are always there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPEED_VARIANTS = ("fp32", "bf16", "compiled", "bf16-cudnn")  # bench/gpu/suite.sh's speed-* steps


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    ttq = read_json(work / "ttq-fb15k-237.json")
    if ttq:
        curve = ttq[0]
        last = curve["validations"][-1]
        results["ttq_fb15k-237"] = {
            "precision": curve["precision"], "epochs": last["epoch"],
            "train_seconds": last["train_seconds"], "wall_seconds": curve.get("wall_seconds"),
            "validations": curve["validations"], "test": curve["test"],
            "frequency_baseline": curve.get("frequency_baseline"),
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
        lines += ["", "| training | triples/s | s per epoch | warm-up s (compile) | distinct "
                  "shapes | peak memory | test eval s |", "|---|---:|---:|---:|---|---|---:|"]
        for v, s in speeds:
            shapes = (f"{s['distinct_shapes']} in {s['shape_batches']} batches"
                      if "distinct_shapes" in s else "")
            lines.append(f"| {v} (batch {s['batch_size']}) | {s['triples_per_s']:,.0f} | "
                         f"{s['epoch_s']:.1f} | {s['warmup_s']:.1f} | {shapes} | "
                         f"{s['peak_memory']} | {s['test_eval_s']:.1f} |")
    t = results.get("ttq_fb15k-237")
    if t:
        curve = ", ".join(f"{v['valid_mrr']:.4f} at {v['train_seconds']:.0f} s"
                          for v in t["validations"])
        test = t["test"] or {}
        floor = t.get("frequency_baseline") or {}
        lines.append(f"\ntime to quality, FB15K-237 paper config ({t['precision']}): "
                     f"{t['epochs']:.1f} epochs in {t['train_seconds']:.0f} s of training; valid "
                     f"MRR {curve}; test MRR {test.get('mrr', float('nan')):.4f} (H@10 "
                     f"{test.get('hits@10', float('nan')):.3f}); relation-frequency baseline "
                     f"{floor.get('test', float('nan')):.4f}")
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
