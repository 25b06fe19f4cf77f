"""The topic's neighbourhood as text: the "KG as text" baseline (not in the paper).

No KG-enhanced LM paper we compare with reports what the plain LM does when the graph is simply
pasted into its input. This module writes the topic entity's neighbours into a second input
segment, ``question [MASK]... . [SEP] topic: relation neighbour; relation neighbour; ... [SEP]``,
for the plain LM (no HittER), so a user can see whether HittER's vectors beat the text.

* Which neighbours: the first ones of the fixed, seeded order that HittER's evaluation uses
  (:meth:`hitter_core.neighbours.NeighbourIndex.gather` with ``train=False``), at most
  ``max_neighbours``; the text is the same in every epoch and every run (deterministic).
* How: a neighbour token (e, r) of topic t is written ``relation text + name of e`` for a
  forward relation (t, r, e) and ``name of e + relation text`` for a reciprocal one (e, r, t),
  with the relation texts of ``relation2text.txt`` (``/music/artist/origin`` ->
  "music artist origin").
* Truncation: the question and its [MASK] tokens are never cut; whole neighbours are added
  while the input stays within ``max_length`` word pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hitter_core.data import KnowledgeGraph, read_names
from hitter_core.neighbours import NeighbourIndex
from kgqa.lm import word_pieces
from kgqa.qa_readers import QAExample

RELATION_TEXT_FILE = "relation2text.txt"


def relation_texts(kg: KnowledgeGraph) -> list[str]:
    """Readable text of each of the R relations (``relation2text.txt`` in the graph's
    directory when present, else the relation id with '/', '_' and '.' as spaces)."""
    path = Path(kg.directory) / RELATION_TEXT_FILE
    given = read_names(path) if path.is_file() else {}
    out = []
    for rel in kg.relations:
        text = given.get(rel) or rel.replace("/", " ").replace("_", " ").replace(".", " ")
        out.append(" ".join(text.split()))
    return out


def neighbour_phrases(
    entities: Sequence[int], relations: Sequence[int], kg: KnowledgeGraph, rel_texts: Sequence[str]
) -> list[str]:
    """One phrase per neighbour token; relation ids >= R are the reciprocal relations."""
    R = len(rel_texts)
    phrases = []
    for e, r in zip(entities, relations, strict=True):
        name = kg.entity_names[e]
        phrases.append(f"{rel_texts[r]} {name}" if r < R else f"{name} {rel_texts[r - R]}")
    return phrases


def fit_phrases(
    topic_name: str, phrases: Sequence[str], tokenizer, budget: int
) -> str:
    """``topic: p1; p2; ...`` with as many whole phrases as fit in ``budget`` word pieces
    (the topic's name alone if none fits; empty if not even that fits)."""
    head = f"{topic_name}:"
    used = len(tokenizer.tokenize(head))
    if used > budget:
        return ""
    kept = []
    for phrase in phrases:
        cost = len(tokenizer.tokenize(f" {phrase};"))
        if used + cost > budget:
            break
        kept.append(phrase)
        used += cost
    return f"{head} {'; '.join(kept)}" if kept else head


def kg_texts(
    examples: Sequence[QAExample],
    kg: KnowledgeGraph,
    index: NeighbourIndex,
    tokenizer: Any,
    max_length: int,
    max_neighbours: int,
) -> list[str]:
    """The second input segment of every example: its topic's first ``max_neighbours``
    neighbours as text, cut so that ``[CLS] cloze [SEP] text [SEP]`` has at most
    ``max_length`` word pieces ("" without a topic entity or room)."""
    rel_texts = relation_texts(kg)
    topics = [e.topic_entity for e in examples]
    with_topic = [t for t in topics if t is not None]
    nbrs = index.gather(torch.tensor(with_topic, dtype=torch.long), max_neighbours) if (
        with_topic) else None
    out, j = [], 0
    for example, topic in zip(examples, topics, strict=True):
        if topic is None:
            out.append("")
            continue
        keep = nbrs.mask[j]
        phrases = neighbour_phrases(nbrs.entities[j][keep].tolist(),
                                    nbrs.relations[j][keep].tolist(), kg, rel_texts)
        j += 1
        answer = word_pieces([example.answer], tokenizer)[0]
        cloze = f"{example.question} {tokenizer.mask_token * len(answer)}."
        budget = max_length - len(tokenizer(cloze)["input_ids"]) - 1  # the final [SEP]
        out.append(fit_phrases(kg.entity_names[topic], phrases, tokenizer, budget))
    return out
