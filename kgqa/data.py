"""Factoid-QA sources and splits (paper section 4 and appendix B; REFERENCE.md "QA").

* Sources (:func:`read_sources`): under the data directory, WebQSP's official
  ``webqsp/WebQSP.{train,test}.json`` and FreebaseQA's official
  ``freebaseqa/FreebaseQA-{train,dev,eval}.json`` where present, else HittER's released
  ``<dataset>/hitter_format/relphormer[-filtered]/{train,dev,test}.json`` (HittER's full
  FreebaseQA train is not published: full FreebaseQA then has no train split).
* Splits: "full" is every question with a usable answer name; "filtered" keeps the examples
  whose topic and answer entity are both in FB15K-237 (:func:`filtered`). Reading the files
  and the selection rule live in :mod:`kgqa.qa_readers`.
* Model selection uses a dev split carved deterministically from train
  (:func:`split_dev`: a salted hash of the question id, so the same question lands on the same
  side in the full and the filtered split, whatever the file order). The reference selected on
  the test set; we do not.
* Prepared splits (:func:`save_examples` / :func:`load_examples`): JSON lines written by
  :mod:`kgqa.prepare`, the one path from the source files to training
  (:func:`kgqa.prepare.load_qa_splits` prepares them on first use). Cloze inputs and batches
  are made in :mod:`kgqa.batches`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from hitter_core.config import DEFAULT_KG
from hitter_core.data import DataFormatError, KnowledgeGraph, load_kg
from kgqa.config import QATrainConfig
from kgqa.qa_readers import (
    QAExample,
    Selection,
    read_freebaseqa_json,
    read_hitter_json,
    read_webqsp,
    select_examples,
)

logger = logging.getLogger(__name__)

DATASETS = ("webqsp", "freebaseqa")
VARIANTS = ("full", "filtered")
SOURCE_SPLITS = {"webqsp": ("train", "test"), "freebaseqa": ("train", "dev", "test")}
OFFICIAL_FILES = {
    "webqsp": {"train": "WebQSP.train.json", "test": "WebQSP.test.json"},
    "freebaseqa": {
        "train": "FreebaseQA-train.json",
        "dev": "FreebaseQA-dev.json",  # official dev: not used by HittER
        "test": "FreebaseQA-eval.json",
    },
}
DEV_FRACTION = QATrainConfig.dev_fraction  # share of train carved out for model selection
DEV_SALT = "hitter-kgqa-dev"
_EXAMPLE_FIELDS = tuple(f.name for f in fields(QAExample))


def filtered(examples: Iterable[QAExample]) -> list[QAExample]:
    """The filtered split: topic and answer entity both in the KG."""
    return [e for e in examples if e.in_graph]


def in_dev(question_id: str, fraction: float = DEV_FRACTION, salt: str = DEV_SALT) -> bool:
    """Whether a train question belongs to the carved dev split (a salted sha256 bucket)."""
    digest = hashlib.sha256(f"{salt}:{question_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_dev(
    examples: Sequence[QAExample], fraction: float = DEV_FRACTION, salt: str = DEV_SALT
) -> tuple[list[QAExample], list[QAExample]]:
    """Split train examples into (train, dev), keeping file order within each part."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dev fraction must be in [0, 1), got {fraction}")
    dev_mask = [in_dev(e.question_id, fraction, salt) for e in examples]
    train = [e for e, d in zip(examples, dev_mask, strict=True) if not d]
    dev = [e for e, d in zip(examples, dev_mask, strict=True) if d]
    return train, dev


def shuffle_topics(examples: Sequence[QAExample], seed: int) -> list[QAExample]:
    """Control: every example with a topic entity gets the topic of another example (a seeded
    random cycle through them, so none keeps its own; two questions may share a topic, so a
    few still get theirs by chance). Nothing else changes."""
    rows = [i for i, e in enumerate(examples) if e.topic_entity is not None]
    order = rows.copy()
    random.Random(seed).shuffle(order)
    out = list(examples)
    for to, src in zip(order, order[1:] + order[:1], strict=True):
        out[to] = replace(examples[to], topic_entity=examples[src].topic_entity)
    return out


def answer_is_neighbour(
    topics: Sequence[int], answers: Sequence[int], kg: KnowledgeGraph
) -> list[bool]:
    """Per question (entity ids, -1 = not in the graph): is the answer entity linked to the
    topic by a train triple, in either direction? (The breakdown of the QA report.)"""
    wanted = {t for t in topics if t >= 0}
    linked: dict[int, set[int]] = {t: set() for t in wanted}
    for h, _, t in kg.train.tolist():
        if h in wanted:
            linked[h].add(t)
        if t in wanted:
            linked[t].add(h)
    return [t >= 0 and a in linked[t] for t, a in zip(topics, answers, strict=True)]


# ----------------------------------------------------------------------------- sources


@dataclass
class SourceRow:
    """What one source file gave: questions read, dropped (by reason), kept full / filtered."""

    dataset: str
    split: str
    file: str  # relative to the dataset directory
    questions: int
    dropped: dict[str, int]
    full: int | None  # None: the file holds filtered examples only
    filtered: int


@dataclass
class QASources:
    """Examples by (dataset, variant, source split), with per-file counts and notes."""

    examples: dict[tuple[str, str, str], list[QAExample]] = field(default_factory=dict)
    rows: list[SourceRow] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)

    def add(self, dataset: str, split: str, file: str, sel: Selection, full: bool) -> None:
        dropped = {k: len(v) for k, v in sel.skipped.items()}
        n_full = len(sel.examples) if full else None
        n_filtered = len(filtered(sel.examples))
        self.rows.append(SourceRow(dataset, split, file, sel.num_questions, dropped, n_full,
                                   n_filtered))
        if sel.skipped:
            self.skipped.setdefault(dataset, {})[file] = sel.skipped


def _read_dataset(dataset: str, root: Path, kg: KnowledgeGraph, out: QASources) -> None:
    index = kg.entity_index()
    for split in SOURCE_SPLITS[dataset]:
        official = root / OFFICIAL_FILES[dataset][split]
        if official.is_file():
            reader = read_webqsp if dataset == "webqsp" else read_freebaseqa_json
            sel = select_examples(reader(official), index, source=str(official))
            out.add(dataset, split, official.name, sel, full=True)
            out.examples[(dataset, "full", split)] = sel.examples
            out.examples[(dataset, "filtered", split)] = filtered(sel.examples)
            continue
        out.messages.append(f"{dataset} {split}: no {official.name}; reading HittER's files")
        for variant, folder in (("full", "relphormer"), ("filtered", "relphormer-filtered")):
            rel = f"hitter_format/{folder}/{split}.json"
            if not (root / rel).is_file():
                out.messages.append(
                    f"{dataset} {split}: no {variant} split: neither {official.name} nor "
                    f"{rel} is there (data/README.md says where to get {official.name})"
                )
                continue
            sel = read_hitter_json(root / rel, kg.num_entities)
            if variant == "filtered" and len(filtered(sel.examples)) != len(sel.examples):
                raise DataFormatError(f"{root / rel}: filtered examples outside the KG")
            out.add(dataset, split, rel, sel, full=variant == "full")
            out.examples[(dataset, variant, split)] = sel.examples


def read_sources(
    data_dir: str | Path, kg: KnowledgeGraph | None = None, datasets: Iterable[str] = SOURCE_SPLITS
) -> QASources:
    """Read every available QA source under ``data_dir`` (module docstring) with the KG
    vocabulary of ``kg`` (default: ``data_dir/fb15k-237``, :data:`DEFAULT_KG`)."""
    data_dir = Path(data_dir)
    kg = kg if kg is not None else load_kg(data_dir / DEFAULT_KG)
    out = QASources()
    for dataset in datasets:
        if dataset not in SOURCE_SPLITS:
            raise ValueError(f"unknown QA dataset {dataset!r}; expected one of {DATASETS}")
        _read_dataset(dataset, data_dir / dataset, kg, out)
    return out


def qa_splits(
    sources: QASources, dataset: str, variant: str, dev_fraction: float = DEV_FRACTION
) -> dict[str, list[QAExample]]:
    """``train`` / ``dev`` (carved from train) / ``test``, and ``official-dev`` where the
    source has one; a split whose source is missing is left out."""
    if dataset not in SOURCE_SPLITS or variant not in VARIANTS:
        raise ValueError(f"unknown dataset / variant {dataset!r} / {variant!r}")
    out = {}
    for split in SOURCE_SPLITS[dataset]:
        examples = sources.examples.get((dataset, variant, split))
        if examples is None:
            continue
        if split == "train":
            out["train"], out["dev"] = split_dev(examples, dev_fraction)
        else:
            out["official-dev" if split == "dev" else split] = examples
    return out


# ----------------------------------------------------------------------------- JSONL files


def prepared_file(prepared_dir: str | Path, dataset: str, variant: str, split: str) -> Path:
    """Where :func:`kgqa.prepare.prepare` writes a split:
    ``DIR/<dataset>/<variant>/<split>.jsonl``."""
    return Path(prepared_dir) / dataset / variant / f"{split}.jsonl"


def save_examples(examples: Iterable[QAExample], path: str | Path) -> int:
    """Write one JSON object per line (fields of :class:`QAExample`; null = not in the KG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")
            n += 1
    return n


def load_examples(path: str | Path) -> list[QAExample]:
    """Read a file written by :func:`save_examples`; bad lines raise naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run `python -m kgqa.prepare` first")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: malformed JSON: {e}") from e
            missing = [k for k in _EXAMPLE_FIELDS if k not in record]
            if missing:
                raise DataFormatError(f"{where}: missing field(s) {missing}")
            if not str(record["answer"]).strip():
                raise DataFormatError(f"{where}: {record['question_id']}: empty answer")
            out.append(QAExample(**{k: record[k] for k in _EXAMPLE_FIELDS}))
    return out
