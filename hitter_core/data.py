"""Knowledge-graph triples: loading FB15K-237 / WN18RR into id tensors (paper section 3.1).

A dataset directory holds the standard tab-separated files ``train.txt``, ``valid.txt`` and
``test.txt`` (``head<TAB>relation<TAB>tail`` per line) and, optionally, ``entity_names.tsv``
(``id<TAB>name``) used only for display.

Vocabulary order is LibKGE's (and so HittER's and the released QA files'): ids are assigned by
first appearance while reading train, valid, test in that order, head before relation before
tail. The vocabulary therefore covers all three splits; entities that only occur in valid/test
keep untrained embeddings, which is the standard protocol behind the paper's numbers
(``../shared/design/REFERENCE.md``). They are counted and reported, and ``drop_unseen=True``
removes such triples from valid/test instead (never silently: the count is logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "KGQA_DATA_DIR"


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and the line."""


def default_data_dir() -> Path:
    """The data root: ``$KGQA_DATA_DIR``, or ``./data`` prepared by ``data/prepare.py``."""
    return Path(os.environ.get(DATA_DIR_ENV, "data/prepared"))


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a UTF-8 text file; a line that is not valid
    UTF-8 raises :class:`DataFormatError` naming file:line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start}: "
                                      f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8"
                                      ) from None


def read_triples(path: Path) -> list[tuple[str, str, str]]:
    """Read ``head<TAB>relation<TAB>tail`` lines; blank lines are skipped, anything else that
    is not exactly three non-empty fields raises :class:`DataFormatError` naming file:line."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file. A dataset directory needs train.txt, valid.txt and "
            f"test.txt; see data/README.md for where to get them."
        )
    triples = []
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataFormatError(
                f"{path}:{line_no}: expected 3 tab-separated fields (head, relation, tail), "
                f"got {len(fields)}: {line[:200]!r}"
            )
        if any(not x.strip() for x in fields):
            raise DataFormatError(f"{path}:{line_no}: empty field in {line[:200]!r}")
        triples.append((fields[0].strip(), fields[1].strip(), fields[2].strip()))
    if not triples:
        raise DataFormatError(f"{path}: the split is empty (no triples)")
    return triples


def read_names(path: Path) -> dict[str, str]:
    """``id<TAB>name`` lines (extra columns ignored); malformed lines raise naming file:line."""
    names = {}
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise DataFormatError(f"{path}:{line_no}: expected 'id<TAB>name', got {line!r}")
        names[fields[0].strip()] = fields[1].strip()
    return names


@dataclass
class KnowledgeGraph:
    """A knowledge graph as id tensors. ``train/valid/test`` are ``(T, 3)`` int64 tensors of
    ``(head, relation, tail)`` ids; relations are the R forward relations (reciprocal relation
    ``p + R`` is introduced by the model and the neighbourhood index, not stored here)."""

    name: str
    directory: Path
    entities: list[str]  # id -> original identifier (MID, WordNet offset)
    relations: list[str]
    entity_names: list[str]  # id -> human-readable name (falls back to the identifier)
    splits: dict[str, torch.Tensor]
    num_unseen: dict[str, int] = field(default_factory=dict)  # triples with a non-train entity

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    @property
    def train(self) -> torch.Tensor:
        return self.splits["train"]

    @property
    def valid(self) -> torch.Tensor:
        return self.splits["valid"]

    @property
    def test(self) -> torch.Tensor:
        return self.splits["test"]

    def entity_index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entities)}

    def __repr__(self) -> str:
        sizes = " / ".join(f"{len(self.splits[s]):,}" for s in SPLITS)
        return (
            f"KnowledgeGraph({self.name}: {self.num_entities:,} entities, "
            f"{self.num_relations} relations, train/valid/test {sizes})"
        )


def load_kg(directory: str | os.PathLike, drop_unseen: bool = False) -> KnowledgeGraph:
    """Load a dataset directory (e.g. ``$KGQA_DATA_DIR/fb15k-237``) into a :class:`KnowledgeGraph`.

    Valid/test triples whose head or tail never occurs in train are kept (standard protocol)
    and counted with a warning; with ``drop_unseen=True`` they are removed and counted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such dataset directory. Point the code at a directory holding "
            f"train.txt/valid.txt/test.txt (set ${DATA_DIR_ENV} or pass --data-dir); "
            f"data/README.md explains how to fetch and prepare the official files."
        )
    raw = {split: read_triples(directory / f"{split}.txt") for split in SPLITS}
    entity_index, relation_index = _vocabulary(raw)
    splits = {}
    for split in SPLITS:
        ids = [(entity_index[h], relation_index[r], entity_index[t]) for h, r, t in raw[split]]
        splits[split] = torch.tensor(ids, dtype=torch.long)  # (T, 3)
    relations = list(relation_index)
    num_unseen = _count_unseen(directory, splits, len(entity_index), relations, drop_unseen)

    entities = list(entity_index)
    names_file = directory / "entity_names.tsv"
    names = read_names(names_file) if names_file.is_file() else {}
    return KnowledgeGraph(
        name=directory.name,
        directory=directory,
        entities=entities,
        relations=relations,
        entity_names=[names.get(e, e) for e in entities],
        splits=splits,
        num_unseen=num_unseen,
    )


def _vocabulary(
    raw: dict[str, list[tuple[str, str, str]]],
) -> tuple[dict[str, int], dict[str, int]]:
    """Entity and relation ids in LibKGE's order (module docstring): by first appearance in
    train, valid, test, head before relation before tail."""
    entity_index: dict[str, int] = {}
    relation_index: dict[str, int] = {}
    for split in SPLITS:
        for h, r, t in raw[split]:
            entity_index.setdefault(h, len(entity_index))
            relation_index.setdefault(r, len(relation_index))
            entity_index.setdefault(t, len(entity_index))
    return entity_index, relation_index


def _count_unseen(
    directory: Path, splits: dict[str, torch.Tensor], num_entities: int, relations: list[str],
    drop_unseen: bool,
) -> dict[str, int]:
    """Valid/test triples with an entity or a relation that train lacks, per split: logged
    as warnings and, with ``drop_unseen``, removed from ``splits`` (in place)."""
    train = splits["train"]  # (T, 3)
    seen = torch.zeros(num_entities, dtype=torch.bool)
    seen[train[:, 0]] = True
    seen[train[:, 2]] = True
    seen_relation = torch.zeros(len(relations), dtype=torch.bool)
    seen_relation[train[:, 1]] = True
    num_unseen = {}
    for split in ("valid", "test"):
        ok = seen[splits[split][:, 0]] & seen[splits[split][:, 2]]
        ok_relation = seen_relation[splits[split][:, 1]]
        num_unseen[split] = int((~(ok & ok_relation)).sum())
        action = "dropped" if drop_unseen else "kept (standard protocol)"
        if (~ok).any():
            logger.warning(
                "%s/%s.txt: %d triples involve an entity not in train; %s",
                directory.name, split, int((~ok).sum()), action,
            )
        if (~ok_relation).any():
            logger.warning(
                "%s/%s.txt: %d triples have a relation not in train (%s); %s",
                directory.name, split, int((~ok_relation).sum()), ", ".join(sorted(
                    {relations[r] for r in splits[split][~ok_relation, 1].tolist()}
                )[:5]), action,
            )
        ok = ok & ok_relation
        if num_unseen[split] and drop_unseen:
            splits[split] = splits[split][ok]
            if len(splits[split]) == 0:
                raise DataFormatError(f"{directory}/{split}.txt: empty after drop_unseen")
    return num_unseen
