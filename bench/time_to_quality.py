"""Time to quality: filtered MRR of HittER against wall-clock training time, epoch by epoch.

Trains a preset with ``python -m hitter_core.train`` (the very command users run, in this
process; validation after every epoch unless overridden), then prints, from the run's
``metrics.jsonl``, each validation's filtered valid MRR against the training time so far
(``train_seconds``: validation and test excluded, checkpoint saves included), the best
checkpoint's test metrics, the whole command's wall-clock time, and the relation-frequency
baseline on the same splits (``hitter_core.baselines``: what no learning gives)::

    python bench/time_to_quality.py --preset cpu-base [--output-dir DIR] [--threads 2]
        [--json FILE] [section.key=value ...]
    python bench/time_to_quality.py --run runs/ttq/cpu-base [--run DIR ...]   # finished runs

The precision is the preset's ``train.precision`` (``auto``: bf16 where the CPU or GPU has it
natively); pass ``train.precision=fp32`` for the float32 curve of the same seed. Time it on a
quiet machine: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from hitter_core import train as hitter_train
from hitter_core.baselines import RelationFrequencyScorer
from hitter_core.cli import run_cli
from hitter_core.config import load_config
from hitter_core.data import default_data_dir, load_kg
from hitter_core.evaluate import evaluate
from hitter_core.ranking import FilterIndex
from hitter_core.sections import RUN_CONFIG_NAME


def read_curve(run_dir: Path) -> dict[str, Any]:
    """A finished run's curve: its validations (epoch, train_seconds, valid MRR), test metrics
    and resolved config."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    valid = [r for r in records if "valid_mrr" in r]
    if not valid:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl holds no validation")
    if "train_seconds" not in valid[-1]:
        raise ValueError(f"{run_dir}: metrics.jsonl has no train_seconds (a run from before "
                         f"time-to-quality logging)")
    test_file = run_dir / "test_metrics.json"
    test = json.loads(test_file.read_text()) if test_file.is_file() else None
    model_cfg, _ = load_config(run_dir / RUN_CONFIG_NAME)
    ds = json.loads((run_dir / "ds_config.json").read_text())  # the resolved precision
    precision = "bf16" if ds.get("torch_autocast", {}).get("enabled") else "fp32"
    return {"run": str(run_dir), "dataset": model_cfg.dataset, "precision": precision,
            "validations": [{"epoch": r["epoch"], "train_seconds": r["train_seconds"],
                             "valid_mrr": r["valid_mrr"]} for r in valid],
            "test": None if test is None else {
                "best_step": test["best_step"], **{k: test["both"][k] for k in
                                                   ("mrr", "hits@1", "hits@3", "hits@10")}}}


def frequency_floor(dataset: str, data_dir: Path | None) -> dict[str, float]:
    """Filtered valid and test MRR of the relation-frequency baseline on ``dataset``."""
    kg = load_kg(Path(data_dir or default_data_dir()) / dataset)
    scorer, filters = RelationFrequencyScorer(kg), FilterIndex.build(kg)
    return {split: evaluate(scorer, kg, split, filters, progress=False)["both"]["mrr"]
            for split in ("valid", "test")}


def format_curve(curve: dict[str, Any], floor: dict[str, float] | None) -> str:
    lines = [f"{curve['run']} ({curve['dataset']}, {curve['precision']})",
             f"{'epoch':>6}{'train min':>11}{'valid MRR':>11}"]
    for v in curve["validations"]:
        lines.append(f"{v['epoch']:>6.2f}{v['train_seconds'] / 60:>11.2f}{v['valid_mrr']:>11.4f}")
    test = curve["test"]
    if test is not None:
        lines.append(f"test (best, step {test['best_step']}): MRR {test['mrr']:.4f}, H@1 "
                     f"{test['hits@1']:.3f}, H@3 {test['hits@3']:.3f}, H@10 {test['hits@10']:.3f}")
    if "wall_seconds" in curve:
        lines.append(f"whole command (data, training, validations, test): "
                     f"{curve['wall_seconds'] / 60:.2f} min")
    if floor is not None:
        lines.append(f"relation-frequency baseline (nothing learned): valid MRR "
                     f"{floor['valid']:.4f}, test MRR {floor['test']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="train this preset (recipes/configs)")
    parser.add_argument("--run", action="append", type=Path, default=[],
                        help="print the curve of a finished run instead (repeatable)")
    parser.add_argument("--output-dir", default=None,
                        help="run directory (default: runs/ttq/<preset>-<precision>)")
    parser.add_argument("--data-dir", default=None, help="data root (default $KGQA_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if (args.preset is None) == (not args.run):
        parser.error("give either --preset (train) or --run (finished runs)")
    if args.threads:
        torch.set_num_threads(args.threads)

    curves = []
    if args.preset is not None:
        overrides = ["train.validate_every=1", *args.overrides]
        _, train_cfg = load_config(args.preset, overrides)
        out = args.output_dir or f"runs/ttq/{args.preset}-{train_cfg.precision}"
        flags = ["--preset", args.preset, "--output-dir", out, "--overwrite"]
        if args.data_dir:
            flags += ["--data-dir", args.data_dir]
        start = time.perf_counter()
        hitter_train.main([*flags, *overrides])
        curve = read_curve(Path(out))
        curve["wall_seconds"] = time.perf_counter() - start
        curve["threads"] = torch.get_num_threads()
        curves.append(curve)
    curves += [read_curve(run) for run in args.run]

    floors: dict[str, dict[str, float]] = {}
    for curve in curves:
        if curve["dataset"] not in floors:
            floors[curve["dataset"]] = frequency_floor(curve["dataset"], args.data_dir)
        curve["frequency_baseline"] = floors[curve["dataset"]]
        print(format_curve(curve, floors[curve["dataset"]]), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(curves, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
