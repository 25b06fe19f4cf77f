"""Accuracy tables over QA runs in the form of paper Table 6 (section 4).

``python -m kgqa.evaluate report RUN_DIR... [--out DIR]`` reads the ``metrics.json`` of every
run (``kgqa.train``) under the given paths and prints:

* the main table: one row per model (the LM; + HittER per adapter variant and KG mode;
  the controls; the KG-as-text baseline) and training protocol (epochs, learning rates, and
  ``[train cut to n]`` / ``[dev/test cut to n]`` for smoke runs on cut splits), one
  column per (dataset, split), test accuracy as mean ± sample std (n - 1) over seeds, with
  the paper's BERT-base figures as the first rows;
* the gain over the plain LM, paired by seed: for every row with KG input, the mean ± std of
  (row - plain LM) over the seeds both have, same LM, protocol and split;
* a breakdown: test accuracy on the questions whose answer entity is a direct neighbour of
  the topic in the graph, and on the rest (from ``predictions.test.jsonl``, or its
  ``gzip -n`` copy ``predictions.test.jsonl.gz``, the form bench/results keeps).

Runs are only averaged together when they agree on everything but the seed: model variant,
protocol, the HittER they read (its weights' hash, ``kg_identity``; the checkpoint path for
runs from before it was recorded) and the number of train and test questions; a second run of
one seed in a cell is an error (it would be counted twice). Where a report holds runs over
more than one HittER, each row says which.
"""

from __future__ import annotations

import gzip
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kgqa.readers import legacy_reader, parse_reader

METRICS_FILE = "metrics.json"  # what kgqa.train writes per run
PREDICTIONS_FILE = "predictions.test.jsonl"
USER_FILE = "user_setting.{split}.json"  # kgqa.user_setting's summary of a run's split
SPLIT_ORDER = ("full", "filtered")
DATASET_ORDER = ("freebaseqa", "webqsp")  # paper Table 6's column order
# Paper Table 6 (BERT-base, mean of 5 seeds; HittER co-trained through the paper's adapters).
PAPER_ROWS = {
    "BERT-base (paper)": {("freebaseqa", "full"): 19.8, ("freebaseqa", "filtered"): 30.8,
                          ("webqsp", "full"): 23.2, ("webqsp", "filtered"): 46.5},
    "BERT-base + HittER (paper)": {("freebaseqa", "full"): 21.2,
                                   ("freebaseqa", "filtered"): 37.1,
                                   ("webqsp", "full"): 27.1, ("webqsp", "filtered"): 51.0},
}


def run_variant(model_config: Any, train_config: Any) -> dict[str, Any]:
    """What distinguishes a run's model (row of the table) and protocol, for metrics.json."""
    return {
        "reader": model_config.reader, "kg_init": model_config.kg_init,
        "kg_text_length": model_config.kg_text_length,
        "max_neighbours": model_config.max_neighbours,
        "shuffle_topics": train_config.shuffle_topics,
        "protocol": {"epochs": train_config.epochs, "lr_new": train_config.lr_new,
                     "lr_pretrained": train_config.lr_pretrained,
                     "batch_size": train_config.batch_size,
                     "max_train_examples": train_config.max_train_examples,
                     "max_eval_examples": train_config.max_eval_examples},
    }


def result_reader(result: dict[str, Any]) -> str:
    """The ``model.reader`` of a run's result (runs from before the field: from its flags)."""
    v = result.get("variant", {})
    return v.get("reader") or legacy_reader(v, has_hitter=result["kg"] != "none")


def row_label(result: dict[str, Any]) -> str:
    """``minilm``, ``minilm + KG as text``, ``minilm + HittER frozen, link head``, with
    ``[control: ...]`` for the controls: the reader's description (kgqa.readers)."""
    v = result.get("variant", {})
    lm, kg = result["lm"], result["kg"]
    reader = result_reader(result)
    if kg == "none":
        return lm if reader == "none" else f"{lm} + {parse_reader(reader).description}"
    label = f"{lm} + HittER {kg}, {parse_reader(reader).description}"
    controls = []
    if v.get("kg_init") == "random":
        controls.append("untrained HittER")
    if v.get("kg_init") == "frequency":
        controls.append("frequency prior instead of HittER")
    if v.get("shuffle_topics"):
        controls.append("shuffled topics")
    return label + (f" [control: {', '.join(controls)}]" if controls else "")


def hitter_label(result: dict[str, Any]) -> str | None:
    """Which HittER a run read: ``sha 1a2b3c4d5e6f, test MRR 0.2797`` (or its checkpoint path,
    for runs from before the hash was recorded); None without HittER."""
    if result["kg"] == "none":
        return None
    identity = result.get("kg_identity") or {}
    if "sha256" not in identity:
        return f"{result.get('kg_checkpoint')} (identity not recorded)"
    mrr = identity.get("test_mrr", identity.get("valid_mrr"))
    kind = "test" if "test_mrr" in identity else "valid"
    return f"sha {identity['sha256']}" + (f", {kind} MRR {mrr:.4f}" if mrr is not None else "")


def protocol_label(result: dict[str, Any]) -> str:
    p = result.get("variant", {}).get("protocol")
    if not p:
        return "–"
    lr_new = p.get("lr_new", p.get("lr_adapters"))  # its name before 2026-12-07
    label = f"{p['epochs']} ep, lr {lr_new:g} / {p['lr_pretrained']:g}"
    cuts = [f"{part} cut to {p[key]}" for part, key in (("train", "max_train_examples"),
                                                        ("dev/test", "max_eval_examples"))
            if p.get(key) is not None]
    return label + (f" [{', '.join(cuts)}]" if cuts else "")


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


def predictions_file(run_dir: str | Path, split: str = "test") -> Path | None:
    """A run's saved predictions: ``predictions.<split>.jsonl`` as kgqa.train writes it, or
    the gzipped copy (``.jsonl.gz``) kept in bench/results; None when neither exists."""
    for name in (f"predictions.{split}.jsonl", f"predictions.{split}.jsonl.gz"):
        if (file := Path(run_dir) / name).is_file():
            return file
    return None


def read_predictions(file: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions file (JSON lines, plain or gzipped), one per question."""
    file = Path(file)
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_predictions(records: Iterable[dict[str, Any]], path: str | Path) -> None:
    """JSON lines, one question each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _breakdown(path: str | None) -> dict[str, list[bool]] | None:
    """Correctness per question, split by whether the answer is a neighbour of the topic."""
    if path is None or (file := predictions_file(Path(path).parent)) is None:
        return None
    out: dict[str, list[bool]] = {"neighbour": [], "other": []}
    for record in read_predictions(file):
        if "answer_is_neighbour" not in record:
            return None
        out["neighbour" if record["answer_is_neighbour"] else "other"].append(record["correct"])
    return out


def _user_setting(path: str | None) -> dict[str, Any] | None:
    """The run's user-setting summary on test (:mod:`kgqa.user_setting`), if it was run."""
    file = Path(path).parent / USER_FILE.format(split="test") if path else None
    return json.loads(file.read_text(encoding="utf-8")) if file and file.is_file() else None


def build_report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group runs into cells (row label, protocol, dataset, split) and take mean and std of
    test accuracy (%) over seeds; add paired gains over the plain LM and the breakdown."""
    cells: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = {}
    sizes: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
    hitter = [hitter_label(r) for r in results]
    several = len(set(hitter) - {None}) > 1
    for r, read in zip(results, hitter, strict=True):
        label = row_label(r)
        if several and read is not None:  # runs over different HittERs: never averaged together
            label += f" [HittER {read}]"
        key = (label, protocol_label(r), r["dataset"], r["split"])
        size = (r.get("train_examples"), r["test"].get("total"))
        if sizes.setdefault(key, size) != size:
            raise ValueError(f"runs of {key} differ in train / test size ({sizes[key]} and "
                             f"{size}, {r.get('path')}): not averaged together")
        seeds = cells.setdefault(key, {})
        if r["seed"] in seeds:
            raise ValueError(f"two runs of seed {r['seed']} for {key}: "
                             f"{seeds[r['seed']].get('path')} and {r.get('path')}")
        seeds[r["seed"]] = r
    rows = []
    for (label, protocol, dataset, split), by_seed in sorted(cells.items()):
        seeds = sorted(by_seed)
        test = [100.0 * by_seed[s]["test"]["accuracy"] for s in seeds]
        dev = [100.0 * by_seed[s]["dev"]["accuracy"] for s in seeds if "dev" in by_seed[s]]
        mean, std = _mean_std(test)
        row = {"label": label, "protocol": protocol, "lm": by_seed[seeds[0]]["lm"],
               "kg": by_seed[seeds[0]]["kg"], "dataset": dataset, "split": split,
               "seeds": seeds, "n": len(seeds), "test_accuracy": test, "mean": mean,
               "std": std, "dev_mean": _mean_std(dev)[0] if dev else None}
        parts = [_breakdown(by_seed[s].get("path")) for s in seeds]
        if all(parts):
            row["breakdown"] = {
                part: {"questions": len(parts[0][part]),
                       "accuracy": statistics.fmean(100.0 * statistics.fmean(p[part])
                                                    for p in parts) if parts[0][part] else None}
                for part in ("neighbour", "other")}
        users = [_user_setting(by_seed[s].get("path")) for s in seeds]
        if all(users):
            row["user"] = {"accuracy": [100.0 * u["accuracy"] for u in users],
                           "protocol": [100.0 * u["protocol_accuracy"] for u in users],
                           "entity_answers": statistics.fmean(u["entity_answers"] for u in users),
                           "names": users[0]["names"]}
        rows.append(row)
    for row in rows:  # paired gain over the plain LM (same LM, protocol, column)
        base = next((b for b in rows if b["label"] == b["lm"] and b["lm"] == row["lm"]
                     and (b["protocol"], b["dataset"], b["split"])
                     == (row["protocol"], row["dataset"], row["split"])), None)
        if base is None or base is row:
            continue
        shared = sorted(set(row["seeds"]) & set(base["seeds"]))
        if shared:
            diffs = [row["test_accuracy"][row["seeds"].index(s)]
                     - base["test_accuracy"][base["seeds"].index(s)] for s in shared]
            mean, std = _mean_std(diffs)
            row["gain"] = {"seeds": shared, "mean": mean, "std": std}
    return {"metric": "cloze accuracy (every mask right), %", "std": "sample (n - 1)",
            "rows": rows}


def _cell(mean: float, std: float | None, n: int, sign: bool = False) -> str:
    value = f"{mean:+.1f}" if sign else f"{mean:.1f}"
    return f"{value} ± {std:.1f} (n={n})" if std is not None else f"{value} (n={n})"


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    def order(c: tuple[str, str]) -> tuple:
        d, s = c
        return (DATASET_ORDER.index(d) if d in DATASET_ORDER else 9, d,
                SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)
    return sorted({(r["dataset"], r["split"]) for r in rows}, key=order)


def _models(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Row order: each LM's plain row first, then its text baseline, KG rows, controls."""
    def order(m: tuple[str, str]) -> tuple:
        label, protocol = m
        kind = 0 if " + " not in label else 1 if "as text" in label else (
            3 if "control" in label else 2)
        return (protocol, kind, label)
    return sorted({(r["label"], r["protocol"]) for r in rows}, key=order)


def format_markdown(report: dict[str, Any], paper: bool = True) -> str:
    """The main table (paper rows first), then the paired gains and the breakdown."""
    rows = report["rows"]
    columns = _columns(rows)
    cells = {(r["label"], r["protocol"], r["dataset"], r["split"]): r for r in rows}
    head = "| model | protocol | " + " | ".join(f"{d} {s}" for d, s in columns) + " |"
    rule = "|---|---|" + "---:|" * len(columns)
    lines = [head, rule]
    if paper:
        for label, figures in PAPER_ROWS.items():
            values = [f"{figures[c]:.1f} (n=5)" if c in figures else "–" for c in columns]
            lines.append(f"| {label} | 20 ep, lr 5e-05 / 5e-06 | " + " | ".join(values) + " |")
    for label, protocol in _models(rows):
        values = []
        for d, s in columns:
            r = cells.get((label, protocol, d, s))
            values.append(_cell(r["mean"], r["std"], r["n"]) if r else "–")
        lines.append(f"| {label} | {protocol} | " + " | ".join(values) + " |")
    gains = [r for r in rows if "gain" in r]
    if gains:
        lines += ["", "Gain over the plain LM, paired by seed (points):", "", head, rule]
        for label, protocol in _models(gains):
            values = []
            for d, s in columns:
                r = cells.get((label, protocol, d, s))
                g = r.get("gain") if r else None
                values.append(_cell(g["mean"], g["std"], len(g["seeds"]), sign=True)
                              if g else "–")
            lines.append(f"| {label} | {protocol} | " + " | ".join(values) + " |")
    split_rows = [r for r in rows if "breakdown" in r]
    if split_rows:
        lines += ["", "Test accuracy (%) by whether the answer entity is a direct neighbour of "
                  "the topic (mean over seeds):", "",
                  "| model | protocol | column | answer a neighbour | other |",
                  "|---|---|---|---:|---:|"]
        for r in split_rows:
            b = r["breakdown"]
            parts = [f"{b[p]['accuracy']:.1f} ({b[p]['questions']} q.)"
                     if b[p]["accuracy"] is not None else "–" for p in ("neighbour", "other")]
            lines.append(f"| {r['label']} | {r['protocol']} | {r['dataset']} {r['split']} | "
                         + " | ".join(parts) + " |")
    user_rows = [r for r in rows if "user" in r]
    if user_rows:
        lines += ["", "User setting (kgqa.evaluate user): the test questions asked as kgqa.ask asks"
                  " them, topic linked, answer length unknown; beside the protocol's accuracy of "
                  "the same runs (mean over seeds):", "",
                  "| model | protocol | column | user setting | cloze protocol | kept | "
                  "entity answers |", "|---|---|---|---:|---:|---:|---:|"]
        for r in user_rows:
            u = r["user"]
            user, protocol = statistics.fmean(u["accuracy"]), statistics.fmean(u["protocol"])
            kept = f"{100 * user / protocol:.0f}%" if protocol else "–"
            lines.append(f"| {r['label']}{' [names]' if u['names'] and r['kg'] == 'none' else ''}"
                         f" | {r['protocol']} | {r['dataset']} {r['split']} | "
                         f"{_cell(user, *_mean_std(u['accuracy'])[1:], len(u['accuracy']))} | "
                         f"{protocol:.1f} | {kept} | {100 * u['entity_answers']:.0f}% |")
    return "\n".join(lines)


def write_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> str:
    """Read the runs, write ``report.json`` and ``report.md`` into ``out_dir`` (if given) and
    return the Markdown."""
    report = build_report(find_run_results(paths))
    if not report["rows"]:
        raise FileNotFoundError(f"no {METRICS_FILE} under the given paths")
    table = format_markdown(report)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "report.md").write_text(
            f"Test accuracy (%), every mask right; mean ± sample std over seeds.\n\n{table}\n")
    return table
