"""What one QA step consumes (paper section 4, appendix B; REFERENCE.md "QA"): cloze inputs,
batches with the topic entities' neighbourhoods, and the loss (``kgqa.train`` runs the loop),
as :mod:`hitter_core.batches` does for link prediction.

* Cloze form (:func:`build_cloze_dataset`): ``question + " " + [MASK] * n + "."`` with the
  tokenizer's special tokens, n = the number of word pieces of the answer name as it reads after
  a space (:func:`kgqa.lm.word_pieces`; the number of masks is known to every model, as in the
  paper). Labels are those pieces at the mask positions and -100 elsewhere. For BERT's WordPiece
  tokenizer the ids equal HittER's ``RawQuestion + "[MASK]" * n + "."``; the labels come from
  the answer name, never from the label ids stored in the released files.
* Batches (:class:`ClozeCollator`): padded cloze rows plus the neighbourhood of each topic
  entity, ``kg_entities`` / ``kg_relations`` / ``kg_mask`` (B, N). Training batches draw a
  fresh uniformly random subset of ``max_neighbours`` neighbours from a seeded generator (no
  ground-truth removal, no neighbour drop: REFERENCE.md); evaluation batches take the fixed
  first ones (``NeighbourIndex.gather``). Rows without a topic entity (-1) get none.
* :func:`make_batch`: the same batch straight from :class:`~kgqa.qa_readers.QAExample` s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, Value
from torch.nn.utils.rnn import pad_sequence

from hitter_core.data import DataFormatError
from hitter_core.neighbours import NeighbourIndex
from kgqa.lm import word_pieces
from kgqa.qa_readers import QAExample

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label at non-mask positions (ignored by the MLM loss)
NO_ENTITY = -1  # topic_entity / answer_entity in tensors when the entity is not in the KG
CLOZE_FORMAT = 3  # bump when the cloze layout changes: invalidates cached datasets
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "topic_entity",
                 "relation", "answer_entity", "num_masks")  # what a loader reads of a dataset
_EXAMPLE_FEATURES = Features(
    {
        "question_id": Value("string"),
        "question": Value("string"),
        "topic_entity": Value("int64"),
        "answer": Value("string"),
        "answer_entity": Value("int64"),
        "relation": Value("int64"),
        "kg_text": Value("string"),  # second input segment (kgqa.verbalise); "" = none
    }
)

# ----------------------------------------------------------------------------- cloze inputs



def tokenizer_fingerprint(tokenizer: Any) -> str:
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


def cloze_fingerprint(
    examples: Sequence[QAExample], tokenizer: Any, max_length: int,
    kg_texts: Sequence[str] | None = None,
) -> str:
    """Key of the cached cloze dataset: the examples (and their KG texts), the tokenizer and
    the cloze layout."""
    h = hashlib.sha256(f"cloze-v{CLOZE_FORMAT}|{max_length}|".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for i, e in enumerate(examples):
        h.update(json.dumps(asdict(e), ensure_ascii=False).encode())
        if kg_texts is not None:
            h.update(f"|{kg_texts[i]}".encode())
    return h.hexdigest()


def _cloze_batch(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    """Batched ``Dataset.map`` function: cloze text -> input_ids / attention_mask / labels."""
    mask = tokenizer.mask_token
    pieces = word_pieces(batch["answer"], tokenizer)  # as read after a space
    texts = [f"{q} {mask * len(p)}." for q, p in zip(batch["question"], pieces, strict=True)]
    # The KG-as-text baseline's second segment, where there is one (already cut to fit).
    enc = tokenizer(texts, batch["kg_text"]) if any(batch["kg_text"]) else tokenizer(texts)
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
        "token_type_ids": enc.get("token_type_ids", [[0] * len(x) for x in enc["input_ids"]]),
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
    kg_texts: Sequence[str] | None = None,
) -> Dataset:
    """Cloze examples as a ``datasets.Dataset`` with columns ``question_id, question, answer,
    topic_entity, answer_entity`` (-1 = not in the KG), ``relation, input_ids,
    attention_mask, labels, num_masks``. Rows are not padded (see :class:`ClozeCollator`).

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
    if kg_texts is not None and len(kg_texts) != len(records):
        raise ValueError(f"{len(kg_texts)} KG texts for {len(records)} examples")
    for i, record in enumerate(records):
        record["kg_text"] = "" if kg_texts is None else kg_texts[i]
    map_kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        fp = cloze_fingerprint(examples, tokenizer, max_length, kg_texts)
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


# ----------------------------------------------------------------------------- batches


class ClozeCollator:
    """Pads cloze rows into a batch and gathers the topic entities' neighbourhoods.

    Output: ``input_ids, attention_mask, labels`` (B, L) padded with ``pad_token_id`` / 0 /
    -100, and ``token_type_ids`` (padded with 0) when the rows have them; ``topic_entity,
    relation, answer_entity, num_masks`` (B,); with a neighbour index also ``kg_entities,
    kg_relations`` (B, N) int64 and ``kg_mask`` (B, N) bool (N = the widest neighbourhood of
    the batch, <= ``max_neighbours``). ``train``: a fresh random subset per call from a
    generator seeded with ``seed`` (reproducible); else the first neighbours.
    """

    def __init__(
        self,
        pad_token_id: int,
        neighbours: NeighbourIndex | None = None,
        max_neighbours: int = 50,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.neighbours = neighbours
        self.max_neighbours = max_neighbours
        self.train = train
        self.generator = None
        if neighbours is not None and train:
            self.generator = torch.Generator(neighbours.device).manual_seed(seed)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            rows = [torch.as_tensor(f[key], dtype=torch.long) for f in features]
            return pad_sequence(rows, batch_first=True, padding_value=value)  # (B, L)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad("token_type_ids", 0)
        for key in ("topic_entity", "relation", "answer_entity", "num_masks"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # (B,)
        if self.neighbours is not None:
            batch.update(self.gather(batch["topic_entity"]))
        return batch

    def gather(self, topic_entity: torch.Tensor) -> dict[str, torch.Tensor]:
        """``kg_entities, kg_relations, kg_mask`` (B, N) for (B,) topics, on the CPU; only the
        rows with a topic (>= 0) are gathered, the others are all padding."""
        rows = (topic_entity >= 0).nonzero().squeeze(1)  # (B_kg,)
        nbrs = self.neighbours.gather(
            topic_entity[rows], self.max_neighbours, train=self.train, generator=self.generator
        ).to("cpu")  # (B_kg, N) each
        B, N = len(topic_entity), nbrs.mask.shape[1]
        out = {
            "kg_entities": torch.zeros(B, N, dtype=torch.long),
            "kg_relations": torch.zeros(B, N, dtype=torch.long),
            "kg_mask": torch.zeros(B, N, dtype=torch.bool),
        }
        out["kg_entities"][rows] = nbrs.entities
        out["kg_relations"][rows] = nbrs.relations
        out["kg_mask"][rows] = nbrs.mask
        return out


def make_batch(
    examples: Sequence[QAExample],
    tokenizer: Any,
    neighbours: NeighbourIndex | None = None,
    max_neighbours: int = 50,
) -> dict[str, torch.Tensor]:
    """An evaluation batch of questions (:class:`QAExample`, the answer gives the number and
    the labels of the masks), e.g. for a model from :func:`kgqa.model.load_qa_model`::

        model, tokenizer, index = load_qa_model("runs/qa/x/best")
        batch = make_batch([QAExample("q", "who wrote hamlet?", 5, "shakespeare", None)],
                           tokenizer, index, model.config.max_neighbours)
        out = model(**batch)
    """
    rows = build_cloze_dataset(examples, tokenizer).to_list()
    return ClozeCollator(tokenizer.pad_token_id, neighbours, max_neighbours)(rows)


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the gold pieces at the [MASK] positions (``model`` is a
    :class:`kgqa.model.KGEnhancedLM` or the DeepSpeed engine wrapping one)."""
    return model(**batch).loss
