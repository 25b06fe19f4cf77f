"""Factoid-QA splits and cloze inputs (paper section 4 and appendix B; REFERENCE.md "QA").

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
* Cloze form (:func:`build_cloze_dataset`): ``question + " " + [MASK] * n + "."`` with the
  tokenizer's special tokens, n = the number of word pieces of the answer name (the number of
  masks is known to every model, as in the paper). Labels are those pieces at the mask
  positions and -100 elsewhere. For BERT's WordPiece tokenizer the ids equal HittER's
  ``RawQuestion + "[MASK]" * n + "."``; the labels come from the answer name, never from the
  label ids stored in the released files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, Value
from torch.nn.utils.rnn import pad_sequence

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
IGNORE_INDEX = -100  # label at non-mask positions (ignored by the MLM loss)
NO_ENTITY = -1  # topic_entity / answer_entity in tensors when the entity is not in the KG
CLOZE_FORMAT = 1  # bump when the cloze layout changes: invalidates cached datasets
_EXAMPLE_FIELDS = tuple(f.name for f in fields(QAExample))
_EXAMPLE_FEATURES = Features(
    {
        "question_id": Value("string"),
        "question": Value("string"),
        "topic_entity": Value("int64"),
        "answer": Value("string"),
        "answer_entity": Value("int64"),
        "relation": Value("int64"),
    }
)


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
    vocabulary of ``kg`` (default: ``data_dir/fb15k-237``)."""
    data_dir = Path(data_dir)
    kg = kg if kg is not None else load_kg(data_dir / "fb15k-237")
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


def load_qa_splits(
    data_dir: str | Path,
    dataset: str,
    variant: str,
    kg: KnowledgeGraph | None = None,
    dev_fraction: float = DEV_FRACTION,
) -> dict[str, list[QAExample]]:
    """Train / dev / test examples of one dataset and variant, read from the source files;
    raises FileNotFoundError (with the notes) when train or test cannot be built."""
    sources = read_sources(data_dir, kg, datasets=[dataset])
    splits = qa_splits(sources, dataset, variant, dev_fraction)
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        notes = "; ".join(sources.messages)
        raise FileNotFoundError(f"{dataset} {variant}: no {' / '.join(missing)} split ({notes})")
    return splits


# ----------------------------------------------------------------------------- JSONL files


def prepared_file(prepared_dir: str | Path, dataset: str, variant: str, split: str) -> Path:
    """Where :mod:`kgqa.prepare` writes a split: ``DIR/<dataset>/<variant>/<split>.jsonl``."""
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


def load_split(prepared_dir: str | Path, dataset: str, variant: str, split: str) -> list[QAExample]:
    return load_examples(prepared_file(prepared_dir, dataset, variant, split))


# ----------------------------------------------------------------------------- cloze inputs


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # normaliser, pre-tokeniser, vocabulary, special tokens
        spec = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # per-call settings, changed by every call
            spec.pop(state, None)
        content = json.dumps(spec, sort_keys=True)
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    ident = f"{type(tokenizer).__name__}|{tokenizer.mask_token}|{len(tokenizer)}|{content}"
    return hashlib.sha256(ident.encode()).hexdigest()


def cloze_fingerprint(examples: Sequence[QAExample], tokenizer: Any, max_length: int) -> str:
    """Key of the cached cloze dataset: the examples, the tokenizer and the cloze layout."""
    h = hashlib.sha256(f"cloze-v{CLOZE_FORMAT}|{max_length}|".encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for e in examples:
        h.update(json.dumps(asdict(e), ensure_ascii=False).encode())
    return h.hexdigest()


def _cloze_batch(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    """Batched ``Dataset.map`` function: cloze text -> input_ids / attention_mask / labels."""
    mask = tokenizer.mask_token
    pieces = tokenizer(batch["answer"], add_special_tokens=False)["input_ids"]
    texts = [f"{q} {mask * len(p)}." for q, p in zip(batch["question"], pieces, strict=True)]
    enc = tokenizer(texts)
    labels = []
    rows = zip(batch["question_id"], enc["input_ids"], pieces, strict=True)
    for qid, ids, answer_ids in rows:
        positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
        if len(positions) != len(answer_ids):  # e.g. a literal mask token inside the question
            raise DataFormatError(
                f"{qid}: {len(positions)} mask tokens in the cloze input, expected "
                f"{len(answer_ids)} (one per answer piece)"
            )
        row = [IGNORE_INDEX] * len(ids)
        for i, t in zip(positions, answer_ids, strict=True):
            row[i] = t
        labels.append(row)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
        "num_masks": [len(p) for p in pieces],
        "topic_entity": [NO_ENTITY if t is None else t for t in batch["topic_entity"]],
        "answer_entity": [NO_ENTITY if t is None else t for t in batch["answer_entity"]],
    }


def build_cloze_dataset(
    examples: Sequence[QAExample],
    tokenizer: Any,
    cache_dir: str | Path | None = None,
    max_length: int = 512,
) -> Dataset:
    """Cloze examples as a ``datasets.Dataset`` with columns ``question_id, question, answer,
    topic_entity, answer_entity`` (-1 = not in the KG), ``relation, input_ids,
    attention_mask, labels, num_masks``. Rows are not padded (see :func:`collate_cloze`).

    With ``cache_dir`` the tokenized dataset is cached there as
    ``cloze-<tokenizer>-<fingerprint>.arrow`` and reused while the examples, the tokenizer and
    the cloze layout are unchanged. Answers with no word piece and inputs longer than
    ``max_length`` are dropped, counted and logged with their question ids.
    """
    if tokenizer.mask_token is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no mask token")
    records = [asdict(e) for e in examples]
    if not records:
        raise ValueError("no examples to convert")
    map_kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        fp = cloze_fingerprint(examples, tokenizer, max_length)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tokenizer.name_or_path).name) or "tokenizer"
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        map_kwargs = dict(cache_file_name=str(Path(cache_dir) / f"cloze-{name}-{fp[:20]}.arrow"))
        map_kwargs["new_fingerprint"] = fp[:32]
    ds = Dataset.from_list(records, features=_EXAMPLE_FEATURES).map(
        _cloze_batch, batched=True, fn_kwargs={"tokenizer": tokenizer}, **map_kwargs
    )
    num_masks, lengths = ds["num_masks"], [len(x) for x in ds["input_ids"]]
    sizes = zip(num_masks, lengths, strict=True)
    keep = [i for i, (n, ln) in enumerate(sizes) if n > 0 and ln <= max_length]
    if len(keep) < len(ds):
        ids = ds["question_id"]
        empty = [ids[i] for i, n in enumerate(num_masks) if n == 0]
        long = [ids[i] for i, ln in enumerate(lengths) if ln > max_length]
        for reason, dropped in (("answer has no word piece", empty), ("too long", long)):
            if dropped:
                logger.warning("dropped %d examples (%s): %s", len(dropped), reason, dropped[:10])
        ds = ds.select(keep, keep_in_memory=True)
    return ds


def collate_cloze(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of cloze rows into a batch: ``input_ids, attention_mask, labels`` (B, L)
    padded with ``pad_token_id`` / 0 / -100; ``topic_entity, relation, answer_entity,
    num_masks`` (B,)."""

    def pad(key: str, value: int) -> torch.Tensor:
        rows = [torch.as_tensor(f[key], dtype=torch.long) for f in features]
        return pad_sequence(rows, batch_first=True, padding_value=value)  # (B, L)

    batch = {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
    }
    for key in ("topic_entity", "relation", "answer_entity", "num_masks"):
        batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # (B,)
    return batch
