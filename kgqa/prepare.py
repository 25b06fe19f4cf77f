"""Prepare the factoid-QA splits of paper section 4 (Table 5) and print their counts.

    python -m kgqa.prepare --data-dir $KGQA_DATA_DIR --out data/qa [--lm bert-base-uncased]

This is the one path from the source files to training: :func:`load_qa_splits` (what
``kgqa.train`` calls) reads the prepared splits from a cache directory, running
:func:`prepare` there on first use (again when a source file, the dev fraction or the format
changes); the command above writes the same files where a person wants to read them.
:func:`cloze_splits` turns them into one run's tokenized cloze datasets (its controls and the
``text`` reader's input included), for ``kgqa.train`` and the tools that replay a run.

Reads the sources listed in :mod:`kgqa.data` from ``--data-dir`` (never writes there) and the
FreebaseQA pre-release ``freebaseqa/prerelease_2017/FreebaseQA-{dev,eval}.tab`` files, which are
counted only (they differ slightly from the release). Writes
``OUT/<dataset>/<full|filtered>/{train,dev,test}.jsonl`` (dev = a share of train carved by
question-id hash, :func:`kgqa.data.split_dev`; FreebaseQA's official dev goes to
``official-dev.jsonl``), ``OUT/<dataset>/skipped.json`` (dropped question ids by file and
reason) and ``OUT/counts.md`` (the tables printed). With ``--lm`` it also builds the tokenized
cloze datasets into ``OUT/cache/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from datasets import Dataset

from hitter_core.checkpoint import write_dir_atomically
from hitter_core.cli import run_cli
from hitter_core.config import DEFAULT_KG, HittERConfig
from hitter_core.data import KnowledgeGraph, default_data_dir, load_kg
from hitter_core.neighbours import NeighbourIndex, default_cache_dir
from kgqa.batches import build_cloze_dataset
from kgqa.config import KGQAConfig, QATrainConfig
from kgqa.data import (
    DATASETS,
    DEV_FRACTION,
    DEV_SALT,
    SOURCE_SPLITS,
    VARIANTS,
    QAExample,
    QASources,
    load_examples,
    prepared_file,
    qa_splits,
    read_sources,
    save_examples,
    shuffle_topics,
)
from kgqa.qa_readers import read_freebaseqa_tab, select_examples
from kgqa.readers import parse_reader
from kgqa.verbalise import kg_texts

# HittER's counts (its *-stat.json files; paper Table 5), shown next to ours: (full, filtered).
REFERENCE_COUNTS = {
    ("webqsp", "train"): (2997, 850),
    ("webqsp", "test"): (1582, 484),
    ("freebaseqa", "train"): (20358, 3713),
    ("freebaseqa", "dev"): (3994, 743),
    ("freebaseqa", "test"): (3996, 755),
}
PRERELEASE = {"dev": "FreebaseQA-dev.tab", "test": "FreebaseQA-eval.tab"}


def count_prerelease(data_dir: Path, kg: KnowledgeGraph, sources: QASources) -> None:
    """Add count rows for the FreebaseQA pre-release ``.tab`` files that are present."""
    index = kg.entity_index()
    for split, name in PRERELEASE.items():
        path = data_dir / "freebaseqa" / "prerelease_2017" / name
        if path.is_file():
            sel = select_examples(read_freebaseqa_tab(path), index, source=str(path))
            sources.add("freebaseqa", split, f"prerelease_2017/{name} (counted only)", sel, True)


def prepare(
    data_dir: str | Path,
    out_dir: str | Path,
    kg: KnowledgeGraph | None = None,
    dev_fraction: float = DEV_FRACTION,
) -> QASources:
    """Read every available source, write the JSONL splits under ``out_dir``, return counts."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.resolve().is_relative_to(data_dir.resolve()):
        raise ValueError(f"--out {out_dir} is inside the data directory {data_dir}")
    kg = kg if kg is not None else load_kg(data_dir / DEFAULT_KG)
    sources = read_sources(data_dir, kg)
    count_prerelease(data_dir, kg, sources)
    for dataset in SOURCE_SPLITS:
        for variant in VARIANTS:
            for split, examples in qa_splits(sources, dataset, variant, dev_fraction).items():
                save_examples(examples, prepared_file(out_dir, dataset, variant, split))
    for dataset, by_file in sources.skipped.items():
        path = out_dir / dataset / "skipped.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(by_file, indent=1) + "\n", encoding="utf-8")
    (out_dir / "counts.md").write_text(counts_table(sources, dev_fraction), encoding="utf-8")
    return sources


PREPARED_FORMAT = 1  # bump when the prepared layout changes: invalidates cached splits


def _prepared_key(data_dir: Path, dev_fraction: float) -> str:
    """Hash of what the prepared splits depend on: every source file (path, size, mtime),
    the dev fraction and salt, and :data:`PREPARED_FORMAT`."""
    h = hashlib.sha256(f"qa-v{PREPARED_FORMAT}|{dev_fraction!r}|{DEV_SALT}|".encode())
    for folder in (*SOURCE_SPLITS, DEFAULT_KG):
        for path in sorted((data_dir / folder).rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepared_dir(
    data_dir: str | Path,
    dev_fraction: float = DEV_FRACTION,
    cache_dir: str | Path | None = None,
    kg: KnowledgeGraph | None = None,
) -> Path:
    """The prepared splits of ``data_dir`` under ``cache_dir`` (default ~/.cache/hitter-kgqa),
    prepared there first if needed (what is fit on them, the topic linker, is kept there too)."""
    data_dir = Path(data_dir)
    key = _prepared_key(data_dir, dev_fraction)
    out = Path(cache_dir or default_cache_dir()) / "qa-splits" / key[:20]
    if not (out / "counts.md").is_file():  # written last: a complete preparation
        notes: list[str] = []

        def write(tmp: Path) -> None:
            notes.extend(prepare(data_dir, tmp, kg, dev_fraction).messages)
            (tmp / "notes.txt").write_text("".join(f"{m}\n" for m in notes), encoding="utf-8")

        write_dir_atomically(out, write)
    return out


def load_qa_splits(
    data_dir: str | Path,
    dataset: str,
    variant: str,
    dev_fraction: float = DEV_FRACTION,
    cache_dir: str | Path | None = None,
    kg: KnowledgeGraph | None = None,
) -> dict[str, list[QAExample]]:
    """Train / dev / test examples of one dataset and variant from the prepared splits
    (:func:`prepared_dir`). Raises FileNotFoundError (with the notes of :func:`prepare`) when
    train or test is missing."""
    out = prepared_dir(data_dir, dev_fraction, cache_dir, kg)
    splits = {}
    for split in ("train", "dev", "test"):
        path = prepared_file(out, dataset, variant, split)
        if path.is_file():
            splits[split] = load_examples(path)
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        notes_text = (out / "notes.txt").read_text(encoding="utf-8").strip().replace("\n", "; ")
        raise FileNotFoundError(
            f"{dataset} {variant}: no {' / '.join(missing)} split ({notes_text})"
        )
    return splits


def qa_datasets(data_dir: str | Path, kg: KnowledgeGraph) -> list[str]:
    """The QA datasets under ``data_dir`` whose questions link to ``kg``: none unless it is
    FB15K-237, whose ids they use."""
    return [d for d in DATASETS if (Path(data_dir) / d).is_dir()] if kg.name == DEFAULT_KG else []


def train_questions(data_dir: str | Path, kg: KnowledgeGraph, cache_dir: str | Path | None = None
                    ) -> list[QAExample]:
    """The filtered train questions (carved dev excluded) of :func:`qa_datasets`."""
    return [ex for name in qa_datasets(data_dir, kg)
            for ex in load_qa_splits(data_dir, name, "filtered", cache_dir=cache_dir,
                                     kg=kg)["train"]]


def _n(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def counts_table(sources: QASources, dev_fraction: float = DEV_FRACTION) -> str:
    """Two Markdown tables: what each source file gave, and the prepared splits."""
    lines = [
        "| dataset | split | file | questions | dropped | full | filtered "
        "| HittER full / filtered |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in sources.rows:
        dropped = ", ".join(f"{v:,} {k}" for k, v in r.dropped.items()) or "0"
        ref = REFERENCE_COUNTS.get((r.dataset, r.split))
        ref_s = f"{ref[0]:,} / {ref[1]:,}" if ref else "–"
        lines.append(
            f"| {r.dataset} | {r.split} | {r.file} | {r.questions:,} | {dropped} "
            f"| {_n(r.full)} | {r.filtered:,} | {ref_s} |"
        )
    lines += [
        "",
        f"| dataset | variant | train | dev ({dev_fraction:.0%} of train) | test | official dev |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dataset in SOURCE_SPLITS:
        for variant in VARIANTS:
            splits = qa_splits(sources, dataset, variant, dev_fraction)
            sizes = [
                _n(len(splits[s])) if s in splits else "–"
                for s in ("train", "dev", "test", "official-dev")
            ]
            lines.append(f"| {dataset} | {variant} | " + " | ".join(sizes) + " |")
    return "\n".join(lines) + "\n"


def build_caches(out_dir: str | Path, lm: str) -> list[str]:
    """Tokenize every prepared split into ``OUT/cache`` (one summary line per split)."""
    from kgqa.lm import load_tokenizer

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(lm)
    summary = []
    for path in sorted(out_dir.glob("*/*/*.jsonl")):
        examples = load_examples(path)
        if not examples:
            continue
        ds = build_cloze_dataset(examples, tokenizer, cache_dir=out_dir / "cache")
        masks, lengths = ds["num_masks"], [len(x) for x in ds["input_ids"]]
        summary.append(
            f"{path.relative_to(out_dir)}: {len(ds):,} rows, masks mean "
            f"{sum(masks) / len(masks):.2f} max {max(masks)}, input length max {max(lengths)}"
        )
    return summary


def cloze_splits(
    model_config: KGQAConfig, train_config: QATrainConfig, tokenizer: Any,
    kg: KnowledgeGraph, data_dir: Path, cache_dir: Path,
) -> tuple[dict[str, Dataset], dict[str, int | None]]:
    """The cloze datasets of train / dev / test of a run, with the controls and baselines of
    ``train.shuffle_topics`` and the ``text`` reader (``model.kg_text_length``), and each
    test question's own topic (the report's breakdown is by it, shuffled or not)."""
    cfg = train_config
    splits = load_qa_splits(data_dir, cfg.dataset, cfg.split, cfg.dev_fraction, cache_dir)
    if cfg.max_train_examples is not None:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    if cfg.max_eval_examples is not None:
        for name in ("dev", "test"):
            splits[name] = splits[name][: cfg.max_eval_examples]
    true_topics = {e.question_id: e.topic_entity for e in splits["test"]}
    if cfg.shuffle_topics:
        splits = {name: shuffle_topics(ex, cfg.seed) for name, ex in splits.items()}
    texts = dict.fromkeys(splits)
    if parse_reader(model_config.reader).text:  # the order HittER's evaluation uses
        order = NeighbourIndex.build(kg, seed=HittERConfig().neighbour_order_seed,
                                     cache_dir=cache_dir)
        texts = {name: kg_texts(ex, kg, order, tokenizer, model_config.kg_text_length,
                                model_config.max_neighbours)
                 for name, ex in splits.items()}
    data = {name: build_cloze_dataset(splits[name], tokenizer, cache_dir / "cloze",
                                      kg_texts=texts[name])
            for name in ("train", "dev", "test")}
    return data, true_topics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dev-fraction", type=float, default=DEV_FRACTION)
    parser.add_argument("--lm", default=None, help="also tokenize with this LM (e.g. minilm)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sources = prepare(args.data_dir, args.out, dev_fraction=args.dev_fraction)
    for message in sources.messages:
        print(f"note: {message}")
    print(counts_table(sources, args.dev_fraction))
    if args.lm:
        for line in build_caches(args.out, args.lm):
            print(line)
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
